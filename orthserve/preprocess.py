"""Image decoding and preprocessing in NumPy + Pillow: the one implementation.

The service, export verification and benchmarks all call this; it reproduces
open_clip's eval transform (shorter side resized to ``image_size`` with Pillow's
bicubic filter, center crop, scale to [0, 1], normalize) without torch, so the
service does not need torch to preprocess.  ``tests/test_preprocess.py`` checks it
against open_clip's own transform on real photos.

It comes in two halves.  :func:`to_pixels` (resize, crop) gives uint8 ``[3, H, W]``: what the exported image
graph takes, so a GPU receives a quarter of the bytes and the CPU does no float work.  :func:`normalize`
(scale, mean, std) is the rest, as one multiply-add with the constants of :meth:`PreprocessSpec.affine`; the
exported graph starts with the same multiply-add (``export/towers.py``), and PyTorch callers (training,
export's reference outputs) use :func:`preprocess`, both halves.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                  "nearest": Image.Resampling.NEAREST}
DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read (empty, truncated, unknown format, too large)."""


@dataclass(frozen=True)
class PreprocessSpec:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_model(cls, model) -> "PreprocessSpec":
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        return cls(int(size[0] if isinstance(size, (tuple, list)) else size), tuple(cfg["mean"]), tuple(cfg["std"]),
                   cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest"))

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]),
                   data.get("interpolation", "bicubic"), data.get("resize_mode", "shortest"))

    def to_dict(self) -> dict:
        return asdict(self)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, shift)``, float32 ``[3, 1, 1]``: normalized = uint8 pixels * scale + shift, i.e.
        ``(pixels / 255 - mean) / std`` as one multiply-add."""
        std = np.asarray(self.std, np.float64)
        scale = 1.0 / (255.0 * std)
        shift = -np.asarray(self.mean, np.float64) / std
        return scale.astype(np.float32).reshape(3, 1, 1), shift.astype(np.float32).reshape(3, 1, 1)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, image_size: int | None = None) -> Image.Image:
    """Bytes -> RGB Pillow image: EXIF orientation applied, first frame of animations,
    alpha composited on black (as PIL's convert does), 16-bit and CMYK converted.

    ``max_pixels`` bounds the decoded image and, with ``image_size``, the first resize of
    :func:`preprocess` too: a 200-byte 1x40000 PNG would otherwise resize to 224 x 8,960,000.
    Raises :class:`ImageDecodeError` with a readable reason."""
    if not data:
        raise ImageDecodeError("empty file: zero bytes")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(f"image is {width}x{height} pixels, above the limit of {max_pixels}")
        if image_size and math.prod(resized_size(width, height, image_size)) > max_pixels:
            raise ImageDecodeError(f"image is {width}x{height} pixels, too elongated: resizing its shorter side to "
                                   f"{image_size} would make more than {max_pixels} pixels")
        image.seek(0)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy of the full-size image when nothing turns
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64)
            top = 65535.0 if array.max() > 255 else 255.0
            image = Image.fromarray((array * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")
        return _rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"image too large (decompression bomb guard): {err}") from err
    except UnidentifiedImageError as err:  # its message names a Python object, not the problem
        raise ImageDecodeError("not a readable image: not a format Pillow can decode (JPEG, PNG, WebP, ...)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"not a readable image: {err}") from err


def _rgb(image: Image.Image) -> Image.Image:
    """``image.convert("RGB")`` without its copy of an image that already is RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(width, height)`` after resizing the shorter side to ``size`` (torchvision truncates the long side)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def resize_shorter_side(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    new_size = resized_size(*image.size, size)
    return image if new_size == image.size else image.resize(new_size, INTERPOLATIONS[interpolation])


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width < size or height < size:  # pad like torchvision (never happens after the resize)
        canvas = Image.new(image.mode, (max(width, size), max(height, size)))
        canvas.paste(image, ((canvas.width - width) // 2, (canvas.height - height) // 2))
        image, (width, height) = canvas, canvas.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_pixels(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB Pillow image -> uint8 ``[3, H, W]``: resized and center-cropped, not yet normalized."""
    if spec.resize_mode != "shortest":
        raise ValueError(f"resize mode {spec.resize_mode!r} is not supported (only 'shortest')")
    image = center_crop(resize_shorter_side(_rgb(image), spec.image_size, spec.interpolation), spec.image_size)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def normalize(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 ``[..., 3, H, W]`` -> float32 normalized pixels (what the PyTorch model takes)."""
    scale, shift = spec.affine()
    return np.ascontiguousarray(pixels.astype(np.float32) * scale + shift)


def preprocess(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB Pillow image -> float32 ``[3, H, W]`` normalized pixels."""
    return normalize(to_pixels(image, spec), spec)


def preprocess_batch(images: Iterable[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    return np.stack([preprocess(image, spec) for image in images])


def load_pixels(paths: Sequence[str], spec: PreprocessSpec) -> np.ndarray:
    """Files -> uint8 ``[N, 3, H, W]``, the exported image graph's input; for verification and benchmarks."""
    return np.stack([to_pixels(decode_image(open(p, "rb").read()), spec) for p in paths])


def load_images(paths: Sequence[str], spec: PreprocessSpec) -> np.ndarray:
    """Files -> float32 normalized ``[N, 3, H, W]``, the PyTorch model's input."""
    return normalize(load_pixels(paths, spec), spec)
