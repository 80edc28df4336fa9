"""Cross-dataset transfer and domain generalization of the adapted model (CoOp's protocols).

    python bench/transfer.py --lrs bench/results/lr_sweep.json          # 100 base classes, 3 seeds, all methods
    python bench/transfer.py --limit-classes 12 --seeds 1               # quick pipeline check
    python bench/transfer.py --methods orthcr-reg-cutout orthcr-bs32 orthcr-bs16 --tag block_size   # block sizes

Training.  Per (method, seed), ``python -m training.finetune`` (run in process) on 16 shots of the
*original* (unstyled) ``tiny-imagenet/train`` images of the base classes (the first half of the
sorted class list), tested on the base classes' ``tiny-imagenet/val`` images (in-distribution,
"base") and on the new classes' val images with a classifier over their names ("new").

Evaluation of each trained run (``training.evaluate``'s code, the adapted towers with the
evaluated folder's class names):

* domain generalization: the base classes' val images rendered through three fixed styles
  (``gray``, ``edges``, ``blur``; defined and versioned in ``bench/common.py``), so the
  classes are the training classes and only the image domain moves;
* cross-dataset: ``flowers5`` (daisy, dandelion, rose, sunflower, tulip) and ``hymenoptera-val``
  (labels "ant", "bee"), classes the model was not adapted to.

Also recorded: trainable parameters and seconds per training step (from the run's log), so the
block-size comparison reads accuracy against cost.  Evaluations are cached in the run folder
(``transfer-<name>.json``) and reused with the run.

Outputs: ``--out``/``transfer[_<tag>]``.md, .json, .png.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py: shared helpers)
from common import DATA, METHOD_LABELS, METHODS, REPO, fmt, log, mean_std  # noqa: E402

SCRIPT = "bench/transfer.py"
TRAIN = DATA / "tiny-imagenet" / "train"
TEST = DATA / "tiny-imagenet" / "val"
DG_STYLES = ("gray", "edges", "blur")
CROSS = {"flowers5": (DATA / "flowers5", None), "ants-bees": (DATA / "hymenoptera-val", {"ants": "ant", "bees": "bee"})}
DEFAULT_EPOCHS = 2  # what fits this CPU for 100 classes x 16 shots (CoOp: 50 for 16 shots); see docs/BENCHMARKS.md


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python {SCRIPT}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shots", type=int, default=16, help="training images per base class (default 16)")
    p.add_argument("--tag", default="", help="suffix of the output files (e.g. block_size)")
    common.add_common_options(p, default_methods=list(common.PAPER_METHODS), default_epochs=DEFAULT_EPOCHS,
                              default_out=REPO / "bench" / "results")
    p.set_defaults(limit_classes=0)
    return p


def evaluation_sets(args, base: Sequence[str]) -> dict[str, tuple[Path, Path | None]]:
    """``{name: (ImageFolder, classnames file or None)}`` of every evaluation after training."""
    classnames = common.default_classnames(TRAIN, args.classnames)
    sets = {}
    for style in DG_STYLES:
        styled = common.styled_copy(TEST, base, style, args.cache_dir)
        sets[f"dg-{style}"] = (common.class_view(args.cache_dir, {"test": styled}, base)["test"],
                               Path(classnames) if classnames else None)
    for name, (root, names) in CROSS.items():
        if not root.is_dir():
            raise SystemExit(f"error: {root} does not exist (the cross-dataset sets come from ../shared/data)")
        names_file = None
        if names:
            names_file = args.cache_dir / "classnames" / f"{name}.txt"
            common.write_text(names_file, "".join(f"{folder} {label}\n" for folder, label in names.items()))
        sets[f"cross-{name}"] = (root, names_file)
    return sets


def evaluate_run(run_dir: Path, name: str, folder: Path, classnames: Path | None) -> float:
    """Top-1 of a finished run on ``folder`` (cached beside the run; the cache dies with the run)."""
    from training import evaluate

    out = run_dir / f"transfer-{name}.json"
    if out.is_file() and out.stat().st_mtime >= (run_dir / "metrics.json").stat().st_mtime:
        return json.loads(out.read_text())["top1"]
    argv = ["--run", str(run_dir), "--data", str(folder), "--workers", "0", "--out", str(out)]
    if classnames:
        argv += ["--classnames", str(classnames)]
    return evaluate.main(argv)["top1"]


def seconds_per_step(run_dir: Path, metrics: dict) -> float | None:
    seconds = sum(row.get("train_seconds", 0.0) for row in metrics.get("epochs", []))
    return seconds / metrics["steps"] if metrics.get("steps") and seconds else None


def summarize(runs: list[dict], methods: Sequence[str], names: Sequence[str]) -> dict:
    summary = {}
    for method in methods:
        rows = [r for r in runs if r["method"] == method]
        row = {key: mean_std([r[key] for r in rows]) for key in ("base", "new", *names, "dg_mean", "cross_mean")}
        row["seconds_per_step"] = mean_std([r["seconds_per_step"] for r in rows])
        row["trainable_parameters"] = rows[0]["trainable_parameters"] if rows else None
        summary[method] = row
    return summary


def markdown(result: dict) -> str:
    s, summary, names = result["settings"], result["summary"], result["sets"]
    zs = summary.get("zeroshot")
    dg = [n for n in names if n.startswith("dg-")]
    cross = [n for n in names if n.startswith("cross-")]

    def delta(row: dict, key: str) -> str:
        if not zs or row is zs or row[key]["mean"] is None or zs[key]["mean"] is None:
            return ""
        return f" ({(row[key]['mean'] - zs[key]['mean']) * 100:+.1f})"

    lines = [f"# Transfer: {s['model']} ({s['pretrained']}), {s['shots']}-shot on {len(result['classes']['base'])} "
             f"Tiny-ImageNet base classes", "",
             f"Reproduce: `{result['command']}`", "",
             f"Trained on the original photos of the base classes ({s['epochs']} epochs, batch {s['batch_size']}, "
             f"seeds {', '.join(map(str, s['seeds']))}). Top-1 in %, mean ± sample std over seeds; in brackets the "
             "difference to zero-shot. base: val images of the training classes; new: val images of the other "
             f"{len(result['classes']['new'])} classes (their names only); dg-*: the base val images in a fixed style "
             "(bench/common.py); cross-*: other datasets.", "",
             "## Domain generalization and base-to-new (original photos)", "",
             "| method | base | new | " + " | ".join(dg) + " | DG mean |",
             "|---|" + "---:|" * (3 + len(dg))]
    for method, row in summary.items():
        cells = [METHOD_LABELS[method], fmt(row["base"]) + delta(row, "base"), fmt(row["new"]) + delta(row, "new"),
                 *[fmt(row[n]) + delta(row, n) for n in dg], fmt(row["dg_mean"]) + delta(row, "dg_mean")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Cross-dataset (classes never adapted to)", "",
              "| method | " + " | ".join(cross) + " | mean | trainable parameters | s / step |",
              "|---|" + "---:|" * (len(cross) + 3)]
    for method, row in summary.items():
        sps = row["seconds_per_step"]["mean"]
        cells = [METHOD_LABELS[method], *[fmt(row[n]) + delta(row, n) for n in cross],
                 fmt(row["cross_mean"]) + delta(row, "cross_mean"),
                 f"{row['trainable_parameters']:,}" if row["trainable_parameters"] is not None else "n/a",
                 "n/a" if sps is None else f"{sps:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += common.report_footer(result, result["name"])
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    plt = common.pyplot()
    summary = result["summary"]
    methods = list(summary)
    keys = [("base", "base"), ("new", "new"), ("dg_mean", "DG mean"), ("cross_mean", "cross-dataset mean")]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(methods) + 2), 4.5))
    width = 0.8 / len(keys)
    for offset, (key, label) in enumerate(keys):
        xs = [i + (offset - (len(keys) - 1) / 2) * width for i in range(len(methods))]
        ax.bar(xs, [(summary[m][key]["mean"] or 0) * 100 for m in methods], width,
               yerr=[(summary[m][key]["std"] or 0) * 100 for m in methods], capsize=3, label=label)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    s = result["settings"]
    ax.set(ylabel="top-1 (%)", title=f"transfer, {s['model']} ({s['pretrained']}), {s['shots']}-shot")
    common.finish_chart(fig, ax, path, legend_size=8, grid_axis="y")


def main(argv: Sequence[str] | None = None) -> dict:
    common.setup_logging()
    args = build_parser().parse_args(argv)
    methods = common.check_methods(args.methods)
    command = common.command_line(SCRIPT, argv)
    lrs = common.learning_rates(args)
    started = time.time()
    classes, missing = common.common_classes(TRAIN, TEST)
    chosen = common.limit_classes(classes, args.limit_classes)
    half = math.ceil(len(chosen) / 2)
    base, new = chosen[:half], chosen[half:]
    view = common.class_view(args.cache_dir, {"train": TRAIN, "test": TEST}, chosen)
    classnames = common.default_classnames(TRAIN, args.classnames)
    flags = [*common.cli_args(args), "--data", str(view["train"]), "--test-data", str(view["test"]),
             "--subsample", "base", "--shots", str(args.shots), "--val-shots", "0", "--test-per-class", "0"]
    if classnames:
        flags += ["--classnames", str(classnames)]
    sets = evaluation_sets(args, base)
    runs_root = args.cache_dir / "runs" / f"transfer-{common._digest(flags)}"
    log.info("%d base / %d new classes, methods %s, seeds %s; runs under %s", len(base), len(new),
             ", ".join(methods), args.seeds, runs_root)
    runs = []
    for method in methods:
        for seed in args.seeds:
            run_dir = runs_root / method / f"seed{seed}"
            out = common.run_method(method, seed, run_dir, flags, args.fresh, lrs)
            m = out["metrics"]
            scores = {name: evaluate_run(run_dir, name, folder, names) for name, (folder, names) in sets.items()}
            dg = [v for k, v in scores.items() if k.startswith("dg-")]
            cross = [v for k, v in scores.items() if k.startswith("cross-")]
            runs.append({"method": method, "seed": seed, "base": m.get("base_top1"), "new": m.get("new_top1"), **scores,
                         "dg_mean": sum(dg) / len(dg), "cross_mean": sum(cross) / len(cross),
                         "seconds_per_step": seconds_per_step(run_dir, m),
                         "trainable_parameters": m.get("trainable_parameters"), "seconds": out["seconds"],
                         "reused": out["reused"], "run_dir": str(run_dir), "argv": out["argv"]})
    name = "transfer" + (f"_{args.tag}" if args.tag else "")
    result = {"benchmark": "transfer", "name": name, "command": command,
              "settings": {"model": args.model, "pretrained": args.pretrained, "shots": args.shots,
                           "epochs": args.epochs, "batch_size": args.batch_size, "seeds": args.seeds,
                           "methods": methods, "limit_classes": args.limit_classes, "extra": args.extra,
                           "lrs": {"file": str(args.lrs) if args.lrs else None, "overrides": args.lr or [],
                                   "chosen": lrs}},
              "classes": {"base": base, "new": new}, "dropped_classes": missing,
              "sets": {k: {"folder": str(v[0]), "classnames": str(v[1]) if v[1] else None} for k, v in sets.items()},
              "method_flags": {m: common.method_flags(m, lrs) for m in methods}, "runs": runs,
              "summary": summarize(runs, methods, list(sets)), "wall_seconds": time.time() - started,
              "environment": common.environment()}
    common.write_outputs(result, args.out, name, markdown, chart)
    return result


if __name__ == "__main__":
    common.entry_point(main)
