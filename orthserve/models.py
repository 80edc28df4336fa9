"""One entry point that turns ``(model name, pretrained)`` into a ready model.

Modelled on open_clip's factory: a name is an open_clip registry name (ours are
registered on import) or a path to an open_clip JSON config; ``pretrained`` is an
open_clip tag, a local checkpoint file, or ``"none"`` for random weights.  We never
fall back to random weights silently: if weights were asked for and cannot be had,
:class:`WeightsUnavailableError` says which model, which tag, and how to pass a file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from . import mini
from .errors import WeightsUnavailableError

CONFIG_DIR = Path(__file__).parent / "model_configs"
NO_WEIGHTS = ("none", "", None)

open_clip.add_model_config(CONFIG_DIR)


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


HUB_PREFIXES = ("hf-hub:", "local-dir:")  # open_clip's own: config and weights come with the name


def resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    """The command lines' weights rule: never random weights unless ``none`` is asked for.

    ``None`` (the flag left out) means orthserve-mini's embedded weights for orthserve-mini, the
    weights that come with an ``hf-hub:`` / ``local-dir:`` name, and an error for every other model.
    """
    if name.startswith(HUB_PREFIXES):
        if pretrained not in (None, "none", ""):
            raise WeightsUnavailableError(f"{name} brings its own weights: leave --pretrained out")
        return None
    if pretrained is None:
        if name == mini.MODEL_NAME:
            return "default"
        name = resolve_model_name(name)  # an unknown name is the first thing to say
        tags = open_clip.list_pretrained_tags_by_model(name) if name in open_clip.list_models() else []
        raise WeightsUnavailableError(
            f"--pretrained is required for {name}: one of its open_clip tags ({', '.join(tags) or 'none known'}), "
            f"a local checkpoint file, or 'none' for random weights (smoke tests only); "
            f"the built-in model runs offline with --model {mini.MODEL_NAME}")
    known = open_clip.list_pretrained_tags_by_model(name) if name in open_clip.list_models() else []
    if known and pretrained not in (*NO_WEIGHTS, "default", *known) and not _looks_like_path(pretrained):
        raise WeightsUnavailableError(f"--pretrained {pretrained!r} is neither a tag of {name} ({', '.join(known)}) "
                                      "nor a checkpoint file (.safetensors, .pt, ... or a path)")
    if pretrained == "default" and name != mini.MODEL_NAME:
        raise WeightsUnavailableError(
            f"--pretrained default means {mini.MODEL_NAME}'s embedded weights; {name} needs an open_clip tag "
            f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none known'}) or a local checkpoint file")
    return pretrained


def resolve_model_name(name: str) -> str:
    """Accept a registry name, a path to an open_clip JSON model config, or an ``hf-hub:`` / ``local-dir:`` name."""
    if name.startswith(HUB_PREFIXES):
        return name
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"model config file {name!r} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown model {name!r}: not an open_clip model name and not a .json config file "
            f"(see open_clip.list_models(); ours: orthserve-tiny, orthserve-mini)"
        )
    return name


def load_model(
    name: str,
    pretrained: str | None = "none",
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor], Callable[..., torch.Tensor]]:
    """Return ``(model, preprocess, tokenizer)`` in eval mode on ``device``.

    Note the order: open_clip's ``create_model_and_transforms`` returns ``(model, preprocess_train,
    preprocess_val)`` and the tokenizer comes from ``get_tokenizer``; here the third item is the tokenizer.

    ``preprocess`` is open_clip's eval transform (PIL image -> tensor); the service and
    export use the NumPy twin in :mod:`orthserve.preprocess`, tested equal to it.
    """
    name = mini.register() if name == mini.MODEL_NAME else resolve_model_name(name)
    checkpoint = None if pretrained in NO_WEIGHTS else str(pretrained)
    if checkpoint == "default" and name == mini.MODEL_NAME:
        # text weights come from the MiniLM package; ours hold the image tower only
        default_weights = mini.default_weights_path(must_exist=True)
        model, preprocess, tokenizer = load_model(name, "none", device)
        mini.load_default_weights(model, default_weights)
        return model.to(device).eval(), preprocess, tokenizer
    if checkpoint is not None and _looks_like_path(checkpoint) and not Path(checkpoint).is_file():
        raise WeightsUnavailableError(
            f"checkpoint file {checkpoint!r} for model {name!r} does not exist; "
            f"pass an existing open_clip checkpoint (.safetensors/.pt) or 'none' for random weights"
        )
    try:
        if name == mini.MODEL_NAME:  # open_clip builds the ViT; the conv stem goes in before any weights
            model, preprocess = mini.create(device)
            if checkpoint is not None:
                open_clip.load_checkpoint(model, checkpoint, device=device)
        else:
            from . import logs

            asked_for_none = logs.dropped(None, lambda m: checkpoint is None and m.startswith("No pretrained weights loaded"))
            with asked_for_none:  # random weights were asked for: the CLIs say so once, in their own words
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=checkpoint, device=device)
    except Exception as err:  # network errors, unknown tags, bad files all surface here
        if name.startswith(HUB_PREFIXES):
            raise WeightsUnavailableError(
                f"could not load {name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}. Without network "
                f"access, download the repository elsewhere and pass --model local-dir:/path/to/it") from err
        if checkpoint is None:
            raise
        hint = (
            f"could not load pretrained weights {checkpoint!r} for model {name!r}: {err}. "
            f"Known tags for this model: {open_clip.list_pretrained_tags_by_model(name) or 'none'}. "
            f"Without network access, download the weights elsewhere and pass the local file, "
            f"e.g. --pretrained /path/to/{name}.safetensors, or --pretrained none for random weights."
        )
        raise WeightsUnavailableError(hint) from err
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess, tokenizer


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def get_tokenizer(name: str) -> Callable[..., torch.Tensor]:
    """open_clip tokenizer for a model name (registers orthserve-mini first)."""
    name = mini.register() if name == mini.MODEL_NAME else resolve_model_name(name)
    return open_clip.get_tokenizer(name)
