"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

The one home of the pattern: write a temporary file beside the target, named
``.<name>.tmp-<pid>-<random>`` (unique even for two processes writing the same file), then
``os.replace`` it over the target. A writer killed midway leaves only the temporary file, which no
loader opens (``training.finetune`` removes them from its run directory). Torch-free.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

TEMP_MARK = ".tmp-"  # every temporary name contains it: ``.<name>.tmp-<pid>-<random>``


def temporary_name(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def readable_mode() -> int:
    """0o666 less the umask: what ``open`` would have given (safetensors and mkstemp write owner-only files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(temporary path)``, then move it over ``path``; the temporary file never outlives the call."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        tmp.chmod(readable_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
