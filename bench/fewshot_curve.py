"""Few-shot curve: top-1 against shots per class, for each method, on flowers5.

    python bench/fewshot_curve.py                                  # flowers5, 1 2 4 8 16 shots, 3 seeds, all methods
    python bench/fewshot_curve.py --shots 1 4 16 --methods zeroshot lora orthcr-reg-cutout
    python bench/fewshot_curve.py --model ViT-B-16 --pretrained openai --data-train ~/data/eurosat/train \\
        --data-test ~/data/eurosat/test --classnames ~/data/eurosat/classnames.txt

flowers5 (daisy, dandelion, rose, sunflower, tulip; none is a Tiny-ImageNet class, so none was
seen in orthserve-mini's pretraining) is one folder: per (shots, seed) the training CLI draws
the K shots, and the test images are ``--test-per-class`` (default 100) per class held out of
the same folder, disjoint from the shots (the CLI's own protocol).  With ``--data-test`` the
whole test folder is scored instead.  All classes are trained and tested (``--subsample all``);
no per-epoch validation.  Style transform: none unless ``--style gray`` or ``edges``.

Outputs: ``--out``/fewshot_curve.md (table + the command), .json (every run), .png (curves).
Run folders go to the cache and finished identical runs are reused (``--fresh`` retrains).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py: shared helpers)
from common import DATA, METHOD_LABELS, REPO, fmt, log, mean_std  # noqa: E402

SCRIPT = "bench/fewshot_curve.py"
DEFAULT_DATA = DATA / "flowers5"
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_EPOCHS = 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python {SCRIPT}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-train", type=Path, default=DEFAULT_DATA, help=f"ImageFolder (default {DEFAULT_DATA})")
    p.add_argument("--data-test", type=Path, default=None,
                   help="ImageFolder for testing (default: --test-per-class images per class held out of --data-train)")
    p.add_argument("--test-per-class", type=int, default=100, help="held-out test images per class (default 100)")
    p.add_argument("--style", choices=common.STYLE_CHOICES, default="none", help="style transform (default none)")
    p.add_argument("--shots", type=int, nargs="+", default=list(DEFAULT_SHOTS), help="shots per class (default 1 2 4 8 16)")
    common.add_common_options(p, default_methods=common.PAPER_METHODS, default_epochs=DEFAULT_EPOCHS,
                              default_out=REPO / "bench" / "results")
    return p


def prepare(args) -> dict:
    classes, missing = common.common_classes(args.data_train, args.data_test)
    if missing:
        log.warning("%d training class(es) have no test folder and are left out: %s", len(missing), ", ".join(missing))
    chosen = common.limit_classes(classes, args.limit_classes)
    roots = {"train": args.data_train}
    if args.data_test is not None:
        roots["test"] = args.data_test
    if args.style != "none":
        roots = {k: common.styled_copy(v, chosen, args.style, args.cache_dir) for k, v in roots.items()}
    view = common.class_view(args.cache_dir, roots, chosen)
    classnames = common.default_classnames(args.data_train, args.classnames)
    return {"view": view, "classes": chosen, "dropped": missing, "classnames": classnames}


def markdown(result: dict) -> str:
    s, summary, shots = result["settings"], result["summary"], result["settings"]["shots"]
    lines = [f"# Few-shot curve: {s['model']} ({s['pretrained']}) on {Path(s['data_train']).name}",
             "",
             f"Reproduce: `{result['command']}`",
             "",
             f"{len(result['classes'])} classes ({', '.join(result['classes'])}); "
             + (f"test: `{s['data_test']}`" if s["data_test"] else
                f"test: {s['test_per_class']} images per class held out of the training folder, disjoint from the shots")
             + f"; style `{s['style']}`; {s['epochs']} epochs, batch {s['batch_size']}; "
             f"seeds {', '.join(map(str, s['seeds']))}. Top-1 in %, mean ± sample std over seeds.",
             "",
             "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |",
             "|---|" + "---:|" * len(shots)]
    for method, row in summary.items():
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(fmt(row[str(k)]) for k in shots) + " |")
    lines += common.report_footer(result, "fewshot_curve")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    plt = common.pyplot()
    shots = result["settings"]["shots"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, row in result["summary"].items():
        means = [(row[str(k)]["mean"] or 0) * 100 for k in shots]
        errs = [(row[str(k)]["std"] or 0) * 100 for k in shots]
        ax.errorbar(shots, means, yerr=errs, marker="o", capsize=3, label=method,
                    linestyle="--" if method == "zeroshot" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    s = result["settings"]
    ax.set(xlabel="shots per class", ylabel="top-1 (%)",
           title=f"few-shot curve, {s['model']} ({s['pretrained']}), {Path(s['data_train']).name}")
    common.finish_chart(fig, ax, path)


def main(argv: Sequence[str] | None = None) -> dict:
    common.setup_logging()
    args = build_parser().parse_args(argv)
    methods = common.check_methods(args.methods)
    command = common.command_line(SCRIPT, argv)
    lrs = common.learning_rates(args)
    started = time.time()
    data = prepare(args)
    flags = [*common.cli_args(args), "--data", str(data["view"]["train"]), "--subsample", "all", "--val-shots", "0",
             "--test-per-class", str(args.test_per_class)]
    if "test" in data["view"]:
        flags += ["--test-data", str(data["view"]["test"])]
    if data["classnames"]:
        flags += ["--classnames", str(data["classnames"])]
    runs_root = args.cache_dir / "runs" / f"fewshot_curve-{common._digest(flags)}"
    log.info("%d classes, shots %s, methods %s, seeds %s; runs under %s", len(data["classes"]), args.shots,
             ", ".join(methods), args.seeds, runs_root)
    runs = []
    for shots in args.shots:
        for method in methods:
            for seed in args.seeds:
                run_dir = runs_root / f"{shots}shot" / method / f"seed{seed}"
                out = common.run_method(method, seed, run_dir, [*flags, "--shots", str(shots)], args.fresh, lrs)
                m = out["metrics"]
                runs.append({"method": method, "shots": shots, "seed": seed, "top1": m.get("test", {}).get("top1"),
                             "test_images": m.get("test", {}).get("images"), "steps": m.get("steps"),
                             "seconds": out["seconds"], "reused": out["reused"], "run_dir": str(run_dir),
                             "argv": out["argv"], "notes": m.get("notes", [])})
    summary = {m: {str(k): mean_std([r["top1"] for r in runs if r["method"] == m and r["shots"] == k])
                   for k in args.shots} for m in methods}
    result = {"benchmark": "fewshot_curve", "command": command,
              "settings": {"model": args.model, "pretrained": args.pretrained, "shots": args.shots,
                           "epochs": args.epochs, "batch_size": args.batch_size, "seeds": args.seeds,
                           "methods": methods, "style": args.style, "data_train": str(args.data_train),
                           "data_test": str(args.data_test) if args.data_test else None,
                           "test_per_class": args.test_per_class, "classnames": data["classnames"],
                           "limit_classes": args.limit_classes, "extra": args.extra,
                           "lrs": {"file": str(args.lrs) if args.lrs else None, "overrides": args.lr or [],
                                   "chosen": lrs}},
              "classes": data["classes"], "dropped_classes": data["dropped"],
              "method_flags": {m: common.method_flags(m, lrs) for m in methods}, "runs": runs, "summary": summary,
              "wall_seconds": time.time() - started, "environment": common.environment()}
    common.write_outputs(result, args.out, "fewshot_curve", markdown, chart)
    return result


if __name__ == "__main__":
    common.entry_point(main)
