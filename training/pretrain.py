"""Pretrain orthserve-mini's image tower against the frozen MiniLM text tower.

    python -m training.pretrain --data ../shared/data/tiny-imagenet/train \
        --classnames ../shared/data/tiny-imagenet/classnames.txt \
        --test-data ../shared/data/tiny-imagenet/val --hymenoptera ../shared/data/hymenoptera-val \
        --epochs 12 --out runs/pretrain-mini

Locked-text training (LiT, Zhai et al. 2022) with captions made from class names:
each class's text embedding is the mean of MiniLM's embeddings of the class name in
every template, computed once; the image tower learns to land on its class's text
embedding through a softmax over all classes (the class-level form of CLIP's
contrastive loss, which avoids in-batch duplicates of the same caption).

The train set is decoded once into a uint8 array (cached under ~/.cache/orthserve), and
augmented per sample on the fly in torch (random resized crop via ``roi_align``, flip),
so 2 CPU cores spend their time on the model, not on JPEG decoding.  The image tower
trains with batch norm in its conv stem under bf16 autocast (CPUs with AVX512-BF16 and
GPUs run it about 1.5x faster than fp32).

``--holdout-per-class`` images of the training folder are kept out of training; the
per-epoch curve is measured on them, so no setting is chosen on the test images.  The
test folder (``--test-data``) and the ants/bees folder are evaluated once, at the end,
from the shipped weights file reloaded (which also checks the batch-norm folding).

Writes, atomically: ``checkpoint.pt`` (resume), ``metrics.json``, ``log.csv``,
``curves.png`` in ``--out``, and the shipped weights (image tower + logit scale,
safetensors) at ``--weights-out``.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.ops import roi_align
from torchvision.transforms.v2 import CutMix
from tqdm import tqdm

import orthserve
from orthserve import cli, mini
from orthserve.files import atomic_write
from orthserve.classifier import CLIPClassifier
from orthserve.preprocess import PreprocessSpec, decode_image, to_pixels
from .data import load_labelled, per_class
from .finetune import lr_lambda
from .rundir import RunDir, git_commit, rng_state, set_rng_state, versions

TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of a {}.", "a close-up photo of a {}.",
    "a photo of the small {}.", "a photo of the large {}.", "a cropped photo of a {}.", "a bright photo of a {}.",
    "a dark photo of a {}.", "a good photo of a {}.", "itap of a {}.", "art of the {}.",
)
CACHE = Path.home() / ".cache" / "orthserve"


def decoded_images(paths: Sequence[str], spec: PreprocessSpec) -> np.ndarray:
    """``[N, 3, size, size]`` uint8 pixels (:func:`orthserve.preprocess.to_pixels`), cached on disk."""
    size = spec.image_size
    key = hashlib.sha256(("\n".join(paths) + f"|{size}|{spec.interpolation}|chw").encode()).hexdigest()[:16]
    cache = CACHE / f"images-{key}.npy"
    if cache.is_file():
        return np.load(cache)
    array = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc="decoding images", unit="img")):
        array[i] = to_pixels(decode_image(Path(path).read_bytes()), spec)
    CACHE.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:  # a file object: np.save would add ".npy" to a path
            np.save(handle, array)

    atomic_write(cache, write)
    return array


def augment(batch: torch.Tensor, generator: torch.Generator, min_scale: float = 0.35) -> torch.Tensor:
    """Per-sample random resized crop (scale, ratio 3/4..4/3) and horizontal flip; float in, float out."""
    n, _, h, w = batch.shape
    area = torch.empty(n).uniform_(min_scale, 1.0, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = log_ratio.exp()
    cw = (area * ratio).sqrt().clamp(max=1.0) * w
    ch = (area / ratio).sqrt().clamp(max=1.0) * h
    x0 = torch.rand(n, generator=generator) * (w - cw)
    y0 = torch.rand(n, generator=generator) * (h - ch)
    boxes = torch.stack([torch.arange(n, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], dim=1)
    out = roi_align(batch, boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def normalize(pixels: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> normalized float, the multiply-add of :func:`orthserve.preprocess.normalize`."""
    scale, shift = (torch.from_numpy(a).to(pixels.device) for a in spec.affine())
    return pixels.float() * scale + shift


@torch.no_grad()
def evaluate(model, class_text: torch.Tensor, images: np.ndarray, labels: torch.Tensor, spec: PreprocessSpec,
             batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = normalize(torch.from_numpy(images[start:start + batch_size]).to(class_text.device), spec)
        features = F.normalize(model.encode_image(x), dim=-1)
        predicted = (features @ class_text.T).argmax(-1).cpu()
        correct += int((predicted == labels[start:start + batch_size]).sum())
    return correct / len(images)


def zero_shot_folder(model, tokenizer, folder: Path, labels: Sequence[str], spec: PreprocessSpec) -> float:
    """Accuracy on an ImageFolder whose sub-folders are named by ``labels`` order (e.g. ants, bees)."""
    data = load_labelled(folder)
    classifier = CLIPClassifier(model, tokenizer, list(labels), list(TEMPLATES)).eval()
    images = decoded_images([s.path for s in data.samples], spec)
    return evaluate(model, classifier.text_features(), images, torch.tensor([s.label for s in data.samples]), spec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.pretrain", description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder of training images (tiny-imagenet/train)")
    p.add_argument("--classnames", help="'<folder> <readable name>' lines for the captions")
    p.add_argument("--test-data", help="ImageFolder with (a subset of) the same classes, evaluated once at the end")
    p.add_argument("--holdout-per-class", type=int, default=10,
                   help="training images per class kept out for the per-epoch validation curve")
    p.add_argument("--hymenoptera", help="ants/bees ImageFolder for the zero-shot check at the end")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--min-scale", type=float, default=0.35, help="smallest area fraction of the random resized crop")
    p.add_argument("--cutmix", type=float, default=0.0,
                   help="probability that a batch gets CutMix (torchvision's, soft labels): a regularizer for longer runs")
    p.add_argument("--init-weights", help="start the image tower from a shipped weights file (a warm restart, e.g. "
                                          "orthserve/weights/orthserve-mini.safetensors) instead of from scratch")
    p.add_argument("--limit", type=int, default=0, help="use only the first N training images (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast dtype of the forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/pretrain-mini", help="run directory (checkpoint, metrics, plots)")
    p.add_argument("--weights-out", default=str(mini.WEIGHTS), help="where the shipped weights go")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    cli.add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = RunDir(args.out)
    run.start(resume=args.resume and run.has_checkpoint(), overwrite=False)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model, _, tokenizer = orthserve.load_model(mini.MODEL_NAME, "none")
    if not args.init_weights:
        mini.install_stem(model, batch_norm=True)
    spec = PreprocessSpec.from_model(model)

    train = load_labelled(args.data, args.classnames)
    holdout, rest = per_class(train, args.holdout_per_class, seed=args.seed)
    samples = rest.samples[: args.limit] if args.limit else rest.samples
    images = decoded_images([s.path for s in samples], spec)
    labels = torch.tensor([s.label for s in samples])
    if args.init_weights:  # the shipped stem is folded: put its batch norms back, same function (mini.ConvStem)
        mini.load_default_weights(model, args.init_weights)
        sample = normalize(torch.from_numpy(images[torch.randperm(len(images))[:512].numpy()]), spec)
        model.visual.conv1 = model.visual.conv1.unfolded(sample)
    classifier = CLIPClassifier(model, tokenizer, train.classnames, list(TEMPLATES))
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        class_text = classifier.text_features().detach()          # [classes, 384], frozen MiniLM
    trainable = [p for n, p in model.named_parameters() if n.startswith("visual") or n == "logit_scale"]
    for p in trainable:
        p.requires_grad_(True)

    val = None
    if holdout.samples:
        val = (decoded_images([s.path for s in holdout.samples], spec),
               torch.tensor([s.label for s in holdout.samples]))
    test = None
    if args.test_data:
        test_set = load_labelled(args.test_data, args.classnames)
        unknown = sorted(set(test_set.classes) - set(train.classes))
        if unknown:
            raise SystemExit(f"error: --test-data has classes not in --data: {unknown[:5]}")
        to_train_label = [train.classes.index(c) for c in test_set.classes]  # the test set may hold a subset
        test = (decoded_images([s.path for s in test_set.samples], spec),
                torch.tensor([to_train_label[s.label] for s in test_set.samples]))
    model.to(device)
    class_text = class_text.to(device)

    steps_per_epoch = len(samples) // args.batch_size
    total = steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, args.warmup_steps, total, 0.02))
    generator = torch.Generator().manual_seed(args.seed)
    cutmix = CutMix(num_classes=len(train.classes))
    history: list[dict] = []
    start_epoch, seconds = 0, 0.0
    # what training changes: the image tower's parameters and batch-norm statistics, and the temperature
    tensors = {**{f"visual.{k}": v for k, v in model.visual.state_dict().items()}, "logit_scale": model.logit_scale}
    if args.resume and run.has_checkpoint():
        state = run.load_checkpoint(tensors, optimizer, scheduler)
        set_rng_state(state["rng"][0], generator)
        start_epoch, history, seconds = state["epoch"], state["history"], state["seconds"]

    if args.init_weights and not history and val is not None:  # epoch 0: the model the warm restart starts from
        history.append({"epoch": 0, "val_acc": evaluate(model, class_text, *val, spec)})
    print(f"pretraining {sum(p.numel() for p in trainable):,} parameters on {len(samples):,} images "
          f"({len(holdout.samples):,} held out), {len(train.classes)} classes, {args.epochs} epochs x {steps_per_epoch} steps, "
          f"{args.precision} on {device}")
    for epoch in range(start_epoch, args.epochs):
        model.train()
        began = time.time()
        order = torch.randperm(len(samples), generator=generator)
        loss_sum = correct = seen = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}")
        for step in bar:
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = augment(normalize(torch.from_numpy(images[index.numpy()]), spec), generator, args.min_scale)
            y = labels[index]
            target = y                                              # class indices, or soft labels after CutMix
            if args.cutmix and torch.rand((), generator=generator) < args.cutmix:
                x, target = cutmix(x, y)
            x, y, target = x.to(device), y.to(device), target.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                features = model.encode_image(x)
            features = F.normalize(features.float(), dim=-1)
            logits = model.logit_scale.exp() * features @ class_text.T
            loss = F.cross_entropy(logits, target, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        seconds += time.time() - began
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen, "minutes": seconds / 60}
        if val is not None:
            row["val_acc"] = evaluate(model, class_text, *val, spec)  # held-out training images
        history.append(row)
        print(json.dumps(row))
        run.save_checkpoint(epoch=epoch + 1, step=(epoch + 1) * steps_per_epoch, history=history, tensors=tensors,
                            optimizer=optimizer, scheduler=scheduler, rng=[rng_state(generator)], seconds=seconds)
        run.write_history(history)

    weights = Path(args.weights_out)
    weights.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(weights, lambda tmp: save_file(mini.shipped_state(model.cpu()), str(tmp)))
    metrics = {"history": history, "train_minutes": seconds / 60, "images": len(samples),
               "holdout_images": len(holdout.samples), "classes": len(train.classes),
               "command": "python -m training.pretrain " + " ".join(sys.argv[1:] if argv is None else argv),
               "versions": versions(), "git_commit": git_commit(), "weights": str(weights),
               "weights_bytes": weights.stat().st_size}
    shipped, _, _ = orthserve.load_model(mini.MODEL_NAME, "none")   # the file as users load it
    mini.load_default_weights(shipped, weights)
    if val is not None:
        if history:
            metrics["holdout_top1"] = history[-1]["val_acc"]
        metrics["holdout_top1_shipped"] = evaluate(shipped, class_text.cpu(), *val, spec)
    if test is not None:
        metrics["test_top1"] = evaluate(shipped, class_text.cpu(), *test, spec)
    if args.hymenoptera:
        metrics["hymenoptera_zero_shot"] = zero_shot_folder(shipped, tokenizer, Path(args.hymenoptera), ["ant", "bee"], spec)
    run.write_metrics(metrics)
    run.plot_curves(history)
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return metrics


def console(prog: str = "orthserve-pretrain") -> None:
    """The ``orthserve-pretrain`` console script; ``python -m training.pretrain`` from the repo root."""
    cli.run(main, prog)


if __name__ == "__main__":
    console("training.pretrain")
