"""Everything that changes a model's structure: inject, fold, bypass, adapter checkpoints.

Weight adapters are ``torch.nn.utils.parametrize`` parametrizations, so a targeted
``module.weight`` reads as ``adapter(original)``.  Folding is PyTorch's own
``remove_parametrizations(..., leave_parametrized=True)``; afterwards the model is a
plain open_clip model with the base model's exact state_dict keys.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from torch.nn.utils import parametrize

from .files import atomic_write
from .adapters.cayley import resolve_kernel
from .adapters import (AdapterConfig, BlockRotation, TaskResConfig, TaskResidual, WeightAdapter, batched_rotation_blocks,
                       config_from_dict, orthogonality_error)
from .classifier import CLIPClassifier

ADAPTER_FORMAT = "orthserve-adapters/1"


def _clip_of(target: nn.Module) -> nn.Module:
    return target.model if isinstance(target, CLIPClassifier) else target


def _targets(model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, nn.Module, str, int]]:
    """``(module name, module, tensor name, slices)`` for every weight the patterns select."""
    found = []
    for name, module in model.named_modules():
        if not any(re.search(p, name) for p in patterns):
            continue
        if isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim:
                raise ValueError(f"{name}: separate q/k/v projection weights are not supported")
            found.append((name, module, "in_proj_weight", 3))
        elif isinstance(module, nn.Linear):
            found.append((name, module, "weight", 1))
    return found


def freeze_all_but_adapters(target: nn.Module) -> None:
    adapter_params = {id(p) for p in adapter_parameters(target).values()}
    for p in target.parameters():
        p.requires_grad_(id(p) in adapter_params)


def inject(target: nn.Module, config: AdapterConfig) -> list[str]:
    """Attach one adapter method; returns the adapted tensors' names. Freezes all else.

    ``target`` is an open_clip model or a :class:`CLIPClassifier` (required for TaskRes).
    """
    if isinstance(config, TaskResConfig):
        if not isinstance(target, CLIPClassifier):
            raise TypeError("TaskRes adapts a classifier: pass a CLIPClassifier, not a bare model")
        target.add_taskres(config)
        freeze_all_but_adapters(target)
        return ["taskres.residual"]
    model = _clip_of(target)
    selected = _targets(model, config.targets)
    if not selected:
        raise ValueError(f"{config.method}: no nn.Linear or nn.MultiheadAttention matches targets {list(config.targets)}")
    device = next(model.parameters()).device
    for name, module, tensor_name, slices in selected:
        weight = getattr(module, tensor_name)
        adapter = config.make(weight, slices).to(device)
        parametrize.register_parametrization(module, tensor_name, adapter)
    freeze_all_but_adapters(target)
    return [f"{name}.{tensor_name}" for name, _, tensor_name, _ in selected]


def adapters(target: nn.Module) -> Iterator[nn.Module]:
    for module in target.modules():
        if isinstance(module, (WeightAdapter, TaskResidual)):
            yield module


@contextlib.contextmanager
def bypass(*targets: nn.Module) -> Iterator[None]:
    """Switch every adapter off: the same module computes the frozen pretrained model.

    Cross-regularization uses this to get the frozen model's logits without a copy.
    """
    switched = [m for t in targets for m in adapters(t) if m.enabled]
    for m in switched:
        m.enabled = False
    try:
        yield
    finally:
        for m in switched:
            m.enabled = True


@contextlib.contextmanager
def rotate_inputs(*targets: nn.Module) -> Iterator[int]:
    """Training shortcut: apply orthogonal adapters to the input where that is cheaper.

    ``linear(x, W R) == linear(x R^T, W)``.  The weight-side form needs the full weight gradient
    ``dL/d(W R)`` (as costly as the layer's forward, on ViT-B-16's ``c_fc`` too), while on a
    layer with many more outputs than the block size the input-side form costs a small fraction
    of that.  Inside this context such ``nn.Linear`` layers (those whose only parametrization is a
    :class:`BlockRotation`) rotate their input through a forward pre-hook and read their weight
    unrotated; everything else, and everything after the context (folding, export), is unchanged.
    Yields how many layers were switched.
    """
    switched: list[tuple[BlockRotation, torch.utils.hooks.RemovableHandle]] = []

    def hook(adapter: BlockRotation):
        def rotate(_module: nn.Module, args: tuple) -> tuple | None:
            return (adapter.rotate_input(args[0]), *args[1:]) if adapter.enabled else None
        return rotate

    for target in targets:
        for module in _clip_of(target).modules():
            if not (isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight")):
                continue
            chain = module.parametrizations.weight
            adapter = chain[0]
            if len(chain) == 1 and isinstance(adapter, BlockRotation) and adapter.cheaper_on_input(module.out_features):
                adapter.applied_to_input = True
                switched.append((adapter, module.register_forward_pre_hook(hook(adapter))))
    try:
        yield len(switched)
    finally:
        for adapter, handle in switched:
            handle.remove()
            adapter.applied_to_input = False


@contextlib.contextmanager
def batched_rotations(*targets: nn.Module) -> Iterator[int]:
    """Compute every enabled orthogonal adapter's rotation once per forward pass of ``target``, in one
    batched Cayley transform per block size (:func:`~orthserve.adapters.batched_rotation_blocks`).

    Per layer, a step would run one small transform per adapted weight (48 on ViT-B-16, each many tiny
    GPU kernels); batched, the count no longer grows with the layers. A forward pre-hook on each target
    fills the adapters' ``precomputed`` blocks and a forward hook (also on error) clears them, so nothing
    stale outlives the pass. Only calls of ``target`` itself are batched. On the CPU's LU kernel, adapters
    applied to the weight solve with it directly instead (``BlockRotation.solves_weight``). Yields the
    adapters covered.
    """
    handles = []
    covered = 0
    for target in targets:
        rotations = [m for m in target.modules() if isinstance(m, BlockRotation)]
        covered += len(rotations)
        if not rotations:
            continue

        def fill(_module, _args, rotations=rotations) -> None:
            active = [r for r in rotations if r.enabled and not r.solves_weight()]
            for rotation, blocks in zip(active, batched_rotation_blocks(active)):
                rotation.precomputed = blocks

        def clear(_module, _args, _output, rotations=rotations) -> None:
            for rotation in rotations:
                rotation.precomputed = None

        handles += [target.register_forward_pre_hook(fill), target.register_forward_hook(clear, always_call=True)]
    try:
        yield covered
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def fast_rotations(*targets: nn.Module) -> Iterator[None]:
    """The training-time form of orthogonal adapters: :func:`batched_rotations` and :func:`rotate_inputs`.

    Same function as without it; enter it once around the training loop (hooks registered once keep
    ``torch.compile`` from recompiling).
    """
    with batched_rotations(*targets), rotate_inputs(*targets):
        yield


def set_cayley_kernel(target: nn.Module, kernel: str) -> int:
    """Choose how every orthogonal adapter of ``target`` inverts ``I - Q`` ("auto", "lu", "newton"; see
    :mod:`orthserve.adapters.cayley`). All give the same R where they converge; returns how many changed."""
    rotations = [m for m in adapters(target) if isinstance(m, BlockRotation) and m.kernel != kernel]
    for rotation in rotations:
        rotation.kernel = kernel
    return len(rotations)


def max_orthogonality_error(target: nn.Module) -> float:
    """``max |R^T R - I|`` over every orthogonal adapter of ``target`` (one host read; for log intervals)."""
    rotations = [m for m in adapters(target) if isinstance(m, BlockRotation)]
    if not rotations:
        return 0.0
    with torch.no_grad():
        errors = [orthogonality_error(blocks) for blocks in batched_rotation_blocks(rotations)]
    return float(torch.stack(errors).max())


def max_kernel_drift(target: nn.Module) -> float:
    """``max |R - R_lu|`` over the exact orthogonal adapters of ``target``: how far the kernel in use is
    from the LU kernel (exact at any size). 0, with nothing computed, where LU is in use already (a CPU).
    One host read."""
    rotations = [m for m in adapters(target) if isinstance(m, BlockRotation) and m.mode == "exact"
                 and resolve_kernel(m.kernel, m.generator.device) != "lu"]
    if not rotations:
        return 0.0
    with torch.no_grad():
        drifts = [(mine - lu).abs().amax() for mine, lu in
                  zip(batched_rotation_blocks(rotations), batched_rotation_blocks(rotations, kernel="lu"))]
    return float(torch.stack(drifts).max())


def adapter_parameters(target: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters owned by adapters, keyed by their state_dict names."""
    owned = {id(p) for m in adapters(target) for p in m.parameters()}
    return {n: p for n, p in target.named_parameters() if id(p) in owned}


def count_trainable(target: nn.Module) -> int:
    return sum(p.numel() for p in target.parameters() if p.requires_grad)


def fold(target: nn.Module) -> nn.Module:
    """Merge every weight adapter into its weight and remove it (in place); returns target.

    TaskRes cannot be folded into CLIP's weights: export folds it into the classifier
    matrix (``CLIPClassifier.class_embeddings``) instead.
    """
    model = _clip_of(target)
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations.keys()):
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return target


# Hugging Face PEFT's names for the same operations (docs/LIBRARY.md maps the rest)
disable_adapter = bypass


def merge_and_unload(target: nn.Module) -> nn.Module:
    """PEFT's name for :func:`fold`: merge every weight adapter into its weight and remove it (in place)."""
    return fold(target)


def save_adapters(path: str | Path, target: nn.Module, configs: Sequence[AdapterConfig]) -> Path:
    """Write only the adapters' tensors (safetensors) with their configs in the metadata.

    The configs are also written beside it as ``<name>.json`` for people to read.
    Both files are written atomically (temporary file, then rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().float().cpu().contiguous() for n, p in adapter_parameters(target).items()}
    meta = json.dumps({"format": ADAPTER_FORMAT, "adapters": [c.to_dict() for c in configs]})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"orthserve": meta}))
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(json.loads(meta), indent=2)))
    return path


def read_adapter_configs(path: str | Path) -> list[AdapterConfig]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("orthserve")
    if meta is None:
        raise ValueError(f"{path}: not an orthserve adapter file (no 'orthserve' metadata)")
    data = json.loads(meta)
    if data.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: adapter format {data.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    return [config_from_dict(c) for c in data["adapters"]]


def load_adapters(path: str | Path, target: nn.Module) -> list[AdapterConfig]:
    """Inject the adapters recorded in ``path`` into a fresh base ``target`` and load their weights."""
    configs = read_adapter_configs(path)
    for config in configs:
        inject(target, config)
    tensors = load_file(str(path))
    expected = adapter_parameters(target)
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this model: {len(missing)} adapter tensors missing "
            f"(e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]}); "
            "was it trained on a different model or class list?")
    with torch.no_grad():
        for name, param in expected.items():
            if param.shape != tensors[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, model expects {tuple(param.shape)}")
            param.copy_(tensors[name])
    return configs
