"""The library's own exceptions (a module of their own, so any module can raise them without import circles)."""
from __future__ import annotations


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded; the message says which and how to pass a file."""
