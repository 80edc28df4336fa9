"""Data-parallel training (torchrun, gloo on CPU): same result as one process with the global batch, resume,
and DDP around the OrthCR objective (frozen bypass, Cutout) reducing only the trainable tensors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import finetune
from training.data import DataError
from training.distributed import Processes, ShardedEpochSampler

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def args(data: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    """OrthCR with its KL terms (the frozen bypass runs every step), 4 shots x 5 classes = 20 images."""
    return ["--model", "orthserve-tiny", "--pretrained", "none", "--data", str(data / "flowers5"), "--out", str(out),
            "--method", "orthcr", "--shots", "4", "--epochs", "2", "--batch-size", str(batch_size), "--workers", "0",
            "--val-shots", "0", "--test-per-class", "1", "--progress", "off", "--lr", "0.01", *extra]


def torchrun(nproc: int, argv: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "training.finetune", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def adapters(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter.safetensors")


def test_sharded_sampler_splits_each_global_batch_like_one_process():
    one = [i for _, i in ShardedEpochSampler(20, 3, Processes())]
    ranks = [[i for _, i in ShardedEpochSampler(20, 3, Processes(rank=r, world_size=2))] for r in range(2)]
    for k in range(3):  # per-process batch 4 = global batch 8: the same images as one process's batch of 8
        assert sorted(ranks[0][4 * k:4 * k + 4] + ranks[1][4 * k:4 * k + 4]) == sorted(one[8 * k:8 * k + 8])
    padded = [list(ShardedEpochSampler(5, 3, Processes(rank=r, world_size=2))) for r in range(2)]
    assert len(padded[0]) == len(padded[1]) == 3  # 5 images on 2 processes: padded, same number of steps


def test_two_processes_equal_one_with_the_global_batch(sample_images, tmp_path):
    """2 processes x batch 4 end with the adapter of 1 process x batch 8 (same images in each global batch).
    Without Cutout: each process draws its own Cutout masks, so with Cutout the runs differ by design."""
    finetune.main(args(sample_images, tmp_path / "one", 8, "--cutout", "none"))
    torchrun(2, args(sample_images, tmp_path / "two", 4, "--cutout", "none"))
    one, two = adapters(tmp_path / "one"), adapters(tmp_path / "two")
    assert one.keys() == two.keys()
    assert max(t.abs().max().item() for t in one.values()) > 1e-3  # trained: the skew parameters start at zero
    for key in one:  # float sums in another order: equal to float32 rounding, far below what training moved
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)


def test_two_process_resume_equals_an_uninterrupted_run(sample_images, tmp_path):
    """With random Cutout: each process's Cutout stream is checkpointed and restored."""
    torchrun(2, args(sample_images, tmp_path / "whole", 4, "--cutout", "random"))
    torchrun(2, args(sample_images, tmp_path / "parted", 4, "--cutout", "random", "--stop-after-epochs", "1"))
    torchrun(2, args(sample_images, tmp_path / "parted", 4, "--cutout", "random", "--resume"))
    whole, parted = adapters(tmp_path / "whole"), adapters(tmp_path / "parted")
    for key in whole:
        torch.testing.assert_close(parted[key], whole[key], rtol=0, atol=1e-7)
    with pytest.raises(DataError, match="2 process"):  # one process cannot continue a 2-process checkpoint
        finetune.main(args(sample_images, tmp_path / "parted", 4, "--cutout", "random", "--resume", "--epochs", "3"))


def _ddp_step(rank: int, world_size: int, port: int, cutout: str, out: str) -> None:
    """One OrthCR step (frozen bypass + Cutout) through DDP; records every element a gradient bucket all-reduced."""
    import torch.distributed as dist

    import orthserve
    from training import distributed
    from training.objective import OrthCRConfig, OrthCRObjective

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model, _, tokenizer = orthserve.load_model("orthserve-tiny", "none")
    for p in model.parameters():
        p.requires_grad_(False)
    classifier = orthserve.CLIPClassifier(model, tokenizer, ["a", "b", "c"], ["a photo of a {}."])
    orthserve.inject(classifier, orthserve.OrthogonalConfig())
    ddp = distributed.wrap(classifier, Processes(rank, world_size), torch.device("cpu"))
    reduced = []

    def count(state, bucket):
        reduced.append(bucket.buffer().numel())
        work = dist.all_reduce(bucket.buffer().div_(world_size), async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    ddp.register_comm_hook(None, count)
    objective = OrthCRObjective(classifier, OrthCRConfig(cutout=cutout), torch.Generator().manual_seed(rank))
    images = torch.randn(2, 3, *model.visual.image_size)
    loss, _, _ = objective(ddp, images, torch.tensor([0, 1]))
    loss.backward()
    trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    grads = torch.cat([p.grad.flatten() for p in classifier.parameters() if p.requires_grad])
    if rank == 0:
        torch.save({"reduced": sum(reduced), "trainable": trainable, "grads": grads}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("cutout", ["random", "attentive"])
def test_ddp_reduces_only_trainable_tensors_with_the_orthcr_objective(tmp_path, cutout):
    import torch.multiprocessing as mp

    from service_helpers import free_port

    out = tmp_path / "step.pt"
    mp.spawn(_ddp_step, args=(2, free_port(), cutout, str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    assert result["reduced"] == result["trainable"]  # no frozen weight in any bucket, every adapter used
    assert result["grads"].abs().sum() > 0
