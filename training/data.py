"""Labelled images in, few-shot splits and tensors out.

The data protocol follows CoOp (Zhou et al., 2022) so numbers are comparable:

* classes are the sorted folder names (ImageFolder) or sorted CSV labels; label ``i`` is
  the ``i``-th of that sorted list;
* ``--subsample base`` keeps the first half of that list (rounded up), ``new`` the rest,
  relabelled from 0 (CoOp's ``subsample_classes``);
* ``--shots K --seed S`` draws ``random.Random(S).sample(items, K)`` per class, classes in
  label order and items sorted by path, so the same seed gives the same images on every
  machine; a class with fewer than K images keeps all of them and is reported.

Evaluation images go through :mod:`orthserve.preprocess`, the exact code the service
runs, so train-time evaluation and serving see identical pixels.  Training adds the
usual few-shot augmentation (random resized crop + horizontal flip) with torchvision.
"""
from __future__ import annotations

import csv
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from orthserve.classnames import read_classnames  # noqa: F401  (re-exported: one home)
from orthserve.preprocess import ImageDecodeError, PreprocessSpec, decode_image, preprocess

log = logging.getLogger("training.data")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SUBSAMPLES = ("all", "base", "new")


class DataError(ValueError):
    """The data given cannot be used; the message names the file or folder and the problem."""


@dataclass
class Sample:
    path: str
    label: int


@dataclass
class LabelledSet:
    """Samples plus the class list they index into."""

    samples: list[Sample]
    classes: list[str]                 # folder names / CSV labels, sorted
    classnames: list[str]              # readable names used in the prompts
    notes: list[str] = field(default_factory=list)   # things a user should know (short classes, ...)

    def by_class(self) -> dict[int, list[Sample]]:
        groups: dict[int, list[Sample]] = {i: [] for i in range(len(self.classes))}
        for s in self.samples:
            groups[s.label].append(s)
        return groups


# --------------------------------------------------------------------------- discovery

def readable_names(classes: Sequence[str], classnames_file: str | Path | None) -> list[str]:
    """Readable names for folder names: from the file, else the folder name with '_' as a space."""
    mapping = read_classnames(classnames_file) if classnames_file else {}
    missing = [c for c in classes if mapping and c not in mapping]
    if missing:
        log.warning("classnames file %s has no entry for %d classes (e.g. %s); using their folder names",
                    classnames_file, len(missing), missing[:3])
    return [mapping.get(c, c.replace("_", " ")) for c in classes]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def scan_folder(root: Path) -> tuple[list[str], dict[str, list[str]]]:
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"data folder {root} is empty: expected one sub-folder of images per class (ImageFolder layout)")
    files = {f.name: sorted(str(p) for p in f.rglob("*") if _is_image(p)) for f in folders}
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        raise DataError(f"class folders without images in {root}: {', '.join(empty[:10])}"
                        f"{' ...' if len(empty) > 10 else ''} (remove them or add images)")
    return [f.name for f in folders], files


def scan_manifest(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """CSV with rows ``path,label`` (a header row ``path,label`` is optional); paths relative to the CSV."""
    files: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise DataError(f"{path}:{number}: expected 'path,label', got {row!r}")
            file, label = row[0].strip(), row[1].strip()
            if number == 1 and (file.lower(), label.lower()) == ("path", "label"):
                continue
            resolved = Path(file) if Path(file).is_absolute() else path.parent / file
            files.setdefault(label, []).append(str(resolved))
    if not files:
        raise DataError(f"manifest {path} lists no images")
    classes = sorted(files)
    return classes, {c: sorted(files[c]) for c in classes}


def subsample_classes(classes: list[str], subsample: str) -> list[str]:
    """CoOp's base/new split: base is the first ceil(n/2) sorted classes, new the rest."""
    if subsample not in SUBSAMPLES:
        raise DataError(f"unknown --subsample {subsample!r}: use one of {', '.join(SUBSAMPLES)}")
    if subsample == "all":
        return list(classes)
    half = math.ceil(len(classes) / 2)
    return list(classes[:half]) if subsample == "base" else list(classes[half:])


def load_labelled(data: str | Path, classnames_file: str | Path | None = None, subsample: str = "all") -> LabelledSet:
    """An ImageFolder directory or a CSV manifest -> every sample of the kept classes."""
    data = Path(data)
    if data.suffix.lower() == ".csv":
        if not data.is_file():
            raise DataError(f"manifest {data} does not exist")
        classes, files = scan_manifest(data)
    else:
        classes, files = scan_folder(data)
    kept = subsample_classes(sorted(classes), subsample)
    if not kept:
        raise DataError(f"--subsample {subsample} leaves no classes out of {len(classes)} in {data}")
    samples = [Sample(path, label) for label, c in enumerate(kept) for path in files[c]]
    return LabelledSet(samples, kept, readable_names(kept, classnames_file))


# --------------------------------------------------------------------------- few-shot

def few_shot(dataset: LabelledSet, shots: int, seed: int) -> tuple[LabelledSet, LabelledSet]:
    """``(K per class drawn with the seed, the rest)``; ``shots <= 0`` keeps everything."""
    if shots <= 0:
        return dataset, LabelledSet([], dataset.classes, dataset.classnames)
    rng = random.Random(seed)
    picked, rest, notes = [], [], []
    for label, items in dataset.by_class().items():
        if len(items) >= shots:
            chosen = rng.sample(items, shots)
        else:
            chosen = list(items)
            notes.append(f"class {dataset.classes[label]!r} has {len(items)} images, fewer than --shots {shots}: using all")
        ids = {id(s) for s in chosen}
        picked += chosen
        rest += [s for s in items if id(s) not in ids]
    for note in notes:
        log.warning(note)
    return (LabelledSet(picked, dataset.classes, dataset.classnames, notes),
            LabelledSet(rest, dataset.classes, dataset.classnames))


def per_class(dataset: LabelledSet, count: int, seed: int) -> tuple[LabelledSet, LabelledSet]:
    """Up to ``count`` per class (all when ``count <= 0``), without the shortage warning."""
    if count <= 0:
        return dataset, LabelledSet([], dataset.classes, dataset.classnames)
    rng = random.Random(seed)
    picked, rest = [], []
    for items in dataset.by_class().values():
        chosen = rng.sample(items, min(count, len(items)))
        ids = {id(s) for s in chosen}
        picked += chosen
        rest += [s for s in items if id(s) not in ids]
    return LabelledSet(picked, dataset.classes, dataset.classnames), LabelledSet(rest, dataset.classes, dataset.classnames)


def read_image(path: str) -> Image.Image:
    """Decode with the service's decoder (EXIF, alpha, 16-bit handled the same way)."""
    try:
        with open(path, "rb") as handle:
            return decode_image(handle.read())
    except OSError as err:
        raise ImageDecodeError(f"cannot read {path}: {err}") from err


def drop_unreadable(dataset: LabelledSet, what: str = "training") -> LabelledSet:
    """Decode every image once; unreadable ones are dropped and counted in one warning."""
    good, bad = [], []
    for s in dataset.samples:
        try:
            read_image(s.path)
            good.append(s)
        except ImageDecodeError as err:
            bad.append((s.path, str(err)))
    if bad:
        message = (f"skipped {len(bad)} unreadable or corrupt {what} image(s) out of {len(dataset.samples)}, "
                   f"e.g. {bad[0][0]}: {bad[0][1]}")
        log.warning(message)
        dataset.notes.append(message)
    if not good:
        raise DataError(f"no readable {what} images left ({len(bad)} unreadable)")
    return LabelledSet(good, dataset.classes, dataset.classnames, dataset.notes)


# --------------------------------------------------------------------------- tensors

def train_transform(spec: PreprocessSpec, scale: tuple[float, float] = (0.5, 1.0)):
    """CoOp-style augmentation: random resized crop + horizontal flip, then the model's normalization."""
    from torchvision import transforms as T

    interpolation = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                     "nearest": T.InterpolationMode.NEAREST}[spec.interpolation]
    return T.Compose([
        T.RandomResizedCrop(spec.image_size, scale=scale, interpolation=interpolation),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


class TrainImages(Dataset):
    """Augmented views whose randomness depends only on ``(seed, epoch, index)``.

    Seeding each item explicitly (instead of relying on worker RNG streams) makes a
    resumed run see exactly the views an uninterrupted one would, whatever the
    number of data-loading workers.
    """

    def __init__(self, dataset: LabelledSet, spec: PreprocessSpec, seed: int, augment: bool = True) -> None:
        self.samples, self.spec, self.seed, self.epoch = dataset.samples, spec, seed, 0
        self.transform = train_transform(spec) if augment else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """``key``: an index (at the epoch of :meth:`set_epoch`) or ``(epoch, index)`` from :class:`EpochSampler`."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        sample = self.samples[index]
        image = read_image(sample.path)  # validated up front by drop_unreadable
        if self.transform is None:
            return torch.from_numpy(preprocess(image, self.spec)), sample.label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + index) % (2**63))
            return self.transform(image), sample.label


class EpochSampler(Sampler):
    """A shuffled order per epoch that hands ``(epoch, index)`` to :class:`TrainImages`.

    The epoch travels with each index, so data-loading workers can persist across epochs (no worker
    start-up per epoch, which on a few-shot run of a few steps costs more than the steps) and still
    draw each epoch's own augmentations. The order is ``randperm(n)`` seeded by ``seed * 7919 + epoch``.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        return ((self.epoch, i) for i in order.tolist())


class EvalImages(Dataset):
    """Eval-time pixels from :func:`orthserve.preprocess.preprocess`.

    Unreadable files do not crash evaluation: they come back with ``ok = False`` and
    the caller excludes and counts them.
    """

    def __init__(self, dataset: LabelledSet, spec: PreprocessSpec) -> None:
        self.samples, self.spec = dataset.samples, spec

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        sample = self.samples[index]
        try:
            pixels = preprocess(read_image(sample.path), self.spec)
            return torch.from_numpy(pixels), sample.label, True
        except ImageDecodeError:
            size = self.spec.image_size
            return torch.from_numpy(np.zeros((3, size, size), np.float32)), sample.label, False
