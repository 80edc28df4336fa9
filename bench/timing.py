"""The benchmarks' shared timing and report core: thread count, the CPU/GPU matmul rate, FLOPs of an image tower,
onnxruntime runners, timed paths interleaved in rounds (so drift on a shared machine hits all paths alike), and
the record and files every result carries."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def threads_available() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def matmul_rate(n: int, repeats: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """GFLOP/s of an n x n matmul with torch on ``device`` (best of ``repeats``, after one warm-up)."""
    device = torch.device(device)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    flop = 2.0 * n ** 3
    return {"n": n, "repeats": repeats, "threads": torch.get_num_threads(), "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "seconds": times,
            "gflops_best": flop / min(times) / 1e9, "gflops_median": flop / statistics.median(times) / 1e9}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a timer around it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_gflop(model: torch.nn.Module, size: int) -> float:
    """FLOPs of one image through the image tower (matmuls, convs, attention), in GFLOP.

    Counted with a grad-requiring input: without one, ``nn.MultiheadAttention`` takes its fused inference
    path, which the counter cannot see (ViT-B-32 read 5.9 GFLOP instead of 8.8: no q/k/v, output projection or
    attention).  The CPU attention kernel is not in torch's FLOP table either, so it is added here."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention}
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    with counter:
        model.encode_image(torch.zeros(1, 3, size, size, requires_grad=True))
    return counter.get_total_flops() / 1e9


def ort_runner(path: Path, variant: str, threads: int):
    from orthserve.artifact import ort_session

    session = ort_session(path, variant, ["CPUExecutionProvider"], threads)
    name = session.get_inputs()[0].name
    return lambda pixels: session.run(None, {name: pixels})[0]


def time_path(run, pixels, seconds: float, min_iters: int, device: torch.device = torch.device("cpu")) -> float:
    """Images/second: repeat ``run(pixels)`` for at least ``seconds`` and ``min_iters`` calls (on a GPU, the
    device drained before and after)."""
    synchronize(device)
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < seconds:
        run(pixels)
        iters += 1
    synchronize(device)
    return len(pixels) * iters / (time.perf_counter() - start)


def timed_rounds(runners: dict, pixels, batches: list[int], rounds: int, seconds: float, min_iters: int, label: str,
                 device: torch.device = torch.device("cpu")) -> dict[str, dict[int, list[float]]]:
    """Images/s of every path (``runners``: name -> run) at every batch size, once per round; within a round
    the paths run back to back, the first one rotating, so a shared machine's drift hits them alike."""
    paths = list(runners)
    rates: dict[str, dict[int, list[float]]] = {p: {b: [] for b in batches} for p in paths}
    for r in range(rounds):
        for b in batches:
            for path in paths[r % len(paths):] + paths[:r % len(paths)]:
                rates[path][b].append(time_path(runners[path], pixels[:b], seconds, min_iters, device))
        print(f"  {label}: round {r + 1}/{rounds} done", flush=True)
    return rates


def run_record() -> dict:
    """What every result file records about its run: machine, command line, time."""
    return {"machine": f"{platform.platform()}, python {platform.python_version()}, torch {torch.__version__}",
            "command": " ".join(sys.argv), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def save_results(out: Path, stem: str, report: dict, markdown, chart) -> None:
    """``stem``.json, .md (``markdown(report, path)``) and .png (``chart(report, path)``) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown(report, out / f"{stem}.md")
    chart(report, out / f"{stem}.png")
    print(f"wrote {out / stem}.json, .md, .png")
