"""Base-to-new generalization benchmark (CoOp protocol) on a domain-shifted Tiny-ImageNet.

    python bench/base_to_new.py --lrs bench/results/lr_sweep.json   # all 200 classes, 2 epochs (~75 min, 2 cores)
    python bench/base_to_new.py --limit-classes 12                  # quick: 6 base / 6 new classes (~8 min)
    python bench/base_to_new.py --epochs 10                         # CoOp's schedule (~5 h here)
    python bench/base_to_new.py --model ViT-B-16 --pretrained openai \\
        --data-train ~/data/imagenet/train --data-test ~/data/imagenet/val --classnames ~/data/imagenet/classnames.txt

Task.  Tiny-ImageNet images without their colour (style ``gray``, see ``bench/common.py``;
``--style edges`` renders edge drawings instead), so zero-shot is not already the answer:
orthserve-mini was pretrained on the colour photos of these classes and loses most of its
zero-shot accuracy on gray ones (docs/BENCHMARKS.md).  Few-shot sets come from ``tiny-imagenet/train`` (rendered), test images from
``tiny-imagenet/val`` (rendered).  The rendering is done once per class into the cache
(``~/.cache/orthserve/bench/styled/...``), an ImageFolder the training CLI reads as is.

Classes.  Only classes present in both the train and the test folder are used (Tiny-ImageNet
here: 202 train classes, 200 in val; n02480855 and n10148035 have no val images and are dropped),
optionally ``--limit-classes N`` of them evenly spaced over the sorted list.  They split as the
training CLI does: base = first ceil(n/2) sorted classes, new = the rest.

Per (method, seed): ``python -m training.finetune --subsample base --shots K --seed S
--data <train view> --test-data <test view> --val-shots 0 --test-per-class 0`` (run in process);
its metrics.json gives base top-1 (base test images, base classifier), new top-1 (new test
images, a classifier over the new class names with the adapted towers) and their harmonic mean.
No per-epoch validation (nothing is selected on it); every test image of the kept classes is scored.

Outputs: ``--out``/base_to_new.md (table + the command), .json (every run), .png (chart).
Run folders (adapters, metrics, curves) go to the cache, and finished runs with identical
flags are reused, so an interrupted benchmark continues where it stopped (``--fresh`` retrains).
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
from common import DATA, METHOD_LABELS, REPO, fmt, log, mean_std  # noqa: E402

SCRIPT = "bench/base_to_new.py"
DEFAULT_TRAIN = DATA / "tiny-imagenet" / "train"
DEFAULT_TEST = DATA / "tiny-imagenet" / "val"
# The built-in task's default: every class (100 base / 100 new), 16 shots, 2 epochs (100 steps of 32):
# about 75 minutes for 9 methods x 3 seeds on the project's 2-core CPU (docs/BENCHMARKS.md).
DEFAULT_LIMIT_CLASSES = 0
DEFAULT_EPOCHS = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python {SCRIPT}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-train", type=Path, default=None,
                   help=f"ImageFolder for the few-shot sets (default {DEFAULT_TRAIN}, rendered with --style gray; "
                        f"every class and --epochs {DEFAULT_EPOCHS} unless given; "
                        "with your own folder: every class and 10 epochs unless given)")
    p.add_argument("--data-test", type=Path, default=None,
                   help=f"ImageFolder for testing, same class folders (default {DEFAULT_TEST})")
    p.add_argument("--style", choices=common.STYLE_CHOICES, default=None,
                   help=f"style transform of train and test images (default: {common.DEFAULT_STYLE} for the built-in Tiny-ImageNet, "
                        "none for --data-train/--data-test folders)")
    p.add_argument("--shots", type=int, default=16, help="training images per base class (default 16)")
    common.add_common_options(p, default_methods=common.PAPER_METHODS, default_epochs=None,
                              default_out=REPO / "bench" / "results")
    p.set_defaults(limit_classes=None)
    return p


def resolve_defaults(args) -> None:
    """2 epochs is the built-in Tiny-ImageNet task's default (what fits this CPU); with the user's own
    folders (--data-train) the training CLI's 10 epochs, unless given."""
    builtin = args.data_train is None
    if args.limit_classes is None:
        args.limit_classes = DEFAULT_LIMIT_CLASSES
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS if builtin else 10


def prepare(args) -> dict:
    """Resolve data folders, the style, the class list and the views the CLI will read."""
    builtin = args.data_train is None and args.data_test is None
    train_root = args.data_train or DEFAULT_TRAIN
    test_root = args.data_test or (DEFAULT_TEST if args.data_train is None else None)
    if test_root is None:
        raise SystemExit("error: give --data-test with --data-train (the base-to-new protocol tests on separate images)")
    style = args.style or (common.DEFAULT_STYLE if builtin else "none")
    classes, missing = common.common_classes(train_root, test_root)
    if missing:
        log.warning("%d training class(es) have no test folder and are left out: %s", len(missing), ", ".join(missing))
    chosen = common.limit_classes(classes, args.limit_classes)
    if len(chosen) < 2:
        raise SystemExit("error: base-to-new needs at least 2 classes")
    if style != "none":
        train_root = common.styled_copy(train_root, chosen, style, args.cache_dir)
        test_root = common.styled_copy(test_root, chosen, style, args.cache_dir)
    view = common.class_view(args.cache_dir, {"train": train_root, "test": test_root}, chosen)
    classnames = common.default_classnames(args.data_train or DEFAULT_TRAIN, args.classnames)
    half = math.ceil(len(chosen) / 2)
    return {"train": view["train"], "test": view["test"], "style": style, "classnames": classnames,
            "classes": chosen, "base": chosen[:half], "new": chosen[half:], "dropped": missing,
            "source_train": str(args.data_train or DEFAULT_TRAIN), "source_test": str(test_root if style == "none"
                                                                                         else (args.data_test or DEFAULT_TEST))}


def summarize(runs: list[dict], methods: Sequence[str]) -> dict:
    summary = {}
    for method in methods:
        rows = [r for r in runs if r["method"] == method]
        base, new = mean_std([r["base_top1"] for r in rows]), mean_std([r["new_top1"] for r in rows])
        hm_of_means = (0.0 if not base["mean"] and not new["mean"] else
                       2 * base["mean"] * new["mean"] / (base["mean"] + new["mean"])) if base["n"] else None
        summary[method] = {"base": base, "new": new, "hm": {**mean_std([r["harmonic_mean"] for r in rows]),
                                                             "of_means": hm_of_means},
                           "seconds": mean_std([r["seconds"] for r in rows if r["seconds"] is not None])}
    return summary


def markdown(result: dict) -> str:
    s, summary = result["settings"], result["summary"]
    zs = summary.get("zeroshot")
    lines = [f"# Base-to-new generalization: {s['model']} ({s['pretrained']}), {s['shots']}-shot",
             "",
             f"Reproduce: `{result['command']}`",
             "",
             f"Data: train `{s['source_train']}`, test `{s['source_test']}`, style `{s['style']}`; "
             f"{len(result['classes']['base'])} base / {len(result['classes']['new'])} new classes "
             f"(first half of the sorted list = base); {s['epochs']} epochs, batch {s['batch_size']}; "
             f"seeds {', '.join(map(str, s['seeds']))}. Top-1 in %, mean ± sample std over seeds; "
             "HM = harmonic mean of the mean base and mean new top-1 (CoOp), ± the std of the per-seed HM.",
             ""]
    if result["dropped_classes"]:
        lines += [f"Classes without test images, left out: {', '.join(result['dropped_classes'])}.", ""]
    header = "| method | base | new | HM | "
    if zs:
        header += "Δbase vs zero-shot | Δnew vs zero-shot | "
    lines += [header + "s / run |", "|" + "---|" + "---:|" * (header.count("|") - 1)]
    for method, row in summary.items():
        hm = row["hm"]
        hm_text = "n/a" if hm["of_means"] is None else (f"{hm['of_means'] * 100:.1f}" +
                                                        (f" ± {hm['std'] * 100:.1f}" if hm["std"] is not None else ""))
        cells = [METHOD_LABELS[method], fmt(row["base"]), fmt(row["new"]), hm_text]
        if zs:
            cells += [f"{(row[k]['mean'] - zs[k]['mean']) * 100:+.1f}" if row[k]["mean"] is not None else "n/a"
                      for k in ("base", "new")]
        secs = row["seconds"]["mean"]
        cells.append("n/a" if secs is None else f"{secs:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += common.report_footer(result, "base_to_new")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    plt = common.pyplot()
    summary = result["summary"]
    methods = list(summary)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(methods) + 2), 4.5))
    width = 0.27
    for offset, (key, label) in enumerate((("base", "base"), ("new", "new"), ("hm", "HM"))):
        means = [(summary[m][key]["of_means"] if key == "hm" else summary[m][key]["mean"]) or 0.0 for m in methods]
        errs = [summary[m][key]["std"] or 0.0 for m in methods]
        xs = [i + (offset - 1) * width for i in range(len(methods))]
        ax.bar(xs, [v * 100 for v in means], width, yerr=[e * 100 for e in errs], capsize=3, label=label)
    if "zeroshot" in summary and summary["zeroshot"]["new"]["mean"] is not None:
        ax.axhline(summary["zeroshot"]["new"]["mean"] * 100, color="gray", linestyle="--", linewidth=1,
                   label="zero-shot new")
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    s = result["settings"]
    ax.set(ylabel="top-1 (%)", title=f"base-to-new, {s['model']} ({s['pretrained']}), {s['shots']}-shot, "
                                     f"{len(result['classes']['base'])}+{len(result['classes']['new'])} classes")
    common.finish_chart(fig, ax, path, legend_size=8, grid_axis="y")


def main(argv: Sequence[str] | None = None) -> dict:
    common.setup_logging()
    args = build_parser().parse_args(argv)
    resolve_defaults(args)
    methods = common.check_methods(args.methods)
    command = common.command_line(SCRIPT, argv)
    lrs = common.learning_rates(args)
    started = time.time()
    data = prepare(args)
    flags = [*common.cli_args(args), "--data", str(data["train"]), "--test-data", str(data["test"]),
             "--subsample", "base", "--shots", str(args.shots), "--val-shots", "0", "--test-per-class", "0"]
    if data["classnames"]:
        flags += ["--classnames", str(data["classnames"])]
    runs_root = args.cache_dir / "runs" / f"base_to_new-{common._digest(flags)}"
    log.info("%d classes (%d base / %d new), methods %s, seeds %s; runs under %s", len(data["classes"]),
             len(data["base"]), len(data["new"]), ", ".join(methods), args.seeds, runs_root)
    runs = []
    for method in methods:
        for seed in args.seeds:
            out = common.run_method(method, seed, runs_root / method / f"seed{seed}", flags, args.fresh, lrs)
            m = out["metrics"]
            runs.append({"method": method, "seed": seed, "base_top1": m.get("base_top1"), "new_top1": m.get("new_top1"),
                         "harmonic_mean": m.get("harmonic_mean"), "steps": m.get("steps"), "seconds": out["seconds"],
                         "reused": out["reused"], "run_dir": str(runs_root / method / f"seed{seed}"),
                         "argv": out["argv"], "notes": m.get("notes", [])})
    result = {"benchmark": "base_to_new", "command": command,
              "settings": {"model": args.model, "pretrained": args.pretrained, "shots": args.shots,
                           "epochs": args.epochs, "batch_size": args.batch_size, "seeds": args.seeds,
                           "methods": methods, "style": data["style"], "limit_classes": args.limit_classes,
                           "source_train": data["source_train"], "source_test": data["source_test"],
                           "classnames": data["classnames"], "extra": args.extra,
                           "lrs": {"file": str(args.lrs) if args.lrs else None, "overrides": args.lr or [],
                                   "chosen": lrs}},
              "classes": {"base": data["base"], "new": data["new"]}, "dropped_classes": data["dropped"],
              "method_flags": {m: common.method_flags(m, lrs) for m in methods}, "runs": runs,
              "summary": summarize(runs, methods), "wall_seconds": time.time() - started,
              "environment": common.environment()}
    common.write_outputs(result, args.out, "base_to_new", markdown, chart)
    return result


if __name__ == "__main__":
    common.entry_point(main)
