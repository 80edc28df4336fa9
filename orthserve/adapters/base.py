"""What every weight adapter shares.

Each adapter is a ``torch.nn.utils.parametrize`` parametrization of one frozen weight
tensor: ``module.weight`` becomes ``adapter(original_weight)``.  That gives us, for
free, the three things the product needs: training only the adapter's parameters,
folding (``remove_parametrizations(..., leave_parametrized=True)`` writes the merged
weight back), and a bypass (an adapter that is switched off returns the weight as is).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn


class WeightAdapter(nn.Module):
    """Base of every parametrization: ``forward(weight) -> adapted weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True  # False inside `bypass(...)`: the frozen model's weight
        # True inside `surgery.rotate_inputs(...)`: a hook applies the adapter to the module's
        # input instead, so the weight reads as is.
        self.applied_to_input = False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.adapt(weight) if self.enabled and not self.applied_to_input else weight

    def adapt(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class AdapterConfig:
    """Base config: ``targets`` are regular expressions searched in module names."""

    method: ClassVar[str] = ""
    targets: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}

    def make(self, weight: torch.Tensor, slices: int) -> WeightAdapter:
        """Build the adapter for one weight; ``slices`` > 1 for packed q/k/v weights."""
        raise NotImplementedError
