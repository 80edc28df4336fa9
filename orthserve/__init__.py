"""orthserve: adapt CLIP with a few labelled images, fold the adapters away, serve it.

The names below load on first use (PEP 562), so ``import orthserve.artifact`` or ``orthserve.preprocess``
(what the service needs) does not pull in torch, open_clip or transformers.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOMES = {
    ".adapters": ("AOFTConfig", "LoRAConfig", "OrthogonalConfig", "TaskResConfig"),
    ".classifier": ("CLIPClassifier",),
    ".errors": ("WeightsUnavailableError",),
    ".models": ("get_tokenizer", "load_model", "resolve_pretrained"),
    ".surgery": ("adapter_parameters", "batched_rotations", "bypass", "count_trainable", "disable_adapter",
                 "fast_rotations", "fold", "inject", "load_adapters", "max_orthogonality_error", "merge_and_unload",
                 "rotate_inputs", "save_adapters"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    if name not in _HOME_OF:
        raise AttributeError(f"module 'orthserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME_OF[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
