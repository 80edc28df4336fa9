"""onnxruntime sessions for the service: provider choice, model variant, threads, warm-up.

Environment (all optional):
  ORTHSERVE_MODEL      artifact directory or BentoML model tag (default: artifacts/default, then orthserve:latest)
  ORTHSERVE_PROVIDERS  comma list overriding the automatic choice: tensorrt, cuda, cpu (or full ORT names)
  ORTHSERVE_VARIANT    auto (fp16 on GPU, else fp32) | fp32 | fp16 | int8
  ORTHSERVE_INT8       1: the int8 image tower when running on CPU; the text tower stays fp32 (label embeddings
                       are cached, and int8 text loses the most agreement: bench/results/inference.md)
  ORTHSERVE_WORKERS    service processes (default: one per visible GPU, each on its own device; else one per CPU
                       up to 4)
  ORTHSERVE_THREADS    intra-op threads per session (default: the CPUs divided among the workers)
  ORTHSERVE_MAX_BATCH_SIZE  the most images per image-encoder call (default: 256 on a GPU, 32 on CPU)
  ORTHSERVE_CUDA_GRAPHS     1: CUDA graphs per batch-size bucket on the CUDA provider (service/gpu.py)
  ORTHSERVE_TRT_CACHE       TensorRT engine cache folder (default: ~/.cache/orthserve/tensorrt)
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from orthserve.prompts import class_embeddings, prompts
from orthserve.artifact import (CLASSIFIER_FILE, MANIFEST_FILE, TOKENIZER_FILE, Artifact, load_artifact, ort_session,
                                sha256_file, verify_files)
from orthserve.preprocess import PreprocessSpec
from . import gpu
from .batching import CPU_MAX_BATCH, GPU_MAX_BATCH
from .settings import remember_verified, settings, verified_artifact

log = logging.getLogger("orthserve.service")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARTIFACT = REPO / "artifacts" / "default"
DEFAULT_TAG = "orthserve:latest"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
           "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def resolve_model(spec: str | None = None) -> Path:
    """``ORTHSERVE_MODEL`` (a directory or a BentoML model tag) -> artifact directory."""
    spec = spec if spec is not None else settings().model
    default = not spec
    if default:
        if (DEFAULT_ARTIFACT / "manifest.json").is_file():
            return DEFAULT_ARTIFACT
        spec = DEFAULT_TAG
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if os.sep in spec or spec.startswith("."):  # a path, not a tag
        raise FileNotFoundError(f"ORTHSERVE_MODEL={spec}: that directory does not exist; export an artifact there with "
                                f"`python -m export --run RUN_DIR --out {spec}` (or `make artifact` for the built-in model)")
    import bentoml

    try:
        return Path(bentoml.models.get(spec).path)
    except Exception as err:  # bad tag syntax or not in the store
        if default:  # a fresh clone: nothing exported yet
            raise FileNotFoundError(
                f"no model to serve: ORTHSERVE_MODEL is not set, {DEFAULT_ARTIFACT} has no manifest.json and the "
                f"BentoML store has no {DEFAULT_TAG}. Run `make artifact` (exports the built-in orthserve-mini there, "
                "about 30 s), or export your own with `python -m export --run RUN_DIR --out DIR` and set "
                "ORTHSERVE_MODEL=DIR") from err
        raise FileNotFoundError(
            f"ORTHSERVE_MODEL={spec!r} is neither an artifact directory nor a BentoML model tag in the store ({err}); "
            f"export one with `python -m export --out DIR` and set ORTHSERVE_MODEL=DIR") from err


def open_artifact(spec: str | None = None) -> Artifact:
    """Load and check the artifact ``ORTHSERVE_MODEL`` names: its schema, every file's size, and the sha256 of
    the files this service reads (the variants it will run, the tokenizer, the class embeddings). Hashed once
    per server: the server process checks before its workers start, and they inherit what it checked."""
    root = resolve_model(spec)
    mark = f"{root.resolve()}@{sha256_file(root / MANIFEST_FILE)}" if (root / MANIFEST_FILE).is_file() else ""
    if mark and verified_artifact() == mark:
        return load_artifact(root, verify=True, hashed=())
    artifact = load_artifact(root, verify=False)  # once: which files it serves depends on its manifest
    verify_files(artifact, served_files(artifact))  # raises before anything is served
    remember_verified(mark)
    return artifact


def served_files(artifact: Artifact) -> set[str]:
    """The files the service reads: the chosen variant of each tower, the tokenizer, the class embeddings."""
    on_gpu = choose_providers()[0] in GPU_PROVIDERS
    towers = {artifact.manifest["variants"][c][choose_variant(artifact, c, on_gpu)] for c in ("image", "text")}
    return towers | {TOKENIZER_FILE, CLASSIFIER_FILE} | {MANIFEST_FILE}


def _tensorrt_loadable() -> bool:
    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def gpu_count() -> int:
    """GPUs this process may use: those CUDA_VISIBLE_DEVICES lists where it is set (BentoML sets it for its
    workers when the service asks for GPUs), else every GPU the driver reports."""
    return gpu.visible_gpus(settings().cuda_visible_devices, gpu.system_gpus())


def _gpu_present() -> bool:
    return gpu_count() > 0


def worker_index() -> int | None:
    """This process's BentoML worker number (from 1), or None outside a BentoML worker (tests, scripts)."""
    try:
        import bentoml
    except ImportError:  # the runtime without the serving extra (benchmarks)
        return None
    return bentoml.server_context.worker_index


def worker_device() -> int:
    """The CUDA device this worker's sessions run on: BentoML worker k takes visible GPU k - 1 (round-robin)."""
    return gpu.device_for_worker(worker_index(), gpu_count())


def choose_providers(override: str | None = None) -> list[str]:
    """Providers to ask for, best first; CPU always last. ``ORTHSERVE_PROVIDERS`` overrides."""
    available = ort.get_available_providers()
    override = override if override is not None else settings().providers
    if override.strip():
        wanted = [ALIASES.get(p.strip().lower(), p.strip()) for p in override.split(",") if p.strip()]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ValueError(f"ORTHSERVE_PROVIDERS asks for {missing}, not in this onnxruntime build ({available})")
        if any(p in GPU_PROVIDERS for p in wanted) and not _gpu_present():
            raise ValueError(f"ORTHSERVE_PROVIDERS={override} asks for a GPU, but none is visible "
                             f"(CUDA_VISIBLE_DEVICES={settings().cuda_visible_devices!r}); use cpu, or expose a GPU")
    else:
        wanted = []
        if _gpu_present():
            wanted = [p for p in GPU_PROVIDERS if p in available
                      and (p != "TensorrtExecutionProvider" or _tensorrt_loadable())]
    if any(p in GPU_PROVIDERS for p in wanted) and hasattr(ort, "preload_dlls"):
        try:  # CUDA / cuDNN from the nvidia-* wheels of onnxruntime-gpu[cuda,cudnn]; no-op if absent
            ort.preload_dlls()
        except Exception as err:  # noqa: BLE001 - a missing library only means system CUDA is used
            log.warning("onnxruntime.preload_dlls failed: %s", err)
    return list(dict.fromkeys([*wanted, "CPUExecutionProvider"]))


def choose_variant(artifact: Artifact, component: str, on_gpu: bool) -> str:
    """fp16 on GPU, int8 on CPU only when asked (ORTHSERVE_INT8: image tower only; ORTHSERVE_VARIANT=int8:
    both), else fp32; falls back to fp32 if the artifact lacks the file."""
    wanted = settings().variant
    if wanted == "auto":
        wanted = "fp16" if on_gpu else ("int8" if settings().int8_image and component == "image" else "fp32")
    if wanted != "fp32" and wanted not in artifact.variants(component):
        log.warning("artifact has no %s %s variant; using fp32", wanted, component)
        return "fp32"
    return wanted


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def serving_gpus() -> int:
    """The GPUs the service runs on: the visible ones when the sessions use CUDA or TensorRT, else 0."""
    return gpu_count() if choose_providers()[0] in GPU_PROVIDERS else 0


def default_workers() -> int:
    """``ORTHSERVE_WORKERS``, else one service process per GPU the sessions run on (each worker its own device,
    CUDA context and batch queue), else up to 4 on CPU (``gpu.workers_for``)."""
    return gpu.workers_for(settings().workers, serving_gpus(), available_cpus())


def default_max_batch() -> int:
    """``ORTHSERVE_MAX_BATCH_SIZE``, else 256 images on a GPU (large batches are where it is fast) and 32 on CPU."""
    return settings().max_batch or (GPU_MAX_BATCH if serving_gpus() else CPU_MAX_BATCH)


def default_threads() -> int:
    """``ORTHSERVE_THREADS``, else this worker's share of the CPUs (the workers' sessions must not oversubscribe)."""
    return settings().threads or max(1, available_cpus() // default_workers())


class OnnxEncoder:
    """One onnxruntime session: a uint8 pixel or int64 token batch in, float32 ``[N, D]`` embeddings out."""

    def __init__(self, artifact: Artifact, component: str, providers: Sequence[str] | None = None,
                 threads: int | None = None, max_batch: int = 256) -> None:
        providers = list(providers or choose_providers())
        on_gpu = providers[0] in GPU_PROVIDERS
        self.variant = choose_variant(artifact, component, on_gpu=on_gpu)
        self.path = artifact.onnx_path(component, self.variant)
        graphs = on_gpu and component == "image" and settings().cuda_graphs
        self.device_id = worker_device() if on_gpu else 0
        try:
            self.session = self._open(artifact, component, providers, threads, max_batch, graphs)
        except Exception as err:  # noqa: BLE001 - e.g. a node on the CPU provider: no CUDA graph possible
            if not graphs:
                raise
            log.warning("CUDA graphs refused (%s); running without them", str(err).splitlines()[0][:200])
            graphs = False
            self.session = self._open(artifact, component, providers, threads, max_batch, graphs)
        self.providers = self.session.get_providers()  # what actually loaded (ORT falls back to CPU)
        self.input = self.session.get_inputs()[0].name
        self.dtype = gpu.INPUT_DTYPES[self.session.get_inputs()[0].type]
        # on a GPU: IO binding with pinned host buffers (service/gpu.py); on CPU, session.run
        self.bound = gpu.BoundRunner(self.session, max_batch, device_id=self.device_id, graphs=graphs) \
            if self.providers[0] in GPU_PROVIDERS else None
        self.lock = threading.Lock()  # one run at a time: the session already uses every thread it has

    def _open(self, artifact: Artifact, component: str, providers: list[str], threads: int | None,
              max_batch: int, graphs: bool):
        row = artifact.manifest["inputs"][component]["shape"][1:]
        name = artifact.manifest["inputs"][component]["name"]
        with_options = [(p, gpu.provider_options(p, name, row, max_batch, graphs, self.device_id))
                        if p in GPU_PROVIDERS else p for p in providers]
        # no busy-waiting threads: the API worker decodes images on the same cores (+13-35% req/s, 2 CPUs)
        return ort_session(self.path, self.variant, with_options, threads or default_threads(), spinning=False)

    def staging(self, rows: int) -> np.ndarray | None:
        """On a GPU, the pinned buffer the next batch of ``rows`` can be assembled in (no extra copy), else None."""
        return self.bound.staging[:rows] if self.bound is not None and rows <= self.bound.max_batch else None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype != self.dtype:  # e.g. float pixels into the uint8 graph: a caller's bug, not a cast
            raise TypeError(f"{self.path.name} takes {np.dtype(self.dtype).name}, got {batch.dtype.name}")
        with self.lock:
            if self.bound is not None:
                return self.bound(batch)
            (out,) = self.session.run(None, {self.input: batch})
        return np.asarray(out, dtype=np.float32)


class ImageModel:
    """The image encoder of an artifact, warmed up."""

    def __init__(self, artifact: Artifact | None = None, max_batch: int | None = None) -> None:
        self.artifact = artifact or open_artifact()
        self.spec: PreprocessSpec = self.artifact.preprocess
        self.max_batch = max_batch or default_max_batch()
        self.encoder = OnnxEncoder(self.artifact, "image", max_batch=self.max_batch)
        self.staging = self.encoder.staging
        self.encode(np.zeros((2, 3, self.spec.image_size, self.spec.image_size), np.uint8))  # warm-up
        log.info("image encoder %s (%s) on %s", self.encoder.path.name, self.encoder.variant, self.encoder.providers)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[N, 3, H, W]`` (``orthserve.preprocess.to_pixels``) -> normalized embeddings."""
        return self.encoder(np.ascontiguousarray(pixels))


class TextModel:
    """The text encoder, zero-shot class embeddings and their bounded LRU cache."""

    def __init__(self, artifact: Artifact, cache_size: int = 256) -> None:
        self.artifact = artifact
        self.encoder = OnnxEncoder(artifact, "text", threads=1 if default_threads() <= 2 else 2)
        self.templates = list(artifact.templates or ["{}"])  # checked when the artifact loads
        self.cache: OrderedDict[tuple[str, ...], np.ndarray] = OrderedDict()
        self.cache_size, self.hits, self.misses = cache_size, 0, 0
        self.lock = threading.Lock()
        self.embed(["warm-up"])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> normalized embeddings ``[N, D]`` (the encoder normalizes)."""
        return self.encoder(self.artifact.tokenize(list(texts)))

    def cached(self, labels: Sequence[str]) -> np.ndarray | None:
        """The label set's embeddings if they are cached (a hit), else None; cheap enough for the event loop."""
        key = tuple(labels)
        with self.lock:
            emb = self.cache.get(key)
            if emb is not None:
                self.hits += 1
                self.cache.move_to_end(key)
            return emb

    def label_embeddings(self, labels: Sequence[str]) -> np.ndarray:
        """Per label: mean of its normalized prompt embeddings, renormalized. Cached per label set."""
        if (emb := self.cached(labels)) is not None:
            return emb
        key = tuple(labels)
        with self.lock:
            self.misses += 1
        emb = class_embeddings(self.embed(prompts(labels, self.templates)), len(labels), len(self.templates))
        with self.lock:
            self.cache[key] = emb
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return emb



def rank(image_emb: np.ndarray, class_emb: np.ndarray, logit_scale: float, names: Sequence[str],
         top_k: int) -> list[list[dict]]:
    """Softmax over all candidates for each image; the ``top_k`` best, sorted by score."""
    logits = logit_scale * image_emb.astype(np.float64) @ class_emb.astype(np.float64).T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return [[{"label": names[j], "score": float(p[j])} for j in idx] for p, idx in zip(probs, order)]
