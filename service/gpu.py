"""The GPU side of the onnxruntime runtime: which GPU a worker runs on, provider options, pinned host buffers,
IO binding, CUDA graphs.

Used only when a session's first provider is CUDA or TensorRT (``runtime.OnnxEncoder``); the CPU path is
``session.run`` as before.  Why each piece (figures: bench/results/gpu_check*.md where a GPU was lent):
- uint8 pixels already cut the bytes per image four-fold (the graph normalizes); pinned (page-locked) host
  buffers let the copy to the device run by DMA instead of through the driver's pageable bounce buffer.
- IO binding writes the output straight into a reused host buffer: no allocation per call.
- CUDA graphs (``ORTHSERVE_CUDA_GRAPHS=1``) replay a captured batch instead of launching every kernel: one graph
  per batch-size bucket (powers of two up to the largest batch), batches padded up to their bucket.  Off by
  default: onnxruntime refuses them when any node falls back to the CPU, and padding costs compute.
- TensorRT, when libnvinfer is installed, builds engines once and keeps them in an engine cache on disk.
- Several GPUs: one service worker per GPU, each with its own CUDA context, sessions and batch queue (a worker's
  batcher is made in its own ``Classifier.__init__``).  BentoML numbers its workers from 1
  (``bentoml.server_context.worker_index``) and, for ``resources={"gpu": N}``, hands every worker the same
  ``CUDA_VISIBLE_DEVICES`` list; so worker k takes device ``k - 1`` of that list (``device_for_worker``),
  as BentoML's docs on multi-GPU workers do.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

log = logging.getLogger("orthserve.service")

# onnxruntime's input type names -> numpy dtypes (the runtime's encoders read theirs from here too)
INPUT_DTYPES = {"tensor(uint8)": np.uint8, "tensor(int64)": np.int64, "tensor(float)": np.float32}

# cuDNN: search the convolution algorithms once per shape (the patch embedding), with all the workspace it wants;
# the memory arena grows by what is asked, not by doubling, so a few batch sizes do not reserve 2x the memory
CUDA_OPTIONS = {"cudnn_conv_algo_search": "EXHAUSTIVE", "cudnn_conv_use_max_workspace": "1",
                "arena_extend_strategy": "kSameAsRequested", "do_copy_in_default_stream": "1"}


@functools.cache
def system_gpus() -> int:
    """GPUs the NVIDIA driver shows this machine or container (NVML ignores CUDA_VISIBLE_DEVICES); 0 without one.

    Where NVML cannot load (the container runtime did not mount libnvidia-ml), the GPU device nodes are counted."""
    try:
        import pynvml  # nvidia-ml-py, a dependency of BentoML (its own GPU count uses it too)

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library: count device nodes, usually none
        return len(list(Path("/dev").glob("nvidia[0-9]*")))
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def visible_gpus(cuda_visible_devices: str | None, system: int) -> int:
    """How many GPUs CUDA will show a process with this ``CUDA_VISIBLE_DEVICES`` on a machine with ``system`` GPUs.

    Unset: all of them.  Set: its entries up to the first invalid one, as CUDA reads it (``""`` and ``"-1"`` hide
    every GPU, an index past the last GPU ends the list); UUIDs (``GPU-...``, ``MIG-...``) count as one each."""
    if cuda_visible_devices is None:
        return system
    count = 0
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-") or (entry.isdigit() and int(entry) >= system):
            break
        count += 1
    return count


def device_for_worker(worker_index: int | None, gpus: int) -> int:
    """The CUDA device id for BentoML worker ``worker_index`` (numbered from 1): an index into the visible list.

    More workers than GPUs share them round-robin; ``None`` (not a BentoML worker: tests, scripts) is device 0."""
    if worker_index is None or gpus <= 1:
        return 0
    if worker_index < 1:
        raise ValueError(f"BentoML worker indices start at 1, got {worker_index}")
    return (worker_index - 1) % gpus


def workers_for(override: int | None, gpus: int, cpus: int) -> int:
    """Service processes: ``override`` (ORTHSERVE_WORKERS) when set, else one per GPU, else one per CPU up to 4.

    A worker's HTTP handling runs under one GIL, so on CPU one worker left a third of 2 CPUs idle (2 workers: +50%
    req/s, bench/results/service_vs_raw.md); on GPUs one worker per device keeps each device's batches its own."""
    if override is None:
        return gpus if gpus else min(4, cpus)
    if gpus and override % gpus:
        _warn_uneven(override, gpus)
    return override


@functools.cache  # once per process, however often the worker count is asked for
def _warn_uneven(workers: int, gpus: int) -> None:
    idle = f"; GPUs {workers}-{gpus - 1} get no worker" if workers < gpus else ""
    log.warning("ORTHSERVE_WORKERS=%d on %d GPUs: the GPUs get unequal shares of the workers%s (a multiple of %d "
                "spreads them evenly)", workers, gpus, idle, gpus)


def trt_cache_dir() -> Path:
    """``ORTHSERVE_TRT_CACHE``, else a folder in the user's cache: engines take minutes to build."""
    from .settings import settings

    path = settings().trt_cache
    path.mkdir(parents=True, exist_ok=True)
    return path


def provider_options(provider: str, input_name: str, row_shape: Sequence[int], max_batch: int,
                     cuda_graph: bool = False, device_id: int = 0) -> dict[str, str]:
    """Options for one GPU provider on visible device ``device_id``; ``row_shape`` is one input row (``[3, H, W]``
    or ``[context_length]``)."""
    if provider == "CUDAExecutionProvider":
        return {**CUDA_OPTIONS, "device_id": str(device_id), **({"enable_cuda_graph": "1"} if cuda_graph else {})}
    if provider == "TensorrtExecutionProvider":
        shape = "x".join(str(d) for d in row_shape)
        cache = str(trt_cache_dir())
        return {"device_id": str(device_id), "trt_fp16_enable": "1", "trt_engine_cache_enable": "1", "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": "1", "trt_timing_cache_path": cache,
                "trt_profile_min_shapes": f"{input_name}:1x{shape}",
                "trt_profile_opt_shapes": f"{input_name}:{max_batch}x{shape}",
                "trt_profile_max_shapes": f"{input_name}:{max_batch}x{shape}"}
    return {}


@functools.cache
def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime that onnxruntime-gpu loaded (``preload_dlls`` or the system's), or None."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def pinned_empty(shape: Sequence[int], dtype) -> tuple[np.ndarray, bool]:
    """A host array page-locked with ``cudaHostRegister`` (kept for the life of the process); ``(array, False)``
    when the CUDA runtime cannot pin it, which only makes copies slower."""
    array = np.empty(tuple(shape), dtype)
    cudart = _cudart()
    if cudart is None or array.nbytes == 0:
        return array, False
    status = cudart.cudaHostRegister(ctypes.c_void_p(array.ctypes.data), ctypes.c_size_t(array.nbytes),
                                     ctypes.c_uint(0))
    if status != 0:
        log.warning("cudaHostRegister failed (error %d): host copies stay pageable", status)
    return array, status == 0


def buckets(max_batch: int) -> list[int]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


class BoundRunner:
    """``session`` run through IO binding: input copied from a pinned host buffer, output written into one.

    ``device`` is where the graph runs (``"cuda"``; ``"cpu"`` lets the tests exercise the same code).  With
    ``graphs``, each batch-size bucket has its input and output on the device, bound once, and its own CUDA
    graph (``gpu_graph_id``); a batch is padded up to its bucket.  Rows beyond ``max_batch`` run in slices.
    """

    def __init__(self, session: ort.InferenceSession, max_batch: int, device: str = "cuda", device_id: int = 0,
                 graphs: bool = False) -> None:
        self.session, self.device, self.device_id, self.max_batch = session, device, device_id, max_batch
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        self.input_name, self.output_name = inp.name, out.name
        self.dtype = INPUT_DTYPES[inp.type]
        row, dim = [int(d) for d in inp.shape[1:]], out.shape[-1]
        if not isinstance(dim, int):  # a symbolic width: ask the graph once
            dim = session.run(None, {inp.name: np.zeros((1, *row), self.dtype)})[0].shape[-1]
        self.row_shape, self.dim = tuple(row), int(dim)
        self.staging, pinned_in = pinned_empty((max_batch, *row), self.dtype)
        self.result, pinned_out = pinned_empty((max_batch, self.dim), np.float32)
        self.pinned = pinned_in and pinned_out
        self.graphs = {}
        if graphs:
            for graph_id, size in enumerate(buckets(max_batch), start=1):
                self.graphs[size] = self._bucket(size, graph_id)

    def _bucket(self, size: int, graph_id: int) -> tuple:
        """Device input and output of one bucket, bound once (a CUDA graph replays fixed addresses)."""
        device_in = ort.OrtValue.ortvalue_from_shape_and_type((size, *self.row_shape), self.dtype, self.device,
                                                              self.device_id)
        device_out = ort.OrtValue.ortvalue_from_shape_and_type((size, self.dim), np.float32, self.device,
                                                               self.device_id)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, device_in)
        binding.bind_ortvalue_output(self.output_name, device_out)
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return device_in, device_out, binding, options

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) > self.max_batch:
            return np.concatenate([self(batch[i:i + self.max_batch]) for i in range(0, len(batch), self.max_batch)])
        rows = len(batch)
        staged = self.staging[:rows]
        if staged.ctypes.data != batch.ctypes.data:  # the batcher may have assembled it in place already
            np.copyto(staged, batch)
        if self.graphs:
            size = next(s for s in self.graphs if s >= rows)
            device_in, device_out, binding, options = self.graphs[size]
            device_in.update_inplace(self.staging[:size])  # rows past ``rows`` are stale: their outputs are dropped
            self.session.run_with_iobinding(binding, options)
            return device_out.numpy()[:rows]
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cpu", 0, self.dtype, staged.shape, staged.ctypes.data)
        binding.bind_output(self.output_name, "cpu", 0, np.float32, (rows, self.dim), self.result.ctypes.data)
        self.session.run_with_iobinding(binding)
        return self.result[:rows].copy()  # the buffer is reused by the next call
