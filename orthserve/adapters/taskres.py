"""TaskRes (Yu et al., 2023): a learnable residual on the text classifier.

Class embeddings become ``normalize(t + alpha * x)`` where ``t`` are the (normalized)
text embeddings of the class prompts and ``x`` starts at zero, so the initial
classifier is exactly zero-shot CLIP's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterConfig


class TaskResidual(nn.Module):
    def __init__(self, num_classes: int, dim: int, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.enabled = True
        self.residual = nn.Parameter(torch.zeros(num_classes, dim))

    def forward(self, text_features: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return text_features
        return F.normalize(text_features + self.alpha * self.residual.to(text_features.dtype), dim=-1)


@dataclass
class TaskResConfig(AdapterConfig):
    """Attaches to a :class:`~orthserve.classifier.CLIPClassifier`, not to CLIP's weights."""

    method: ClassVar[str] = "taskres"
    alpha: float = 0.5
