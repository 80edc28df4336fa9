"""The run directory, as training writes it: checkpoints, resume, metrics files and plots.

RUN_DIR/
  run.json             how to rebuild the model (``orthserve.runs.RunInfo``, read by export and evaluate)
  adapter.safetensors  the trained tensors (adapters, or the whole model for ``full``)
  checkpoint.pt        what ``--resume`` needs (tensors and numbers only: loads with ``weights_only=True``)
  metrics.json, log.csv, curves.png, confusion.png

Every file is written atomically (``orthserve.files``): a run killed mid-write leaves the previous
version and a ``.NAME.tmp-*`` file, which :meth:`RunDir.start` removes.  Used by ``training.finetune``
and ``training.pretrain``; in a multi-process run only rank 0 calls the writing methods.
"""
from __future__ import annotations

import csv
import json
import platform
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

import orthserve
from orthserve.files import atomic_text, atomic_write
from orthserve.runs import ADAPTER_FILE, RUN_FILE, RunInfo

from .data import DataError

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "orthserve-checkpoint/2"
REPO = Path(__file__).resolve().parents[1]


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ----------------------------------------------------------------------- starting and resuming
    def start(self, *, resume: bool, overwrite: bool, expect: dict[str, Any] | None = None) -> None:
        """Create the folder; refuse to mix runs.  ``expect``: run.json fields a resumed run must match
        (model, method, classes...), so ``--resume`` cannot continue another run's checkpoint."""
        if resume:
            if not self.has_checkpoint():
                raise DataError(f"--resume: {self.path} has no {CHECKPOINT} to continue from")
            if expect and (self.path / RUN_FILE).is_file():
                info = vars(RunInfo.read(self.path))
                for key, wanted in expect.items():
                    if info.get(key) != wanted:
                        shown = f"{len(info[key])} classes" if key == "classnames" else repr(info.get(key))
                        raise DataError(f"--resume: {self.path} is a run with {key} {shown}, not this one's; "
                                        "choose another --out")
        elif (self.path / RUN_FILE).is_file() and not overwrite:
            raise DataError(f"{self.path} already holds a run; pass --resume to continue it, --overwrite to start "
                            "over, or choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".*.tmp-*"):  # left by a run killed mid-write; never loaded
            stale.unlink(missing_ok=True)
        if overwrite and not resume:
            (self.path / CHECKPOINT).unlink(missing_ok=True)

    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file()

    def save_checkpoint(self, *, epoch: int, step: int, history: list[dict], tensors: dict[str, torch.Tensor],
                        optimizer, scheduler, rng: list[dict], **extra: Any) -> None:
        """``tensors``: what training changes (trainable parameters, and buffers such as batch-norm statistics);
        ``rng``: one :func:`rng_state` per process, so a resumed multi-process run draws what it would have."""
        state = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "history": history,
                 "tensors": {n: t.detach().cpu() for n, t in tensors.items()},
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng, **extra}
        atomic_write(self.path / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, tensors: dict[str, torch.Tensor], optimizer, scheduler) -> dict:
        """Copy the saved tensors into ``tensors`` (in place) and restore the optimizer and schedule; returns the
        checkpoint for the rest (epoch, step, history, rng...).  No pickle: ``weights_only=True``."""
        # on the CPU: RNG states must stay CPU tensors; parameters and optimizer state move where they belong
        state = torch.load(self.path / CHECKPOINT, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise DataError(f"--resume: {self.path / CHECKPOINT} is from another orthserve version "
                            f"(format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}); start the run again")
        missing = tensors.keys() - state["tensors"].keys()
        if missing:
            raise DataError(f"--resume: checkpoint lacks {len(missing)} tensors (e.g. {sorted(missing)[:2]})")
        with torch.no_grad():
            for name, tensor in tensors.items():
                tensor.copy_(state["tensors"][name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return state

    # ----------------------------------------------------------------------- results
    def save_weights(self, classifier, configs, method: str) -> None:
        """adapter.safetensors: adapter tensors only, or the whole CLIP state_dict for ``full``."""
        if method == "full":
            from safetensors.torch import save_file

            state = {k: v.detach().float().cpu().contiguous().clone() for k, v in classifier.model.state_dict().items()}
            atomic_write(self.path / ADAPTER_FILE, lambda tmp: save_file(state, str(tmp)))
        else:
            orthserve.save_adapters(self.path / ADAPTER_FILE, classifier, configs)

    def write_metrics(self, metrics: dict) -> None:
        atomic_text(self.path / "metrics.json", json.dumps(metrics, indent=2))

    def write_history(self, history: list[dict]) -> None:
        """log.csv: one row per epoch (epoch 0: the pretrained model)."""
        if not history:
            return
        fields = list(dict.fromkeys(k for row in history for k in row))

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(history)

        atomic_write(self.path / "log.csv", write)

    def plot_curves(self, history: list[dict]) -> None:
        """curves.png: the training objective and its terms, validation cross-entropy, and top-1, each on its own
        axis; epoch 0 is the pretrained (zero-shot) model."""
        plt = _pyplot()
        from matplotlib.ticker import MaxNLocator

        trained = [row for row in history if row["epoch"] > 0]
        has_val_loss = any("val_loss" in row for row in history)
        fig, axes = plt.subplots(1, 3 if has_val_loss else 2, figsize=(15 if has_val_loss else 10, 4))
        objective, top1 = axes[0], axes[-1]
        epochs = [row["epoch"] for row in trained]
        objective.plot(epochs, [row["train_loss"] for row in trained], "o-", label="objective (total)")
        skip = {"train_loss", "train_acc", "train_seconds"}
        for key in dict.fromkeys(k for row in trained for k in row if k.startswith("train_") and k not in skip):
            objective.plot(epochs, [row.get(key, float("nan")) for row in trained], ".--", label=key[len("train_"):])
        objective.set(xlabel="epoch", ylabel="value", title="training objective and its terms")
        top1.plot(epochs, [row["train_acc"] for row in trained], "o-", label="train top-1")
        if has_val_loss:
            val = [row for row in history if "val_loss" in row]
            axes[1].plot([r["epoch"] for r in val], [r["val_loss"] for r in val], "o-", color="C1", label="validation")
            axes[1].set(xlabel="epoch", ylabel="cross-entropy", title="validation cross-entropy (epoch 0: zero-shot)")
        val = [row for row in history if "val_acc" in row]
        if val:
            top1.plot([r["epoch"] for r in val], [r["val_acc"] for r in val], "o-", label="validation top-1")
        baseline = history[0] if history and history[0]["epoch"] == 0 else {}
        for key, label, style in (("val_top1", "zero-shot (validation)", ":"), ("test_top1", "zero-shot (test)", "--")):
            if baseline.get(key) is not None:
                top1.axhline(baseline[key], color="gray", linestyle=style, linewidth=1, label=label)
        top1.set(xlabel="epoch", ylabel="top-1", title="accuracy", ylim=(0, 1))
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.path / "curves.png", dpi=100)
        plt.close(fig)

    def plot_confusion(self, confusion: list[list[int]], classnames: list[str]) -> None:
        """confusion.png: row-normalized colours with a colour bar, and the image counts in the cells."""
        plt = _pyplot()
        counts = np.asarray(confusion, dtype=int)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        size = max(5, 0.45 * len(classnames) + 3)
        fig, ax = plt.subplots(figsize=(size + 1, size))
        shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's test images")
        if len(classnames) <= 30:
            for (i, j), n in np.ndenumerate(counts):
                if n:
                    ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classnames)), classnames, rotation=90, fontsize=8)
        ax.set_yticks(range(len(classnames)), classnames, fontsize=8)
        ax.set(xlabel="predicted", ylabel="true", title=f"test confusion: {int(counts.sum())} images, "
                                                        f"top-1 {np.trace(counts) / max(counts.sum(), 1):.1%}")
        fig.tight_layout()
        fig.savefig(self.path / "confusion.png", dpi=100)
        plt.close(fig)


def _pyplot():
    """matplotlib (the ``train`` extra), imported only when a plot is drawn, without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- provenance (run.json, metrics.json)

def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return f"{commit}{'-dirty' if dirty else ''}" if commit else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import open_clip
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "open_clip": open_clip.__version__, "orthserve": orthserve.__version__}


# --------------------------------------------------------------------------- random state

def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every random stream training draws from, as tensors and numbers (``weights_only`` loads it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "generator": generator.get_state() if generator is not None else torch.empty(0, dtype=torch.uint8)}


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if generator is None:
        return
    try:
        generator.set_state(state["generator"])
    except RuntimeError:  # a CPU generator's state is ~5 KB, a CUDA one's 16 bytes: the run moved devices
        import logging

        logging.getLogger("training").warning(
            "the checkpoint's generator (Cutout draws) is of another device type; its draws restart from a fresh "
            "seed (the run is no longer bit-identical to an uninterrupted one)")
