"""Verification data and figures: exported graphs against the unfolded PyTorch model.

Images go through :mod:`orthserve.preprocess`, the code the service runs, so a
mismatch between export and serving preprocessing cannot hide here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from orthserve.artifact import ort_session
from orthserve.prompts import class_embeddings, prompts
from orthserve.classifier import CLIPClassifier
from orthserve.preprocess import PreprocessSpec, load_pixels, to_pixels

# The fp32 graphs must reproduce the unfolded adapted PyTorch model to this max absolute difference
# (embeddings and logits; fp16 and int8 are judged by cosine and top-1 agreement instead, see below).
DEFAULT_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The export cannot be done as asked (bad output directory, failed verification, ...)."""


class VerificationError(ExportError):
    """The exported graphs do not reproduce the adapted PyTorch model."""


def check_parity(what: str, exported, reference, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, float]:
    """``{"max_abs_diff": ...}``, or :class:`VerificationError` above the tolerance."""
    diff = max_abs_diff(torch.as_tensor(exported).detach().numpy(), torch.as_tensor(reference).numpy())
    if not diff <= tolerance:  # NaN fails too
        raise VerificationError(f"verification failed: {what} max_abs_diff {diff:.3g} > tolerance {tolerance:g} "
                                "(ONNX against the unfolded adapted PyTorch model)")
    return {"max_abs_diff": diff}


DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_IMAGE_SETS = ("hymenoptera-val", "flowers5")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PER_CLASS = 3
MAX_IMAGES = 24
EXTRA_TEXTS = (
    "a", "a photo.", "a blurry photo of something small on a wooden table.",
    "an extremely long caption " + "that keeps going and going " * 20 + "past the context length.",
)


def find_images(roots: Sequence[Path], per_class: int = PER_CLASS, limit: int = MAX_IMAGES) -> list[Path]:
    """A few images from each class folder (ImageFolder layout) or flat folder, deterministic."""
    found: list[Path] = []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            found += [Path(folder) / f for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)][:per_class]
            if len(found) >= limit:
                return found[:limit]
    return found


def generated_images(count: int = 8, seed: int = 0) -> list[Image.Image]:
    """Smooth random images of assorted sizes, for when no real photos are at hand."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        width, height = [(96, 64), (64, 96), (300, 200), (50, 50)][i % 4]
        coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    return images


def verification_images(spec: PreprocessSpec, images_dir: str | Path | None = None) -> tuple[np.ndarray, str]:
    """``([N, 3, H, W] uint8 pixels, description)``: real photos where present, else generated."""
    if images_dir is not None:
        paths = find_images([Path(images_dir)])
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {images_dir}")
        return load_pixels([str(p) for p in paths], spec), f"{len(paths)} images from {images_dir}"
    roots = [DATA_DIR / name for name in DEFAULT_IMAGE_SETS if (DATA_DIR / name).is_dir()]
    paths = find_images(roots)
    if len(paths) >= 2:
        return load_pixels([str(p) for p in paths], spec), f"{len(paths)} images from {', '.join(map(str, roots))}"
    images = generated_images()
    return np.stack([to_pixels(image, spec) for image in images]), f"{len(images)} generated images"


def verification_texts(classifier: CLIPClassifier | None) -> list[str]:
    """The classifier's prompts first (class-major, as ``prompt_tokens``), then assorted lengths."""
    return (prompts(classifier.classnames, classifier.templates) if classifier else []) + list(EXTRA_TEXTS)


def class_matrix(prompt_embeddings: torch.Tensor, classifier: CLIPClassifier) -> torch.Tensor:
    """Class embeddings from per-prompt embeddings, exactly as ``CLIPClassifier.class_embeddings``."""
    features = class_embeddings(prompt_embeddings.float(), len(classifier.classnames), len(classifier.templates))
    return classifier.taskres(features) if classifier.taskres is not None else features


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def top1_agreement(image_a: np.ndarray, classes_a: np.ndarray, image_b: np.ndarray, classes_b: np.ndarray) -> float:
    """Share of images whose best class is the same under both (image, class) embedding pairs."""
    return float(np.mean((image_a @ classes_a.T).argmax(-1) == (image_b @ classes_b.T).argmax(-1)))


@dataclass
class OnnxRunner:
    """One onnxruntime session on CPU (verification runs where the export runs)."""

    path: Path
    variant: str = "fp32"

    def __post_init__(self) -> None:
        self.session = ort_session(self.path, self.variant)  # fp16-on-CPU cast notices silenced
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


ACCEPTABLE_AGREEMENT = 0.98  # a variant below this changes noticeably many answers of the fp32 model
SERVED_BY_DEFAULT = {"fp32": "the service's default on CPU", "fp16": "the service's default on GPU",
                     "int8": "used only when asked: ORTHSERVE_INT8=1 (image tower, CPU) or ORTHSERVE_VARIANT=int8"}


def describe_variants(variants: dict[str, dict]) -> list[str]:
    """The export's variant figures in words: what was compared, whether it is acceptable, when it is served."""
    lines = []
    for variant, towers in variants.items():
        for tower, f in towers.items():
            agree = f["top1_agreement"]
            n = f.get("images")
            of = f" ({round(agree * n)} of {n})" if n else ""
            over = f" among {f['classes']} class names" if f.get("classes") else ""
            if tower == "image":
                what = f"with the {variant} image tower and fp32 class embeddings"
            else:
                what = f"with fp32 image embeddings and {variant} class embeddings"
            verdict = "acceptable" if agree >= ACCEPTABLE_AGREEMENT else \
                f"below {ACCEPTABLE_AGREEMENT:.0%}: this tower changes answers; keep it in fp32"
            lines.append(f"{variant} {tower} tower: embeddings cosine {f['cosine_mean']:.5f} to fp32 (min {f['cosine_min']:.5f}); "
                         f"{what}, the best class{over} matches fp32 for {agree:.0%} of the verification images{of}: "
                         f"{verdict}.")
        lines.append(f"{variant}: {SERVED_BY_DEFAULT.get(variant, 'served when ORTHSERVE_VARIANT names it')}.")
    return lines
