"""Adaptive batching inside the API worker: image batches that arrive while the model is busy run together next.

Why not BentoML's batchable API in a second service: on a small machine the extra HTTP hop (multipart ->
pickle -> a second Python server) cost three times the work of a 64 px photo, and the service reached only
0.55x the raw onnxruntime session (bench/results/service_vs_raw.md).  Here a request's pixels wait in a queue
only while the previous batch runs, so a lone request never waits for a timer, and under load the batch grows
by itself up to ``max_batch`` images.
"""
from __future__ import annotations

import asyncio
import functools
from collections import deque
from typing import Callable

import anyio
import numpy as np

# Images per image-encoder call, at most: large batches are where a GPU is fast; on CPU, 32 already reaches the
# cores' rate.  ORTHSERVE_MAX_BATCH_SIZE (service/settings.py) overrides; runtime.default_max_batch picks.
GPU_MAX_BATCH = 256
CPU_MAX_BATCH = 32


@functools.cache
def batch_size_histogram():
    """Images per model call, exported on /metrics (BentoML collects prometheus_client's multiprocess files)."""
    from prometheus_client import Histogram

    return Histogram("orthserve_image_batch_size", "images per image-encoder call (adaptive batching)",
                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


class Batcher:
    """``await batcher(pixels)`` -> the encoder's output for those rows, computed in a shared batch."""

    def __init__(self, encode: Callable[[np.ndarray], np.ndarray], max_batch: int,
                 staging: Callable[[int], np.ndarray | None] | None = None) -> None:
        """``staging(rows)``: where to assemble a batch of that many rows (a GPU's pinned buffer), or None."""
        self.encode, self.max_batch, self.staging = encode, max_batch, staging
        self.pending: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self.runner: asyncio.Task | None = None
        self.thread = anyio.CapacityLimiter(1)  # the model gets its own thread, never queued behind decoding

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((pixels, future))
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self.run())
        return await future

    def next_batch(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        """Waiting requests in arrival order, up to ``max_batch`` images (one larger request runs alone)."""
        jobs, rows = [], 0
        while self.pending and (not jobs or rows + len(self.pending[0][0]) <= self.max_batch):
            pixels, future = self.pending.popleft()
            if not future.done():  # a request cancelled while waiting (client gone, timeout) is skipped
                jobs.append((pixels, future))
                rows += len(pixels)
        return jobs

    async def run(self) -> None:
        while jobs := self.next_batch():
            batch = jobs[0][0] if len(jobs) == 1 else np.concatenate(
                [pixels for pixels, _ in jobs], out=self.staging(sum(len(p) for p, _ in jobs)) if self.staging else None)
            batch_size_histogram().observe(len(batch))
            try:
                out = await anyio.to_thread.run_sync(self.encode, batch, limiter=self.thread)
            except Exception as err:  # noqa: BLE001 - every request of the batch gets the error
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(err)
                continue
            start = 0
            for pixels, future in jobs:
                if not future.done():
                    future.set_result(out[start:start + len(pixels)])
                start += len(pixels)
