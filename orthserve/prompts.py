"""Prompts and zero-shot class embeddings: the one implementation training, export, the service and the
benchmarks use (as open_clip's ``build_zero_shot_classifier``).

A template is a string with ``{}`` where the class name goes (``"a photo of a {}."``); it is filled by
plain replacement, so braces in class names or elsewhere in a template are just text. A class embedding
is the mean of its prompts' normalized embeddings, normalized again (CLIP's prompt ensembling).
Works on NumPy arrays (the service) and torch tensors (training, export) alike. Torch-free.

The service uses the templates stored in its artifact: export's ``--template`` (default
:data:`DEFAULT_TEMPLATES`, or the training run's templates).
"""
from __future__ import annotations

from typing import Sequence, TypeVar

Array = TypeVar("Array")  # numpy.ndarray or torch.Tensor
SLOT = "{}"
DEFAULT_TEMPLATES = ("a photo of a {}.",)  # training, evaluation and export, unless --template says otherwise


def check_templates(templates: Sequence[str]) -> list[str]:
    """The templates, or a ValueError naming the first without exactly one ``{}``."""
    templates = list(templates)
    if not templates:
        raise ValueError("give at least one prompt template, e.g. 'a photo of a {}.'")
    for template in templates:
        if not isinstance(template, str) or template.count(SLOT) != 1:
            raise ValueError(f"prompt template {template!r} needs exactly one {SLOT} where the class name goes, "
                             "e.g. 'a photo of a {}.'")
    return templates


def fill(template: str, classname: str) -> str:
    return template.replace(SLOT, classname)


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Class-major: every template of the first class, then of the second, ..."""
    check_templates(templates)
    return [fill(t, c) for c in classnames for t in templates]


def unit(x: Array) -> Array:
    """Rows scaled to length 1 (as ``F.normalize``: lengths below 1e-12 count as 1e-12)."""
    return x / ((x * x).sum(-1)[..., None] ** 0.5).clip(min=1e-12)


def class_embeddings(prompt_embeddings: Array, n_classes: int, n_templates: int) -> Array:
    """``[n_classes, D]`` from class-major prompt embeddings ``[n_classes * n_templates, D]`` (extra rows ignored)."""
    per_prompt = unit(prompt_embeddings[: n_classes * n_templates])
    return unit(per_prompt.reshape(n_classes, n_templates, -1).mean(1))
