"""Data-parallel training over processes started by ``torchrun`` (one per GPU, or CPU processes with gloo).

    torchrun --nproc-per-node 4 -m training.finetune --data DIR --out RUN_DIR --batch-size 32

How a run is split (docs/TRAINING.md has the command lines for 1 GPU, N GPUs and N nodes):

* Every process draws the same few-shot set (same seed, same images) and builds the same model;
  only the trainable tensors are broadcast from rank 0, once, so frozen weights are never sent.
* ``--batch-size`` is per process (as open_clip's scripts and Hugging Face's per-device batch size):
  the global batch is ``world_size x batch_size``.  Each epoch's order is the one-process order, and
  global batch ``k`` holds the same images as batch ``k`` of one process at ``world_size x batch_size``
  (:class:`ShardedEpochSampler`).
* :class:`~torch.nn.parallel.DistributedDataParallel` all-reduces the gradients of trainable tensors
  (its buckets hold nothing else).  Training figures are summed across processes before they are logged.
* Rank 0 evaluates and writes the run directory; the other ranks wait at the next collective.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .data import EpochSampler

# Rank 0 evaluates while the others wait in their next all-reduce: allow a long test set (NCCL's default is 10 min).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that evaluates, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start(device_name: str) -> tuple[Processes, torch.device | None]:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), else one process.

    Returns the processes and, under torchrun with CUDA, this process's GPU (``cuda:LOCAL_RANK``);
    ``None`` means: pick the device as a single process would."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes(), None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    device = None
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return Processes(rank, world_size, local_rank), device


def stop(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, processes: Processes, device: torch.device) -> torch.nn.Module:
    """The model the training step calls: ``DistributedDataParallel`` over several processes, else itself.

    ``init_sync=False``: every process loaded the same weights, so instead of broadcasting the whole model
    (ViT-B-16: 150M frozen values) only the trainable tensors come from rank 0.  No buffer broadcast per
    forward either: the frozen model's buffers never change."""
    if not processes.distributed:
        return model
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   init_sync=False, broadcast_buffers=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The classifier inside ``DistributedDataParallel`` (for attributes, the frozen pass and evaluation)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def sum_across(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place); no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def gather(obj, processes: Processes) -> list:
    """One object per process, in rank order (every process must call it)."""
    if not processes.distributed:
        return [obj]
    out: list = [None] * processes.world_size
    dist.all_gather_object(out, obj)
    return out


class ShardedEpochSampler(EpochSampler):
    """Rank ``r``'s share of :class:`EpochSampler`'s order: positions ``r, r + W, r + 2W, ...``.

    With per-process batch ``B``, batch ``k`` of every rank together is positions ``kWB .. (k+1)WB - 1``
    of the one-process order: the images of one process's batch ``k`` at batch size ``WB``.  When the
    set does not divide by ``W`` the order is padded with its first positions (as
    ``torch.utils.data.DistributedSampler`` does), so every rank runs the same number of steps."""

    def __init__(self, size: int, seed: int, processes: Processes) -> None:
        super().__init__(size, seed)
        self.rank, self.world_size = processes.rank, processes.world_size

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self):
        order = list(super().__iter__())
        order += order[: len(self) * self.world_size - len(order)]
        return iter(order[self.rank::self.world_size])
