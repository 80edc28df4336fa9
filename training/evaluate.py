"""Evaluate a training run (or zero-shot CLIP) on a folder of labelled images.

    python -m training.evaluate --run RUN_DIR --data DIR [--subsample new] [--classnames FILE]
    python -m training.evaluate --model ViT-B-16 --pretrained openai --data DIR      # zero-shot

The classifier is built over the evaluated data's classes, so a run trained on base
classes can be scored on new classes (base-to-new) or on another dataset (cross-dataset):
the adapted image and text towers are kept, and the class embeddings come from the new
class names.  A TaskRes residual belongs to its training classes and is only applied
when the evaluated classes are exactly those.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

import orthserve
from orthserve import cli
from orthserve.files import atomic_text
from orthserve.prompts import DEFAULT_TEMPLATES
from orthserve.preprocess import PreprocessSpec
from orthserve.runs import RunInfo, load_base_model, load_run

from .data import SUBSAMPLES, DataError, EvalImages, LabelledSet, load_labelled, per_class

log = logging.getLogger("training.evaluate")


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


@torch.no_grad()
def evaluate_classifier(classifier: orthserve.CLIPClassifier, dataset: LabelledSet, spec: PreprocessSpec,
                        device: torch.device, batch_size: int = 64, workers: int = 0,
                        autocast=nullcontext, progress: bool | None = None, desc: str = "eval") -> dict:
    """Top-1 accuracy, mean loss and confusion matrix; unreadable images are skipped and counted."""
    from tqdm import tqdm

    classifier.eval()
    classes = len(dataset.classes)
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    loss_sum, skipped = 0.0, 0
    loader = DataLoader(EvalImages(dataset, spec), batch_size=batch_size, shuffle=False, num_workers=workers)
    bar = tqdm(loader, desc=desc, leave=False, disable=None if progress is None else not progress)
    for pixels, labels, ok in bar:
        skipped += int((~ok).sum())
        if not ok.any():
            continue
        pixels, labels = pixels[ok].to(device), labels[ok].to(device)
        with autocast():
            logits = classifier(pixels).float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        predicted = logits.argmax(dim=-1)
        confusion.index_put_((labels.cpu(), predicted.cpu()), torch.ones_like(labels.cpu()), accumulate=True)
    total = int(confusion.sum())
    if skipped:
        log.warning("skipped %d unreadable or corrupt image(s) out of %d during %s", skipped, len(dataset.samples), desc)
    if total == 0:
        raise DataError(f"no readable images to evaluate ({skipped} unreadable)")
    return {"top1": float(confusion.diag().sum()) / total, "loss": loss_sum / total, "images": total,
            "skipped": skipped, "confusion": confusion.tolist()}


def classifier_for(classifier: orthserve.CLIPClassifier, tokenizer, classnames: list[str]) -> orthserve.CLIPClassifier:
    """The same (adapted) CLIP over other class names; TaskRes kept only for identical classes."""
    if list(classnames) == classifier.classnames:
        return classifier
    if classifier.taskres is not None:
        log.warning("TaskRes residual belongs to the %d training classes; evaluating the other classes without it",
                    len(classifier.classnames))
    device = classifier.prompt_tokens.device
    return orthserve.CLIPClassifier(classifier.model, tokenizer, classnames, classifier.templates).to(device).eval()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--run", help="RUN_DIR written by training.finetune; omit for zero-shot with --model")
    p.add_argument("--model", help="model name for zero-shot evaluation (with --run: must match the run's model)")
    p.add_argument("--pretrained", default=None, help="weights for zero-shot evaluation: open_clip tag, file, "
                   "'default' (orthserve-mini's, its default) or 'none' (random); required for other models")
    p.add_argument("--data", required=True, help="ImageFolder directory or CSV manifest (path,label)")
    p.add_argument("--classnames", help="class-names file, '<folder> <readable name>' per line (docs/CLASSNAMES.md); default: folder names, '_' as space")
    p.add_argument("--subsample", default="all", choices=SUBSAMPLES, help="evaluate all classes, the base half or the new half")
    p.add_argument("--template", action="append", help="prompt template(s) for zero-shot (default: 'a photo of a {}.'); "
                   "runs use their own templates")
    p.add_argument("--per-class", type=int, default=0, help="evaluate at most N images per class (0: all)")
    p.add_argument("--seed", type=int, default=1, help="seed for --per-class sampling and random base weights")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", help="metrics JSON path (default: RUN_DIR/eval-<data name>-<subsample>.json, "
                   "or stdout only for zero-shot)")
    cli.add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.run:
        info = RunInfo.read(args.run)
        if args.model and args.model != info.model:
            raise DataError(f"{args.run} was trained with model {info.model!r}, not {args.model!r}")
        classifier, info = load_run(args.run, device)
        tokenizer = orthserve.get_tokenizer(info.model)
        spec = PreprocessSpec.from_dict(info.preprocess) if info.preprocess else PreprocessSpec.from_model(classifier.model)
        source = {"run": str(args.run), "model": info.model, "pretrained": info.pretrained, "method": info.method}
    else:
        if not args.model:
            raise SystemExit("give --run RUN_DIR, or --model (and --pretrained) for zero-shot evaluation")
        args.pretrained = orthserve.resolve_pretrained(args.model, args.pretrained)
        cli.warn_random_weights(args.pretrained, log)
        model, _, tokenizer = load_base_model(args.model, args.pretrained, args.seed, device)
        classifier = None
        spec = PreprocessSpec.from_model(model)
        source = {"run": None, "model": args.model, "pretrained": args.pretrained, "method": "zeroshot"}
    data = load_labelled(args.data, args.classnames, args.subsample)
    if args.per_class > 0:
        data, _ = per_class(data, args.per_class, args.seed)
    if classifier is None:
        classifier = orthserve.CLIPClassifier(model, tokenizer, data.classnames,
                                              args.template or list(DEFAULT_TEMPLATES)).to(device)
    else:
        classifier = classifier_for(classifier, tokenizer, data.classnames)
    result = evaluate_classifier(classifier, data, spec, device, args.batch_size, args.workers, desc="evaluate")
    metrics = {**source, "data": str(args.data), "subsample": args.subsample, "classes": data.classnames, **result}
    text = json.dumps(metrics, indent=2)
    out = args.out or (Path(args.run) / f"eval-{Path(args.data).stem}-{args.subsample}.json" if args.run else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_text(out, text)
        log.info("wrote %s", out)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("confusion", "classes")}, indent=2))
    return metrics


def console(prog: str = "orthserve-evaluate") -> None:
    """The ``orthserve-evaluate`` console script; ``python -m training.evaluate`` from the repo root."""
    cli.run(main, prog)


if __name__ == "__main__":
    console("training.evaluate")
