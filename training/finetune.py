"""Few-shot adaptation of a CLIP model: ``python -m training.finetune --data DIR --out RUN_DIR``.

Methods (all built on :mod:`orthserve`'s adapters; every adapter starts as the identity,
so step 0 is zero-shot CLIP):

  zeroshot        no training; evaluates and writes a run (prompt ensemble only)
  taskres         TaskRes residual on the class embeddings; cross-entropy
  lora            LoRA on q/k/v of every attention block (CLIP-LoRA recipe); cross-entropy
  aoft            Householder-generated low-rank adapter (AOFT); cross-entropy
  orthcr          block-orthogonal W -> W R on the FFN linears of both towers, OrthCR objective:
                  CE(x) + CE(cutout(x)) + lambda1 KL(frozen(x)||adapted(x)) + lambda2 KL(frozen(xc)||adapted(xc))
  orthcr+taskres  both adapters, OrthCR objective
  full            every CLIP weight except the logit scale; cross-entropy

Options may also come from a YAML file (``--config run.yaml``; keys are the long option
names, with '-' or '_'); flags given on the command line override it.

RUN_DIR receives adapter.safetensors, run.json, metrics.json, log.csv, curves.png,
confusion.png (<= 50 classes) and checkpoint.pt (for --resume).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

import orthserve
from orthserve import cli
from orthserve.adapters import ATTENTION_TARGETS, FFN_TARGETS, AdapterConfig
from orthserve.prompts import DEFAULT_TEMPLATES
from orthserve.preprocess import PreprocessSpec
from orthserve.runs import RunInfo, load_base_model

from . import distributed
from .data import (SUBSAMPLES, DataError, LabelledSet, TrainImages, drop_unreadable, few_shot, load_labelled,
                   per_class, subsample_classes)
from .evaluate import classifier_for, evaluate_classifier, harmonic_mean
from .distributed import Processes, ShardedEpochSampler
from .objective import CUTOUT_MODES, CrossEntropyObjective, OrthCRConfig, OrthCRObjective
from .rundir import CHECKPOINT, RunDir, git_commit, rng_state, set_rng_state, versions

log = logging.getLogger("training.finetune")
METHODS = ("zeroshot", "taskres", "lora", "aoft", "orthcr", "orthcr+taskres", "full")
DEFAULT_LR = {"taskres": 2e-3, "lora": 2e-4, "aoft": 1e-3, "orthcr": 2e-4, "orthcr+taskres": 2e-4, "full": 1e-5}


# --------------------------------------------------------------------------- options

def default_workers() -> int:
    """Decoding and augmenting 224 px JPEGs runs at a few hundred images/s per process (about 400 here), and
    one H200 trains ViT-B-16 with LoRA at about 2,000 images/s eager: on a GPU machine use every CPU but the
    training loop's, up to 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(16 if torch.cuda.is_available() else 4, cpus - 1 if cpus > 2 else cpus))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.finetune", description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--config", help="YAML file of options (long names as keys); command-line flags override it")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="orthserve-mini", help="open_clip name (e.g. ViT-B-16), hf-hub:ORG/REPO, "
                   "orthserve-mini (built in, offline), orthserve-tiny or a JSON config path")
    g.add_argument("--pretrained", default=None, help="open_clip tag (e.g. openai), checkpoint file, 'default' "
                   "(orthserve-mini's embedded weights, its default) or 'none' (random weights drawn from --seed); "
                   "required for other models")
    g.add_argument("--template", action="append", help=f"prompt template, repeatable; several are averaged "
                   f"(default: {DEFAULT_TEMPLATES[0]!r})")
    g = p.add_argument_group("data (CoOp few-shot protocol)")
    g.add_argument("--data", help="ImageFolder directory (one sub-folder per class) or CSV manifest 'path,label'")
    g.add_argument("--classnames", help="class-names file, '<folder> <readable name>' per line (docs/CLASSNAMES.md); default: folder names with '_' as space")
    g.add_argument("--shots", type=int, default=16, help="training images per class, drawn with --seed (0: all images)")
    g.add_argument("--seed", type=int, default=1, help="seed for shot sampling, augmentation, Cutout, init")
    g.add_argument("--subsample", default="all", choices=SUBSAMPLES,
                   help="train on all classes, the base half (first ceil(n/2) sorted classes) or the new half; "
                        "with 'base', test accuracy is also reported on the new classes and their harmonic mean")
    g.add_argument("--val-data", help="validation folder/CSV (default: --val-shots per class held out of --data)")
    g.add_argument("--test-data", help="test folder/CSV (default: --test-per-class per class held out of --data)")
    g.add_argument("--val-shots", type=int, default=None, help="held-out validation images per class (default: min(shots, 4), raised so that "
                   f"there are at least {MIN_VALIDATION_IMAGES} in all)")
    g.add_argument("--test-per-class", type=int, default=100, help="held-out test images per class (0: all left over)")
    g.add_argument("--workers", type=int, default=default_workers(), help="data-loading processes (0: in process); "
                   "they persist across epochs")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="orthcr", help=f"one of {', '.join(METHODS)}")
    g.add_argument("--objective", default="auto", choices=("auto", "ce", "orthcr"),
                   help="auto: orthcr for orthcr methods, ce (cross-entropy) otherwise")
    g.add_argument("--targets", action="append", help="regular expression(s) over module names to adapt "
                   f"(default: FFN linears {list(FFN_TARGETS)} for orthcr, attention {list(ATTENTION_TARGETS)} for lora/aoft)")
    g.add_argument("--blocks", type=int, default=None, help="orthcr: diagonal blocks per rotation (default 4)")
    g.add_argument("--block-size", type=int, default=None, help="orthcr: block side instead of --blocks")
    g.add_argument("--cayley", default="exact", choices=("exact", "neumann"), help="orthcr: Cayley transform")
    g.add_argument("--neumann-terms", type=int, default=5, help="orthcr: terms of the Neumann series")
    g.add_argument("--max-norm", type=float, default=None, help="orthcr: bound on |Q|_F (constrained variant)")
    g.add_argument("--rank", type=int, default=None, help="lora/aoft rank (default 2 for lora, 4 for aoft)")
    g.add_argument("--alpha", type=float, default=1.0, help="lora scale alpha (delta scaled by alpha/sqrt(rank)); aoft scale")
    g.add_argument("--taskres-alpha", type=float, default=0.5, help="TaskRes residual scale")
    g.add_argument("--lambda1", type=float, default=1.5, help="OrthCR: weight of KL(frozen||adapted) on original views")
    g.add_argument("--lambda2", type=float, default=1.0, help="OrthCR: weight of KL(frozen||adapted) on Cutout views")
    g.add_argument("--cutout", default="random", choices=CUTOUT_MODES,
                   help="OrthCR Cutout views. random: a square (side --cutout-size x image side), centre uniform over "
                        "the image, clipped at the border, set to the mean colour. attentive: the square of patches "
                        "(side round(--cutout-size x grid)) whose frozen patch tokens are most similar to the "
                        "image's class text embedding is set to the mean colour. none: no masking")
    g.add_argument("--cutout-size", type=float, default=0.5, help="Cutout square side, fraction of the image side")
    g.add_argument("--cutout-prob", type=float, default=1.0, help="probability that an image is masked")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default per method: {DEFAULT_LR})")
    g.add_argument("--taskres-lr", type=float, default=DEFAULT_LR["taskres"],
                   help="learning rate of the TaskRes residual in orthcr+taskres (--lr applies to the rotations)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--epochs", type=int, default=10, help="training epochs")
    g.add_argument("--iters", type=int, default=None, help="training steps instead of --epochs")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps before the cosine decay "
                   "(default: 5%% of all steps)")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision on GPU (auto: bf16 where supported); CPU always runs fp32")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--eval-batch-size", type=int, default=128)
    g.add_argument("--compile", action="store_true", help="torch.compile the step's forward and loss (see docs/TRAINING.md)")
    g.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile mode; reduce-overhead adds CUDA graphs on GPU")
    g.add_argument("--log-every", type=int, default=25, metavar="STEPS",
                   help="read loss and accuracy from the device every STEPS steps (and at each epoch's end); "
                        "in between the step never waits for the device")
    cli.add_debug_flag(p)
    g = p.add_argument_group("run directory")
    g.add_argument("--out", help="RUN_DIR for the outputs and checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt (last complete epoch)")
    g.add_argument("--overwrite", action="store_true", help="start over in a RUN_DIR that already holds a run")
    g.add_argument("--checkpoint-every", type=int, default=1, metavar="EPOCHS",
                   help="write the resumable checkpoint (adapters, optimizer, schedule, RNG) every EPOCHS epochs and "
                        "after the last one; 0: never (nothing to --resume from, saves the write on large models)")
    g.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop (with a checkpoint) after this many epochs in this invocation; finish later with --resume")
    g.add_argument("--progress", default="auto", choices=("auto", "on", "off"), help="progress bars (auto: on a terminal)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags over YAML over defaults: the YAML sets the parser's defaults, then flags are parsed."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        import yaml

        path = Path(first.config)
        if not path.is_file():
            parser.error(f"config file {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            parser.error(f"config file {path} must be a mapping of option: value")
        known = {a.dest for a in parser._actions}
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"config file {path}: unknown option(s) {', '.join(unknown)}")
        for key in ("template", "targets"):
            if isinstance(values.get(key), str):
                values[key] = [values[key]]
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if args.method not in METHODS:
        parser.error(f"unknown --method {args.method!r}: use one of {', '.join(METHODS)}")
    if args.out is None:
        parser.error("--out RUN_DIR is required")
    if args.data is None:
        parser.error("--data DIR is required")
    if args.blocks is not None and args.block_size is not None:
        parser.error("give --blocks or --block-size, not both")
    if args.log_every < 1:
        parser.error(f"--log-every must be at least 1 step, not {args.log_every}")
    if args.objective == "auto":
        args.objective = "orthcr" if args.method.startswith("orthcr") else "ce"
    if args.objective == "orthcr" and args.method in ("full", "zeroshot"):
        parser.error(f"the OrthCR objective needs adapters to bypass; method {args.method!r} has none")
    args.lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.method, 0.0)
    args.templates = args.template or list(DEFAULT_TEMPLATES)
    args.pretrained = orthserve.resolve_pretrained(args.model, args.pretrained)
    return args


def adapter_configs(args: argparse.Namespace) -> list[AdapterConfig]:
    """``--method`` and its options -> the core library's adapter configs, in injection order."""
    targets = {"targets": tuple(args.targets)} if args.targets else {}
    configs: list[AdapterConfig] = []
    if args.method.startswith("orthcr"):
        shape = {"blocks": None, "block_size": args.block_size} if args.block_size else {"blocks": args.blocks or 4}
        configs.append(orthserve.OrthogonalConfig(**targets, **shape, cayley=args.cayley,
                                                  neumann_terms=args.neumann_terms, max_norm=args.max_norm))
    if args.method == "lora":
        configs.append(orthserve.LoRAConfig(**targets, rank=args.rank or 2, alpha=args.alpha))
    if args.method == "aoft":
        configs.append(orthserve.AOFTConfig(**targets, rank=args.rank or 4, alpha=args.alpha))
    if args.method in ("taskres", "orthcr+taskres"):
        configs.append(orthserve.TaskResConfig(alpha=args.taskres_alpha))
    return configs


# --------------------------------------------------------------------------- setup

def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def autocast_for(device: torch.device, precision: str):
    """Context factory and whether fp16 loss scaling is needed; CPU stays in fp32."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext, False
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return partial(torch.autocast, device_type="cuda", dtype=dtype), precision == "fp16"


def build_classifier(args, classnames: list[str], device: torch.device):
    """Base CLIP (random weights drawn from --seed when pretrained is none) + adapters."""
    model, _, tokenizer = load_base_model(args.model, args.pretrained, args.seed, "cpu")
    classifier = orthserve.CLIPClassifier(model, tokenizer, classnames, args.templates).to(device)
    configs = adapter_configs(args)
    for config in configs:
        orthserve.inject(classifier, config)
    if args.method == "full":
        for name, param in classifier.named_parameters():
            param.requires_grad_("logit_scale" not in name and "logit_bias" not in name)
    elif args.method == "zeroshot":
        for param in classifier.parameters():
            param.requires_grad_(False)
    return classifier, tokenizer, configs


MIN_VALIDATION_IMAGES = 200  # top-1 then moves in steps of 0.5%, not 5%


def default_val_shots(shots: int, classes: int) -> int:
    """Held-out validation images per class: as many as the shots (at most 4), and at least
    ``MIN_VALIDATION_IMAGES`` in all where the folder has them."""
    return max(min(max(shots, 1), 4), math.ceil(MIN_VALIDATION_IMAGES / max(classes, 1)))


def prepare_data(args) -> dict[str, LabelledSet | None]:
    """train / val / test (and new-class test for --subsample base), per the CoOp protocol."""
    everything = load_labelled(args.data, args.classnames, "all")
    data = load_labelled(args.data, args.classnames, args.subsample)
    train, rest = few_shot(data, args.shots, args.seed)
    train = drop_unreadable(train, "training")
    val_shots = args.val_shots if args.val_shots is not None else default_val_shots(args.shots, len(data.classes))
    if args.val_data:
        val = load_labelled(args.val_data, args.classnames, args.subsample)
    else:
        val, rest = per_class(rest, val_shots, args.seed + 1) if val_shots > 0 else (None, rest)
        val = val if val and val.samples else None
    if args.test_data:
        test = load_labelled(args.test_data, args.classnames, args.subsample)
        test_all = load_labelled(args.test_data, args.classnames, "all")
    else:
        test, _ = per_class(rest, args.test_per_class, args.seed + 2)
        test = test if test.samples else None
        test_all = everything
    for split, dataset in (("validation", val), ("test", test)):
        if dataset is not None and dataset.classes != train.classes:
            raise DataError(f"{split} data classes differ from the training classes "
                            f"({len(dataset.classes)} vs {len(train.classes)}, e.g. "
                            f"{sorted(set(dataset.classes) ^ set(train.classes))[:3]})")
    new = None
    if args.subsample == "base":
        new_classes = subsample_classes(test_all.classes, "new")
        if new_classes:
            new_all = load_labelled(args.test_data or args.data, args.classnames, "new")
            new, _ = per_class(new_all, args.test_per_class, args.seed + 2)
    return {"train": train, "val": val, "test": test, "new": new}


def trainable_parameters(classifier) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in classifier.named_parameters() if p.requires_grad}


def make_optimizer(groups: list[dict] | Any, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused implementation (one kernel over all tensors).  For OrthCR's 43M ViT-B-16
    parameters on this project's 2-core CPU: 0.15 s -> 0.03 s per step on a quiet machine, 3.1 s -> 0.39 s
    with another process on the cores; on GPU it is PyTorch's fastest AdamW as well."""
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)


def lr_lambda(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- the step

def train_step(classifier, objective, optimizer, scheduler, scaler, images, labels, autocast, grad_clip: float):
    """One optimization step; returns ``(loss, correct, parts)`` as device tensors, never waiting for the device.

    Forward under autocast (GPU), backward (fp16 loss scaling when needed), clip, step,
    advance the schedule.  The objective decides what "loss" means (CE or OrthCR).  Read the
    results at log intervals (:class:`DeviceSums`): a ``.item()`` here would stall a GPU every step.
    Run it inside ``orthserve.fast_rotations(classifier)`` (entered once for the run): orthogonal
    adapters then compute their rotations batched and rotate inputs where that is cheaper.
    """
    classifier.train()
    with autocast():
        loss, logits, parts = objective(classifier, images, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    correct = (logits.detach().argmax(dim=-1) == labels).sum()
    return loss.detach(), correct, {k: v.detach() for k, v in parts.items()}


class DeviceSums:
    """Per-step figures summed on the device; :meth:`means` reads them all in one host sync."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.images = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, parts: dict[str, torch.Tensor], images: int) -> None:
        for key, value in {"loss": loss * images, "acc": correct, **{k: v * images for k, v in parts.items()}}.items():
            self.sums[key] = self.sums[key] + value.float() if key in self.sums else value.float()
        self.images += images

    def means(self) -> dict[str, float]:
        """Means over every process's images (one all-reduce under torchrun)."""
        if not self.sums:
            return {}
        sums = list(self.sums.values())
        values = distributed.sum_across(torch.stack([*sums, torch.full_like(sums[0], self.images)]))
        *totals, images = values.tolist()  # the one sync
        return {k: v / max(images, 1) for k, v in zip(self.sums, totals)}


ORTHOGONALITY_TOLERANCE = 1e-5


def keep_orthogonal(classifier, cayley: str) -> None:
    """At a log interval: should the GPU's Newton-Schulz kernel not have converged (rotations far larger than
    runs reach: see orthserve/adapters/cayley.py), its R differs from the LU kernel's, and the run switches
    to LU, exact at any size, and says so. Nothing to compare (and no work) where LU is in use already."""
    if cayley == "exact":
        drift = orthserve.surgery.max_kernel_drift(classifier)
        if drift > ORTHOGONALITY_TOLERANCE and orthserve.surgery.set_cayley_kernel(classifier, "lu"):
            log.warning("the Newton-Schulz Cayley kernel is %.2g from the exact rotations (past its range); "
                        "computing them with the LU kernel from now on", drift)


def check_finite(means: dict[str, float], step: int) -> dict[str, float]:
    if not all(math.isfinite(v) for v in means.values()):
        raise FloatingPointError(f"loss became {means.get('loss')} by step {step}; lower --lr or use --precision fp32")
    return means


def compile_objective(objective, mode: str = "default"):
    """``torch.compile`` of the forward and loss (the backward follows through AOTAutograd). The Cutout
    randomness is drawn eagerly and passed in (dynamo cannot trace a ``torch.Generator``); the optimizer
    step stays eager (fused AdamW is one kernel already)."""
    compiled = torch.compile(objective.loss, mode=mode)
    return lambda classifier, images, labels: compiled(classifier, images, labels, objective.draws(images))


# --------------------------------------------------------------------------- run record

def hyper_parameters(args) -> dict:
    skip = {"config", "resume", "overwrite", "stop_after_epochs", "checkpoint_every", "progress", "out", "template"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def run_info(args, train: LabelledSet, configs, spec: PreprocessSpec, processes: Processes) -> RunInfo:
    """run.json: what export and evaluation need to rebuild the model, and how it was trained."""
    return RunInfo(model=args.model, pretrained=str(args.pretrained), method=args.method, classnames=train.classnames,
                   templates=args.templates, adapters=[c.to_dict() for c in configs], preprocess=spec.to_dict(),
                   seed=args.seed, extra={"hyper_parameters": hyper_parameters(args), "world_size": processes.world_size,
                                          "versions": versions(), "git_commit": git_commit(), "classes": train.classes,
                                          "train_images": ([s.path for s in train.samples]
                                                           if len(train.samples) <= 5000 else len(train.samples)),
                                          "data_notes": train.notes})


@torch.no_grad()
def zero_shot_row(classifier, tokenizer, splits: dict, evaluate) -> dict:
    """History row for epoch 0: the pretrained model (adapters bypassed) on validation, test and new classes."""
    row: dict[str, Any] = {"epoch": 0, "step": 0}
    with orthserve.bypass(classifier):
        if splits["val"] is not None:
            result = evaluate(classifier, splits["val"], desc="zero-shot validate")
            row.update(val_loss=result["loss"], val_acc=result["top1"], val_top1=result["top1"])
        if splits["test"] is not None:
            row["test_top1"] = evaluate(classifier, splits["test"], desc="zero-shot test")["top1"]
        if splits["new"] is not None:
            new = classifier_for(classifier, tokenizer, splits["new"].classnames)
            row["new_top1"] = evaluate(new, splits["new"], desc="zero-shot new classes")["top1"]
    return row


def final_metrics(args, classifier, tokenizer, splits: dict, evaluate, history: list[dict], step: int,
                  trainable: int, run: RunDir) -> dict:
    """metrics.json: test and new-class top-1 of the trained model, against epoch 0 (zero-shot)."""
    train = splits["train"]
    metrics: dict[str, Any] = {"model": args.model, "pretrained": args.pretrained, "method": args.method,
                               "objective": args.objective if args.method != "zeroshot" else None,
                               "shots": args.shots, "seed": args.seed, "subsample": args.subsample,
                               "steps": step, "epochs": history, "notes": train.notes, "trainable_parameters": trainable}
    if splits["test"] is not None:
        test = evaluate(classifier, splits["test"], desc="test")
        metrics["test"] = {k: v for k, v in test.items() if k != "confusion"}
        if len(train.classnames) <= 50:
            run.plot_confusion(test["confusion"], train.classnames)
        if args.subsample == "base":
            metrics["base_top1"] = test["top1"]
    if splits["new"] is not None:
        new = evaluate(classifier_for(classifier, tokenizer, splits["new"].classnames), splits["new"], desc="new classes")
        metrics["new"] = {k: v for k, v in new.items() if k != "confusion"}
        metrics["new_top1"] = new["top1"]
        if "base_top1" in metrics:
            metrics["harmonic_mean"] = harmonic_mean(metrics["base_top1"], metrics["new_top1"])
    final = {"test_top1": metrics.get("test", {}).get("top1"), "new_top1": metrics.get("new_top1")}
    baseline = history[0] if history and history[0]["epoch"] == 0 else ({**final} if args.method == "zeroshot" else {})
    metrics["zero_shot"] = {k: baseline.get(k) for k in ("val_top1", "test_top1", "new_top1")}
    metrics["gain"] = {k: final[k] - metrics["zero_shot"][k] for k in final
                       if final[k] is not None and metrics["zero_shot"][k] is not None}
    return metrics


# --------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> dict:
    """Train, evaluate and write RUN_DIR; returns the metrics written to metrics.json (in every process)."""
    args = parse_args(argv)
    processes, device = distributed.start(args.device)
    try:
        return train(args, processes, device or pick_device(args.device))
    finally:
        distributed.stop(processes)


def train(args: argparse.Namespace, processes: Processes, device: torch.device) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("training").setLevel(logging.INFO if processes.main else logging.WARNING)
    from tqdm import tqdm

    cli.warn_random_weights(args.pretrained, log)
    autocast, fp16 = autocast_for(device, args.precision)
    progress = {"auto": None, "on": True, "off": False}[args.progress] if processes.main else False

    # data, model and run directory: identical in every process (same seed, same few-shot draw)
    splits = prepare_data(args)
    train = splits["train"]
    run = RunDir(args.out)
    if processes.main:
        run.start(resume=args.resume, overwrite=args.overwrite,
                  expect={"model": args.model, "pretrained": str(args.pretrained), "method": args.method,
                          "classnames": train.classnames})
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    classifier, tokenizer, configs = build_classifier(args, train.classnames, device)
    spec = PreprocessSpec.from_model(classifier.model)
    info = run_info(args, train, configs, spec, processes)
    if processes.main:
        info.save(run.path)

    params = trainable_parameters(classifier)
    log.info("method %s: %d trainable parameters in %d tensors; %d training images, %d classes, device %s%s",
             args.method, sum(p.numel() for p in params.values()), len(params), len(train.samples),
             len(train.classes), device, f", {processes.world_size} processes" if processes.distributed else "")
    # Cutout draws on the device (no copy, no sync per step); each process its own stream, rank 0's = one process's
    cutout_rng = torch.Generator(device=device).manual_seed(args.seed + 1_000_003 * processes.rank)
    history: list[dict] = []
    step, start_epoch = 0, 0
    train_data = TrainImages(train, spec, args.seed)
    sampler = ShardedEpochSampler(len(train_data), args.seed, processes)
    steps_per_epoch = math.ceil(len(sampler) / args.batch_size)
    epochs = math.ceil(args.iters / steps_per_epoch) if args.iters else args.epochs
    total_steps = args.iters or epochs * steps_per_epoch
    evaluate = partial(evaluate_classifier, spec=spec, device=device, batch_size=args.eval_batch_size,
                       workers=args.workers, autocast=autocast, progress=progress)

    if args.method != "zeroshot" and params:
        if args.objective == "orthcr":
            objective = OrthCRObjective(classifier, OrthCRConfig(args.lambda1, args.lambda2, args.cutout,
                                                                 args.cutout_size, args.cutout_prob), cutout_rng)
        else:
            objective = CrossEntropyObjective()
        if args.compile:
            objective = compile_objective(objective, args.compile_mode)
        taskres_lr = args.taskres_lr if args.method == "orthcr+taskres" else args.lr
        groups = [{"params": [p for n, p in params.items() if not n.startswith("taskres.")], "lr": args.lr},
                  {"params": [p for n, p in params.items() if n.startswith("taskres.")], "lr": taskres_lr}]
        optimizer = make_optimizer([g for g in groups if g["params"]], args.weight_decay)
        warmup = args.warmup_steps if args.warmup_steps is not None else int(0.05 * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(lr_lambda, warmup=warmup, total=total_steps, floor=args.min_lr_ratio))
        scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        if args.resume:
            state = run.load_checkpoint(params, optimizer, scheduler)
            if len(state["rng"]) != processes.world_size:
                raise DataError(f"--resume: {run.path} was trained by {len(state['rng'])} process(es), this run has "
                                f"{processes.world_size}; resume with the same number (torchrun --nproc-per-node): "
                                "the global batch and the Cutout draws depend on it")
            scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"][processes.rank], cutout_rng)
            step, start_epoch, history = state["step"], state["epoch"], state["history"]
            log.info("resumed from %s at epoch %d, step %d", run.path / CHECKPOINT, start_epoch, step)
        if not history and processes.main:  # epoch 0: the pretrained model, what fine-tuning is measured against
            history.append(zero_shot_row(classifier, tokenizer, splits, evaluate))
            log.info("zero-shot (epoch 0): %s", ", ".join(f"{k} {v:.4g}" for k, v in history[0].items() if k != "epoch"))

        model = distributed.wrap(classifier, processes, device)  # what the step calls; `classifier` is inside it
        ran = 0
        loader = DataLoader(train_data, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                            pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                            prefetch_factor=4 if args.workers > 0 else None)
        with orthserve.fast_rotations(classifier):
            for epoch in range(start_epoch, epochs):
                if args.stop_after_epochs is not None and ran >= args.stop_after_epochs:
                    log.info("stopping after %d epoch(s) as asked; continue with --resume", ran)
                    return {"stopped_at_epoch": epoch, "step": step}
                sampler.set_epoch(epoch)
                sums = DeviceSums()
                began = time.time()
                bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=None if progress is None else not progress)
                for images, labels in bar:
                    if step >= total_steps:
                        break
                    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    sums.add(*train_step(model, objective, optimizer, scheduler, scaler, images, labels,
                                         autocast, args.grad_clip), images=len(labels))
                    step += 1
                    if step % args.log_every == 0:
                        means = check_finite(sums.means(), step)
                        bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['acc']:.3f}")
                        if args.method.startswith("orthcr"):
                            keep_orthogonal(classifier, args.cayley)
                if not sums.images:  # nothing left to train (e.g. resumed with fewer --iters)
                    break
                means = check_finite(sums.means(), step)  # waits for the device: the epoch's time is complete
                row = {"epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
                       **{f"train_{k}": v for k, v in means.items()}, "train_seconds": time.time() - began}
                if args.method.startswith("orthcr"):
                    keep_orthogonal(classifier, args.cayley)
                    row["orthogonality_error"] = orthserve.max_orthogonality_error(classifier)
                ran += 1
                checkpoint = args.checkpoint_every and ((epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == epochs
                                                        or ran == args.stop_after_epochs)
                rng = distributed.gather(rng_state(cutout_rng), processes) if checkpoint else None
                if not processes.main:
                    continue
                if splits["val"] is not None:
                    result = evaluate(classifier, splits["val"], desc="validate")
                    row.update(val_loss=result["loss"], val_acc=result["top1"])
                history.append(row)
                log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
                if checkpoint:
                    run.save_checkpoint(epoch=epoch + 1, step=step, history=history, tensors=params, optimizer=optimizer,
                                        scheduler=scheduler, rng=rng, scaler=scaler.state_dict(), model=args.model,
                                        method=args.method)
                run.save_weights(classifier, configs, args.method)
                run.write_history(history)

    trainable = sum(p.numel() for p in params.values())
    if not processes.main:
        return {"rank": processes.rank, "steps": step}
    run.save_weights(classifier, configs, args.method)
    metrics = final_metrics(args, classifier, tokenizer, splits, evaluate, history, step, trainable, run)
    run.write_metrics(metrics)
    run.write_history(history)
    if len(history) > 1:
        run.plot_curves(history)
    info.extra["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    info.save(run.path)
    log.info("wrote %s: %s", run.path, result_line(metrics))
    return metrics


def result_line(metrics: dict) -> str:
    """The run's outcome against zero-shot, in one line."""
    parts = []
    for key, label in (("test_top1", "test top-1"), ("new_top1", "new-class top-1")):
        now = metrics.get("test", {}).get("top1") if key == "test_top1" else metrics.get(key)
        if now is None:
            continue
        before, gain = metrics["zero_shot"].get(key), metrics["gain"].get(key)
        parts.append(f"{label} {now:.1%}" + ("" if before is None or gain is None else
                                               f" (zero-shot {before:.1%}, {gain * 100:+.1f} points)"))
    return "; ".join(parts) or "no test split"


def console(prog: str = "orthserve-finetune") -> None:
    """The ``orthserve-finetune`` console script; ``python -m training.finetune`` from the repo root."""
    cli.run(main, prog)


if __name__ == "__main__":
    console("training.finetune")
