"""Additive low-rank adapters ``W' = W + scale * B A``: LoRA and AOFT.

Both accept packed attention weights (``nn.MultiheadAttention.in_proj_weight`` is
``[3d, d]``, q/k/v stacked): with ``slices=3`` each of q, k and v gets its own pair,
like CLIP-LoRA, and the delta is their concatenation along the output dimension.

AOFT (Yang et al., 2025, "Approximately Orthogonal Fine-Tuning") generates each
projection from one learnable vector so its rank vectors are (nearly) orthogonal.
Their code is not public; our documented construction: the down projection ``A``
(``r x in``) is the first r rows of the Householder reflection
``H(v) = I - 2 v v^T / |v|^2`` of a learnable ``v in R^in``; the up projection ``B``
(``out x r``) is the first r columns of ``H(u)``, ``u in R^out``; a learnable
per-rank scale ``s`` (zero at init) sits between them: ``delta = B diag(s) A``.
Rows of a Householder matrix are exactly orthonormal, so the rank vectors are
orthogonal up to rounding, at ``in + out + r`` parameters per slice (LoRA: ``r (in + out)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import AdapterConfig, WeightAdapter

# Attention of open_clip blocks (packed nn.MultiheadAttention) and of HF BERT towers.
ATTENTION_TARGETS = (r"\.attn$", r"attention\.self\.(query|key|value)$")


class LowRankDelta(WeightAdapter):
    """Base: ``W + scale * concat_s(B_s A_s)`` over ``slices`` row-slices of W."""

    def __init__(self, slices: int, scale: float) -> None:
        super().__init__()
        self.slices, self.scale = slices, scale

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

    def adapt(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * self.delta().to(weight.dtype)


class LoRA(LowRankDelta):
    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, slices: int = 1) -> None:
        super().__init__(slices, scale)
        self.down = nn.Parameter(torch.empty(slices, rank, in_features))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # as nn.Linear / PEFT
        self.up = nn.Parameter(torch.zeros(slices, out_features // slices, rank))

    def delta(self) -> torch.Tensor:
        return torch.cat(list(self.up @ self.down), dim=0)


def householder_rows(v: torch.Tensor, count: int) -> torch.Tensor:
    """First ``count`` rows of ``I - 2 v v^T / |v|^2`` for a batch ``v: [s, n]`` -> ``[s, count, n]``."""
    unit = v / v.norm(dim=-1, keepdim=True)
    eye = torch.eye(count, v.shape[-1], dtype=v.dtype, device=v.device)
    return eye - 2 * unit[:, :count, None] * unit[:, None, :]


class AOFT(LowRankDelta):
    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, slices: int = 1) -> None:
        super().__init__(slices, scale)
        self.rank = rank
        self.down_vector = nn.Parameter(torch.randn(slices, in_features) / math.sqrt(in_features))
        self.up_vector = nn.Parameter(torch.randn(slices, out_features // slices) / math.sqrt(in_features))
        self.scales = nn.Parameter(torch.zeros(slices, rank))

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down [s, r, in], up [s, out/s, r])``."""
        down = householder_rows(self.down_vector, self.rank)
        up = householder_rows(self.up_vector, self.rank).transpose(-1, -2)
        return down, up

    def delta(self) -> torch.Tensor:
        down, up = self.projections()
        return torch.cat(list((up * self.scales[:, None, :]) @ down), dim=0)


@dataclass
class LoRAConfig(AdapterConfig):
    """CLIP-LoRA's recipe: q, k, v of every attention block, rank 2, scale alpha/sqrt(r)."""

    method: ClassVar[str] = "lora"
    targets: tuple[str, ...] = ATTENTION_TARGETS
    rank: int = 2
    alpha: float = 1.0

    def make(self, weight: torch.Tensor, slices: int) -> WeightAdapter:
        return LoRA(weight.shape[0], weight.shape[1], self.rank, self.alpha / math.sqrt(self.rank), slices)


@dataclass
class AOFTConfig(AdapterConfig):
    """Householder-generated low-rank adapter; same targets as LoRA by default."""

    method: ClassVar[str] = "aoft"
    targets: tuple[str, ...] = ATTENTION_TARGETS
    rank: int = 4
    alpha: float = 1.0

    def make(self, weight: torch.Tensor, slices: int) -> WeightAdapter:
        return AOFT(weight.shape[0], weight.shape[1], self.rank, self.alpha, slices)
