"""Adapter methods: each a config (what to adapt, hyper-parameters) plus a module.

Injection, folding, the bypass and adapter-only checkpoints live in one place,
:mod:`orthserve.surgery`.
"""
from .base import AdapterConfig, WeightAdapter
from .lowrank import AOFT, ATTENTION_TARGETS, LoRA, AOFTConfig, LoRAConfig
from .cayley import cayley, orthogonality_error
from .orthogonal import FFN_TARGETS, BlockRotation, OrthogonalConfig, batched_rotation_blocks
from .taskres import TaskResConfig, TaskResidual

# One name per method: the training CLI's --method, the config's ``method`` and the benchmarks' names
# (``orthcr+taskres`` is two configs; bench variants are ``<method>-<variant>``, e.g. ``orthcr-bs32``).
METHODS: dict[str, type[AdapterConfig]] = {
    cls.method: cls for cls in (OrthogonalConfig, LoRAConfig, AOFTConfig, TaskResConfig)
}
LEGACY_NAMES = {"orthogonal": "orthcr"}  # read in files written before the names were one


def config_from_dict(data: dict) -> AdapterConfig:
    """Inverse of ``AdapterConfig.to_dict``."""
    data = dict(data)
    method = data.pop("method", None)
    method = LEGACY_NAMES.get(method, method)
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; known: {sorted(METHODS)}")
    if "targets" in data:
        data["targets"] = tuple(data["targets"])
    return METHODS[method](**data)


__all__ = [
    "AdapterConfig", "WeightAdapter", "BlockRotation", "LoRA", "AOFT", "TaskResidual",
    "OrthogonalConfig", "LoRAConfig", "AOFTConfig", "TaskResConfig",
    "FFN_TARGETS", "ATTENTION_TARGETS", "METHODS", "config_from_dict", "cayley", "orthogonality_error",
    "batched_rotation_blocks",
]
