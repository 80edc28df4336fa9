"""CLIP as a classifier over a fixed set of class names.

Class embeddings are the mean of the normalized text embeddings of each class's prompts
(one per template), renormalized, as in CLIP's zero-shot recipe.  They are recomputed on
every call when the text tower is being adapted (so gradients reach text adapters) and
computed once otherwise.  An optional TaskRes residual sits on top.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import TaskResConfig, TaskResidual, WeightAdapter
from .prompts import DEFAULT_TEMPLATES, check_templates, class_embeddings, prompts  # noqa: F401  (DEFAULT_TEMPLATES re-exported)



def is_text_side(name: str) -> bool:
    """open_clip keeps the image tower under ``visual``; everything else but the scale is text."""
    return not name.startswith("visual") and "logit_scale" not in name and "logit_bias" not in name


class CLIPClassifier(nn.Module):
    def __init__(self, model: nn.Module, tokenizer: Callable, classnames: Sequence[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES) -> None:
        super().__init__()
        if not classnames:
            raise ValueError("a classifier needs at least one class name")
        self.model = model
        self.classnames, self.templates = list(classnames), check_templates(templates)
        tokens = tokenizer(prompts(self.classnames, self.templates))
        self.register_buffer("prompt_tokens", tokens.view(len(self.classnames), len(self.templates), -1), persistent=False)
        self.taskres: TaskResidual | None = None
        self._cached_text: tuple[tuple, torch.Tensor] | None = None  # (text tower's tensors when computed, features)

    def add_taskres(self, config: TaskResConfig) -> TaskResidual:
        dim = self.text_features().shape[-1]
        self.taskres = TaskResidual(len(self.classnames), dim, config.alpha).to(self.prompt_tokens.device)
        return self.taskres

    def text_is_adapted(self) -> bool:
        return any(p.requires_grad for n, p in self.model.named_parameters() if is_text_side(n)) or any(
            isinstance(m, WeightAdapter) for n, m in self.model.named_modules() if is_text_side(n))

    def _text_tensors(self) -> tuple:
        """Which tensors the text tower is made of now: inject, fold and load_state_dict(assign=True) change it."""
        return tuple((n, id(t), t.data_ptr()) for n, t in self.model.state_dict(keep_vars=True).items() if is_text_side(n))

    def text_features(self) -> torch.Tensor:
        """``[classes, dim]`` normalized prompt-ensemble embeddings from the (adapted) text tower.

        Computed once while the text tower is frozen and made of the same tensors; recomputed on every call
        while it is adapted (gradients reach text adapters). After changing frozen text weights in place
        (``copy_``), call :meth:`forget_text_features`."""
        adapted = self.text_is_adapted()
        if not adapted and self._cached_text is not None and self._cached_text[0] == self._text_tensors():
            return self._cached_text[1]
        classes, templates, length = self.prompt_tokens.shape
        with torch.set_grad_enabled(torch.is_grad_enabled() and adapted):
            features = class_embeddings(self.model.encode_text(self.prompt_tokens.view(-1, length)), classes, templates)
        self._cached_text = None if adapted else (self._text_tensors(), features.detach())
        return features

    def forget_text_features(self) -> None:
        self._cached_text = None

    def class_embeddings(self) -> torch.Tensor:
        features = self.text_features()
        return self.taskres(features) if self.taskres is not None else features

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(images), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, classes]``."""
        image = self.image_features(images)
        return self.model.logit_scale.exp() * image @ self.class_embeddings().to(image.dtype).T
