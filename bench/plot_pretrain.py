"""One picture of orthserve-mini's pretraining across its runs (a run from scratch, then warm restarts).

    python bench/plot_pretrain.py bench/results/pretrain_mini_v2.json bench/results/pretrain_mini_v3.json \
        --out bench/results/pretrain_mini_curves.png

Each ``metrics.json`` of ``training.pretrain`` holds its per-epoch history; the runs are drawn end to end on
one epoch axis, with each run's start marked, so a restart's dip and recovery are visible.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics.json of each run, in training order")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    offset = 0
    for i, path in enumerate(args.metrics):
        metrics = json.loads(Path(path).read_text())
        history = metrics["history"]
        trained = [row for row in history if row["epoch"] > 0]
        label = Path(path).stem
        ax.plot([offset + r["epoch"] for r in history if "val_acc" in r], [100 * r["val_acc"] for r in history if "val_acc" in r],
                "o-", color="C0", label="held-out train images (202-way)" if i == 0 else None)
        ax.plot([offset + r["epoch"] for r in trained], [100 * r["train_acc"] for r in trained], ".--", color="C1",
                label="train batches (augmented)" if i == 0 else None)
        if "test_top1" in metrics:
            end = offset + trained[-1]["epoch"]
            ax.plot([end], [100 * metrics["test_top1"]], "s", color="C2", label="Tiny-ImageNet val (once, at the end)" if i == 0 else None)
            ax.annotate(f"{label}: {100 * metrics['test_top1']:.1f}%", (end, 100 * metrics["test_top1"]),
                        textcoords="offset points", xytext=(-60, -16), fontsize=8)
        if i:
            ax.axvline(offset, color="gray", lw=0.8, ls=":")
            ax.text(offset + 0.1, 3, "warm restart", fontsize=8, color="gray")
        offset += trained[-1]["epoch"]
    ax.set(xlabel="epoch (all runs end to end)", ylabel="zero-shot top-1 (%)", title="orthserve-mini pretraining")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
