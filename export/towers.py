"""The two exported graphs and their reduced-precision variants.

The wrappers put the L2 normalization inside the graph, so the service compares
embeddings with a dot product and never re-implements CLIP's post-processing.
We export with the ``torch.export``-based exporter (``dynamo=True``): on torch 2.15
it handles open_clip's ViT / ``nn.MultiheadAttention`` and the Hugging Face BERT text
tower, yields ~3x fewer nodes than the deprecated TorchScript exporter, and is
PyTorch's supported path.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Sequence

import onnx
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_OPSET = 18
MIN_OPSET = 17


class ImageTower(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels), dim=-1)


class TextTower(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens), dim=-1)


INPUT_NAMES = {"image": "pixels", "text": "tokens"}
WRAPPERS = {"image": ImageTower, "text": TextTower}


def check_opset(opset: int) -> int:
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: use {MIN_OPSET} or later")
    return opset


def export_tower(model: nn.Module, component: str, example: torch.Tensor, path: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export one tower of a (folded) CLIP model to a single self-contained ONNX file.

    ``example`` needs a batch of at least 2 so the batch axis is not specialized to 1.
    """
    check_opset(opset)
    wrapper = WRAPPERS[component](model).eval()
    input_name = INPUT_NAMES[component]
    batch = torch.export.Dim("batch", min=1)
    # the exporter prints progress lines and warns about things that do not concern us
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(path), input_names=[input_name], output_names=["embeddings"],
                          opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},), external_data=False)
    onnx.checker.check_model(str(path))
    return path


def to_fp16(source: Path, target: Path) -> Path:
    """fp16 weights and compute for GPUs; inputs and outputs stay float32 (the contract).

    Uses onnxruntime's own converter (``onnxruntime.transformers.float16``), so no
    extra dependency; ops it knows to be unsafe in fp16 stay in fp32.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))
    return target


def to_int8(source: Path, target: Path) -> Path:
    """Dynamic int8 quantization of the weights (activations quantized on the fly), for CPUs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    return target


VARIANT_BUILDERS = {"fp16": to_fp16, "int8": to_int8}


def check_variants(variants: Sequence[str]) -> list[str]:
    """Unique variant names in order; an unknown name is a user error."""
    unknown = [v for v in variants if v not in VARIANT_BUILDERS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; choose from {sorted(VARIANT_BUILDERS)}")
    return list(dict.fromkeys(variants))
