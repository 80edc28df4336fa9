"""Every setting of the service, read from ``ORTHSERVE_*`` environment variables in one place.

``CUDA_VISIBLE_DEVICES`` is read here too (it is CUDA's, not ours): it says which GPUs the workers may use.
``settings()`` builds the object once per environment (it is rebuilt only when one of these variables changes,
as in tests). A value that does not parse stops the server with a message naming the variable.
docs/SERVING.md lists them with their defaults.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from orthserve.preprocess import DEFAULT_MAX_PIXELS

PREFIX = "ORTHSERVE_"
CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"
VARIANTS = ("auto", "fp32", "fp16", "int8")


@dataclass(frozen=True)
class Limits:
    """What one request may hold; each above its limit gets a 4xx."""

    max_bytes: int = 10 * 1024 * 1024   # ORTHSERVE_MAX_BYTES: request body
    max_pixels: int = DEFAULT_MAX_PIXELS  # ORTHSERVE_MAX_PIXELS: one decoded image
    max_labels: int = 256               # ORTHSERVE_MAX_LABELS
    max_label_chars: int = 300          # ORTHSERVE_MAX_LABEL_CHARS
    max_images: int = 32                # ORTHSERVE_MAX_IMAGES: per /classify_batch
    max_texts: int = 256                # ORTHSERVE_MAX_TEXTS: per /embed_text


@dataclass(frozen=True)
class Settings:
    model: str = ""              # ORTHSERVE_MODEL: artifact folder or BentoML model tag ("": artifacts/default)
    providers: str = ""          # ORTHSERVE_PROVIDERS: e.g. "cpu" or "cuda,cpu" ("": TensorRT/CUDA where present)
    variant: str = "auto"        # ORTHSERVE_VARIANT: both towers; auto = fp16 on GPU, fp32 on CPU
    int8_image: bool = False     # ORTHSERVE_INT8=1: the int8 image tower on CPU, text in fp32 (under variant auto)
    workers: int | None = None   # ORTHSERVE_WORKERS (None: one per visible GPU, else one per CPU up to 4)
    threads: int | None = None   # ORTHSERVE_THREADS: intra-op threads per session (None: the CPUs / workers)
    work_threads: int | None = None  # ORTHSERVE_WORK_THREADS: decoding and text threads (None: 2 per CPU, >= 4)
    max_batch: int | None = None  # ORTHSERVE_MAX_BATCH_SIZE (None: 256 on a GPU, 32 on CPU)
    cuda_graphs: bool = False    # ORTHSERVE_CUDA_GRAPHS=1: a CUDA graph per batch-size bucket
    trt_cache: Path = field(default_factory=lambda: Path.home() / ".cache" / "orthserve" / "tensorrt")  # ORTHSERVE_TRT_CACHE
    label_cache: int = 256       # ORTHSERVE_LABEL_CACHE: label sets whose embeddings are kept
    balance: bool = True         # ORTHSERVE_BALANCE=0: never ask keep-alive clients to reconnect (service/balance.py)
    debug: bool = False          # ORTHSERVE_DEBUG=1: tracebacks for start-up errors
    limits: Limits = field(default_factory=Limits)
    cuda_visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES as CUDA reads it (None: unset, every GPU)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        def text(name: str, default: str = "") -> str:
            return env.get(PREFIX + name, "").strip() or default

        def number(name: str, default: int | None) -> int | None:
            value = text(name)
            if not value:
                return default
            try:
                parsed = int(value)
            except ValueError:
                raise ValueError(f"{PREFIX}{name}={value!r} is not a whole number") from None
            if parsed < 1:
                raise ValueError(f"{PREFIX}{name}={value!r} must be at least 1")
            return parsed

        def flag(name: str, default: bool) -> bool:
            value = text(name).lower()
            return default if not value else value in ("1", "true", "yes", "on")

        variant = text("VARIANT", "auto").lower()
        if variant not in VARIANTS:
            raise ValueError(f"{PREFIX}VARIANT={variant!r}: expected one of {', '.join(VARIANTS)}")
        d, limits = cls(), Limits()
        return cls(model=text("MODEL"), providers=text("PROVIDERS"), variant=variant,
                   int8_image=flag("INT8", False), workers=number("WORKERS", None), threads=number("THREADS", None),
                   work_threads=number("WORK_THREADS", None), max_batch=number("MAX_BATCH_SIZE", None),
                   cuda_graphs=flag("CUDA_GRAPHS", False), trt_cache=Path(text("TRT_CACHE") or d.trt_cache),
                   label_cache=number("LABEL_CACHE", d.label_cache), balance=flag("BALANCE", True),
                   debug=flag("DEBUG", False), cuda_visible_devices=env.get(CUDA_VISIBLE),
                   limits=Limits(*(number(name, getattr(limits, attr)) for name, attr in (
                       ("MAX_BYTES", "max_bytes"), ("MAX_PIXELS", "max_pixels"), ("MAX_LABELS", "max_labels"),
                       ("MAX_LABEL_CHARS", "max_label_chars"), ("MAX_IMAGES", "max_images"),
                       ("MAX_TEXTS", "max_texts")))))


_built: tuple[tuple, Settings] | None = None
VERIFIED = PREFIX + "VERIFIED_ARTIFACT"  # not a user setting: the server process tells its workers what it checked


def verified_artifact() -> str:
    return os.environ.get(VERIFIED, "")


def remember_verified(mark: str) -> None:
    """Workers started after this (they inherit the environment) skip hashing the same artifact again."""
    os.environ[VERIFIED] = mark


def settings() -> Settings:
    """The settings of this process's environment (built once; again only if one of its variables changed)."""
    global _built
    key = tuple(sorted((k, v) for k, v in os.environ.items()
                       if (k.startswith(PREFIX) and k != VERIFIED) or k == CUDA_VISIBLE))
    if _built is None or _built[0] != key:
        _built = (key, Settings.from_env())
    return _built[1]
