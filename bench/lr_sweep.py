"""Learning-rate sweep: one learning rate per method, chosen on validation images, for the accuracy benchmarks.

    python bench/lr_sweep.py                       # Tiny-ImageNet gray, 10 base classes, 16 shots, 5 epochs
    python bench/fewshot_curve.py --lrs bench/results/lr_sweep.json
    python bench/base_to_new.py --lrs bench/results/lr_sweep.json --limit-classes 0

Why.  The training CLI's default learning rates are the papers' values for long schedules on
real CLIP.  In the benchmarks' short schedules (3-100 steps) some of them barely move the
adapter (LoRA's zero-initialized up-projection at 2e-4: the model stays at zero-shot), so a
table with the defaults compares learning rates more than methods.  This script gives every
method the same chance: each is trained at its default times 0.2, 1, 5, 25 and 125, and a
rate is chosen on held-out validation images (rule below).

Protocol (no test image and no new class is ever looked at).  The base-to-new task's
training images: Tiny-ImageNet ``train`` with style ``gray``, ``--limit-classes 20``
evenly spaced classes of which the first half (10 base classes, all inside the full
benchmark's base half) are used (``--subsample base``).  16 shots per class for training,
16 more per class held out of the same training folder for validation (``--val-shots 16``),
seed 1; the score is the validation top-1 after the last epoch.  Chosen: the smallest rate whose
score is within one standard error (binomial, sqrt(p(1-p)/n) of the best score p over n
validation images) of the best: with 160 validation images the scores are noisy, and a rate
far above the default that wins by noise on 10 classes and 25 steps can diverge on the full
benchmark (LoRA at 125x its default did, on 100 edge-styled classes).  OrthCR with Cutout
(random or attentive) uses the rate chosen for OrthCR with regularization (same adapter and
objective).  The few-shot curve (flowers5) then uses rates chosen on a different dataset, and
base-to-new rates chosen on its base classes' training images only.

Outputs: ``--out``/lr_sweep.md (table + the command), .json (every run, ``chosen``), .png.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py: shared helpers)
from common import DATA, METHOD_LABELS, REPO, log  # noqa: E402

SCRIPT = "bench/lr_sweep.py"
DEFAULT_TRAIN = DATA / "tiny-imagenet" / "train"
DEFAULT_TEST = DATA / "tiny-imagenet" / "val"
SWEPT = ("taskres", "lora", "full", "aoft", "orthcr-noreg", "orthcr-reg")
# Same adapter and objective as OrthCR + KL: they take its rate (the block-size variants too, so that
# the block-size table compares block sizes at one rate rather than three separately tuned ones).
INHERITS = {"orthcr-reg-cutout": "orthcr-reg", "orthcr-reg-attentive": "orthcr-reg",
            "orthcr-bs32": "orthcr-reg", "orthcr-bs16": "orthcr-reg"}
FACTORS = (0.2, 1.0, 5.0, 25.0, 125.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python {SCRIPT}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-train", type=Path, default=DEFAULT_TRAIN, help=f"ImageFolder (default {DEFAULT_TRAIN})")
    p.add_argument("--data-test", type=Path, default=DEFAULT_TEST,
                   help="the benchmark's test folder: only used to keep the same class list (never scored here)")
    p.add_argument("--style", choices=common.STYLE_CHOICES, default=common.DEFAULT_STYLE,
                   help="style transform (default: the base-to-new task's, %(default)s)")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--val-shots", type=int, default=16, help="validation images per class, held out of --data-train")
    p.add_argument("--factors", type=float, nargs="+", default=list(FACTORS),
                   help="multiples of each method's default learning rate (default %(default)s)")
    common.add_common_options(p, default_methods=list(SWEPT), default_epochs=5, default_out=REPO / "bench" / "results")
    p.set_defaults(limit_classes=20, seeds=[1])
    return p


def prepare(args) -> dict:
    classes, _ = common.common_classes(args.data_train, args.data_test)
    chosen = common.limit_classes(classes, args.limit_classes)
    train = args.data_train if args.style == "none" else common.styled_copy(args.data_train, chosen, args.style,
                                                                           args.cache_dir)
    view = common.class_view(args.cache_dir, {"train": train}, chosen)
    return {"train": view["train"], "classes": chosen, "base": chosen[:(len(chosen) + 1) // 2], "classnames": common.default_classnames(args.data_train,
                                                                                              args.classnames)}


def markdown(result: dict) -> str:
    s, factors = result["settings"], result["settings"]["factors"]
    lines = [f"# Learning-rate sweep: {s['model']} ({s['pretrained']})", "",
             f"Reproduce: `{result['command']}`", "",
             f"Validation top-1 (%) after {s['epochs']} epochs (batch {s['batch_size']}), {s['shots']} shots and "
             f"{s['val_shots']} held-out validation images per class, {len(result['base_classes'])} base classes of "
             f"`{s['data_train']}` (style `{s['style']}`), seed(s) {', '.join(map(str, s['seeds']))}. "
             "Columns: multiples of the method's CLI default learning rate. ° = best score; **bold** = chosen: "
             "the smallest rate within one standard error of the best (± SE in the last column).", "",
             "| method | default lr | " + " | ".join(f"x{f:g}" for f in factors) + " | chosen lr |",
             "|---|---:|" + "---:|" * len(factors) + "---:|"]
    for method, row in result["table"].items():
        cells = []
        for f in factors:
            score = row["scores"].get(repr(f))
            text = "n/a" if score is None else f"{score * 100:.1f}"
            text = f"**{text}**" if f == row["chosen_factor"] else text
            cells.append(text + ("°" if f == row.get("best_factor") and f != row["chosen_factor"] else ""))
        lines.append(f"| {METHOD_LABELS[method]} | {row['default']:g} | " + " | ".join(cells)
                     + f" | {result['chosen'][method]:g} (SE {row['standard_error'] * 100:.1f}) |")
    for method, parent in INHERITS.items():
        if method in result["chosen"]:
            lines.append(f"| {METHOD_LABELS[method]} | = {parent} | " + " | ".join("" for _ in factors)
                         + f" | {result['chosen'][method]:g} |")
    lines += ["", "![chart](lr_sweep.png)", "",
              f"Runs: {len(result['runs'])} ({sum(r['reused'] for r in result['runs'])} reused from the cache); "
              f"wall time {result['wall_seconds']:.0f} s on {result['environment']['cpus']} CPUs.", ""]
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, row in result["table"].items():
        factors = [f for f in result["settings"]["factors"] if row["scores"].get(repr(f)) is not None]
        ax.plot(factors, [row["scores"][repr(f)] * 100 for f in factors], marker="o", label=method)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate / the CLI default", ylabel="validation top-1 (%)",
           title=f"learning-rate sweep, {result['settings']['model']}")
    common.finish_chart(fig, ax, path)


def main(argv: Sequence[str] | None = None) -> dict:
    common.setup_logging()
    args = build_parser().parse_args(argv)
    if args.lr or args.lrs:
        raise ValueError("lr_sweep chooses the learning rates itself: --lr and --lrs do not apply")
    methods = [m for m in common.check_methods(args.methods) if m != "zeroshot"]
    if not methods:
        raise ValueError("nothing to sweep: zero-shot has no learning rate")
    command = common.command_line(SCRIPT, argv)
    started = time.time()
    data = prepare(args)
    flags = [*common.cli_args(args), "--data", str(data["train"]), "--subsample", "base", "--shots", str(args.shots),
             "--val-shots", str(args.val_shots), "--test-per-class", "1"]
    if data["classnames"]:
        flags += ["--classnames", str(data["classnames"])]
    runs_root = args.cache_dir / "runs" / f"lr_sweep-{common._digest(flags)}"
    runs, table = [], {}
    swept = list(dict.fromkeys(INHERITS.get(m, m) for m in methods))  # Cutout variants: their parent's rate
    for method in swept:
        default, scores, losses = common.default_lr(method), {}, {}
        for factor in args.factors:
            lr = default * factor
            for seed in args.seeds:
                run_dir = runs_root / method / f"x{factor:g}" / f"seed{seed}"
                out = common.run_method(method, seed, run_dir, flags, args.fresh, {method: lr})
                last = out["metrics"]["epochs"][-1]
                runs.append({"method": method, "factor": factor, "lr": lr, "seed": seed, "val_top1": last.get("val_acc"),
                             "val_loss": last.get("val_loss"), "seconds": out["seconds"], "reused": out["reused"],
                             "argv": out["argv"]})
            mine = [r for r in runs if r["method"] == method and r["factor"] == factor and r["val_top1"] is not None]
            if mine:
                scores[repr(factor)] = sum(r["val_top1"] for r in mine) / len(mine)
                losses[repr(factor)] = sum(r["val_loss"] for r in mine) / len(mine)
        if not scores:
            raise ValueError(f"{method}: no validation scores (is --val-shots 0?)")
        best = max(scores, key=lambda k: (scores[k], -losses[k]))
        n_val = args.val_shots * len(data["base"]) * len(args.seeds)
        margin = math.sqrt(scores[best] * (1 - scores[best]) / n_val)  # one standard error of the best score
        chosen = min((k for k in scores if scores[k] >= scores[best] - margin), key=float)
        table[method] = {"default": default, "scores": scores, "val_loss": losses, "best_factor": float(best),
                         "standard_error": margin, "chosen_factor": float(chosen)}
        log.info("%s: best x%s (%.1f%%), chose x%s (lr %.3g, %.1f%%: the smallest within one standard error)",
                 method, best, scores[best] * 100, chosen, default * float(chosen), scores[chosen] * 100)
    chosen = {m: table[m]["default"] * table[m]["chosen_factor"] for m in table}
    chosen.update({m: chosen[parent] for m, parent in INHERITS.items() if parent in chosen})
    result = {"benchmark": "lr_sweep", "command": command,
              "settings": {"model": args.model, "pretrained": args.pretrained, "epochs": args.epochs,
                           "batch_size": args.batch_size, "seeds": args.seeds, "shots": args.shots,
                           "val_shots": args.val_shots, "factors": args.factors, "style": args.style,
                           "data_train": str(args.data_train), "limit_classes": args.limit_classes, "extra": args.extra},
              "base_classes": data["base"], "table": table, "chosen": chosen, "runs": runs,
              "wall_seconds": time.time() - started, "environment": common.environment()}
    common.write_outputs(result, args.out, "lr_sweep", markdown, chart)
    return result


if __name__ == "__main__":
    common.entry_point(main)
