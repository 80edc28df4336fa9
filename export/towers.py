"""The two exported graphs and their reduced-precision variants.

The wrappers put the L2 normalization inside the graph, so the service compares
embeddings with a dot product and never re-implements CLIP's post-processing.
We export with the ``torch.export``-based exporter (``dynamo=True``): on torch 2.15
it handles open_clip's ViT / ``nn.MultiheadAttention`` and the Hugging Face BERT text
tower, yields ~3x fewer nodes than the deprecated TorchScript exporter, and is
PyTorch's supported path.

The exported graphs are then fused for onnxruntime (``fuse_for_onnxruntime``): attention,
its q/k/v projections included, becomes one ``Attention`` node and erf-GELU one ``BiasGelu``
node (onnxruntime's contrib ops), which roughly halves the non-matmul work of a small ViT on
CPU (bench/results/inference.md).  For the attention fusion to find its pattern, open_clip's
``nn.MultiheadAttention`` layers are exported through ``sdpa_attention``: the same weights
and math written as three projections and ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

import contextlib
import functools
import io
import warnings
from pathlib import Path
from typing import Sequence

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from orthserve import logs
from orthserve.preprocess import PreprocessSpec

DEFAULT_OPSET = 18
MIN_OPSET = 17
ATTENTION_OPS = ("Attention", "MultiHeadAttention")  # onnxruntime's fused attention (contrib ops)


class ImageTower(nn.Module):
    """uint8 ``[N, 3, H, W]`` (resized and cropped, ``orthserve.preprocess.to_pixels``) -> embeddings.

    The normalization is the graph's first multiply-add, with the constants of ``PreprocessSpec.affine``
    (the same ones ``orthserve.preprocess.normalize`` uses): clients send a quarter of the bytes of float32
    pixels, and on a GPU the fp16 graph normalizes in fp16 on the device."""

    def __init__(self, model: nn.Module, spec: PreprocessSpec) -> None:
        super().__init__()
        self.model = model
        scale, shift = spec.affine()
        self.register_buffer("scale", torch.from_numpy(scale), persistent=False)
        self.register_buffer("shift", torch.from_numpy(shift), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # in the buffers' dtype: fp32 when exported (the fp16 conversion then makes it fp16), bf16 in a bf16 bench
        return F.normalize(self.model.encode_image(pixels.to(self.scale.dtype) * self.scale + self.shift), dim=-1)


class TextTower(nn.Module):
    def __init__(self, model: nn.Module, spec: PreprocessSpec | None = None) -> None:
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


def _sdpa_forward(mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                  attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                  is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nn.MultiheadAttention.forward`` (batch first, eval) as q/k/v projections + SDPA; calls that ask for
    more (attention weights, a padding mask, training) take the class's own forward."""
    if need_weights or key_padding_mask is not None or is_causal or mha.training:
        return nn.MultiheadAttention.forward(mha, query, key, value, key_padding_mask, need_weights, attn_mask,
                                             average_attn_weights, is_causal)
    batch, length, width = query.shape
    heads = mha.num_heads
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # MHA: True = masked out; SDPA: True = kept
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            attn_mask, float("-inf"))
    if attn_mask is not None and attn_mask.dim() == 3:  # MHA's [batch * heads, L, S]
        attn_mask = attn_mask.view(batch, heads, *attn_mask.shape[1:])

    def project(x: torch.Tensor, i: int) -> torch.Tensor:  # slices, not chunk(): they fold into initializers
        rows = slice(i * width, (i + 1) * width)
        bias = mha.in_proj_bias[rows] if mha.in_proj_bias is not None else None
        return F.linear(x, mha.in_proj_weight[rows], bias).view(batch, -1, heads, width // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(project(query, 0), project(key, 1), project(value, 2), attn_mask=attn_mask)
    return mha.out_proj(out.transpose(1, 2).reshape(batch, length, width)), None


@contextlib.contextmanager
def sdpa_attention(model: nn.Module):
    """Within the block, the batch-first ``nn.MultiheadAttention`` layers of ``model`` whose q, k and v share
    one width run ``_sdpa_forward`` (same weights, same function; tests/test_export.py checks it)."""
    layers = [m for m in model.modules()
              if isinstance(m, nn.MultiheadAttention) and m.batch_first and m._qkv_same_embed_dim]
    for layer in layers:
        layer.forward = functools.partial(_sdpa_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again


def fuse_for_onnxruntime(path: Path) -> dict[str, int]:
    """Rewrite the graph at ``path`` in place with onnxscript's onnxruntime fusions; returns their counts.

    Only the fusions that pay on CPU and GPU alike: attention (SDPA -> MultiHeadAttention with its
    biases -> ``Attention``, which also holds the q/k/v projections as one packed matrix multiply) and
    GELU (-> BiasGelu).  The packed form is 1-9% faster than MultiHeadAttention in fp32 and lets int8
    use onnxruntime's fused ``QAttention`` (+6-16%; orthserve-mini, bench/results/inference.md).
    Left out: SkipLayerNormalization (onnxruntime 1.31's CPU kernel is about 3x slower than
    Add + LayerNormalization).  Constants are folded afterwards, so every projection weight is an
    initializer again (int8 can quantize it).
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import ShapeInferencePass
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions import (attention, bias_gelu, erfgelu, mha, mha_bias, mha_scale, sdpa,
                                                 shape_optimization)

    model = ir.load(str(path))
    # the constant folder logs a warning for each shape expression it leaves to onnxruntime
    with logs.dropped("onnxscript.optimizer._constant_folding", logs.constant_folding_failed):
        ShapeInferencePass()(model)  # the shapes the attention patterns check
        optimizer.optimize(model)
        shape_optimization.rules.apply_to_model(model)
        optimizer.optimize(model)
        counts = {"gelu": erfgelu.fuse_erfgelu(model), "sdpa": sdpa.fuse_sdpa(model, apply_shape_inference=True)}
        counts["multi_head_attention"] = mha.fuse_mha1(model) + mha.fuse_mha2(model)
        mha_scale.fuse_mha_scale(model)
        mha_bias.fuse_mha_bias(model)
        counts["attention"] = attention.fuse_attention(model)
        counts["bias_gelu"] = bias_gelu.fuse_bias_gelu(model)
        optimizer.optimize(model, input_size_limit=1 << 40, output_size_limit=1 << 40)
    for node in model.graph:
        # onnxscript always writes the q/k/v widths; equal widths are the op's default, and onnxruntime's
        # quantizer leaves an Attention node that carries them in fp32
        sizes = node.attributes.get("qkv_hidden_sizes") if node.op_type == "Attention" else None
        if sizes is not None and len(set(sizes.as_ints())) == 1:
            del node.attributes["qkv_hidden_sizes"]
    ir.save(model, str(path))
    return counts


def export_tower(model: nn.Module, component: str, example: torch.Tensor, path: Path, spec: PreprocessSpec,
                 opset: int = DEFAULT_OPSET) -> dict[str, int]:
    """Export one tower of a (folded) CLIP model to a single self-contained ONNX file, fused for
    onnxruntime; returns the fusion counts.

    ``example`` (uint8 pixels or int64 tokens) needs a batch of at least 2 so the batch axis is not
    specialized to 1.
    """
    check_opset(opset)
    wrapper = WRAPPERS[component](model, spec).eval()
    input_name = INPUT_NAMES[component]
    batch = torch.export.Dim("batch", min=1)
    # the exporter prints progress lines and warns about things that do not concern us
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), \
            sdpa_attention(wrapper), logs.dropped("onnxscript.optimizer._constant_folding", logs.constant_folding_failed):
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(path), input_names=[input_name], output_names=["embeddings"],
                          opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},), external_data=False)
    fusions = fuse_for_onnxruntime(path)
    onnx.checker.check_model(str(path))
    return fusions


def to_fp16(source: Path, target: Path) -> Path:
    """fp16 weights and compute for GPUs; inputs (uint8 pixels, int64 tokens) and float32 outputs unchanged.

    Uses onnxruntime's own converter (``onnxruntime.transformers.float16``), so no
    extra dependency; ops it knows to be unsafe in fp16 stay in fp32.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))
    return target


def int8_sensitive_nodes(graph: onnx.GraphProto) -> list[str]:
    """The nodes that stay fp32 in the int8 graph: the first attention's projections (the ``Attention`` node,
    which holds query, key and value, or, in a graph fused only to ``MultiHeadAttention``, the three MatMuls
    that feed it), the matrix multiply of its output projection, and the last matrix multiply (the projection
    into the embedding space).

    Keeping the first and last layers in higher precision is the usual rule of post-training quantization;
    here it is measured (bench/results/int8_sensitivity.md): on orthserve-mini these layers (6% of the
    multiply work) are the ones whose int8 error moves top-1 agreement with fp32 on 202 names beyond a few flips."""
    producers = {out: node for node in graph.node for out in node.output}
    attention = next((n for n in graph.node if n.op_type in ATTENTION_OPS), None)
    keep = []
    if attention is not None:
        if attention.op_type == "Attention":
            keep.append(attention.name)
        else:
            keep += [producers[i].name for i in attention.input[:3]
                     if i in producers and producers[i].op_type == "MatMul"]
        keep += [n.name for n in graph.node if n.op_type == "MatMul" and attention.output[0] in n.input]
    matmuls = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    if matmuls and matmuls[-1] not in keep:
        keep.append(matmuls[-1])
    return keep


def to_int8(source: Path, target: Path, keep_fp32: Sequence[str] | None = None) -> Path:
    """Dynamic int8 quantization of the matrix multiplies (weights per channel, activations on the fly),
    for CPUs, except the few that int8's error hurts most (``int8_sensitive_nodes``).  ``Attention`` nodes
    become onnxruntime's ``QAttention`` (int8 q/k/v projections, attention itself in fp32), except those with
    an attention bias (a padding mask), which QAttention cannot take.  The
    patch-embedding convolution stays fp32 (onnxruntime's ConvInteger was slow for its share of the work, and
    the first layer's precision carries through). GELU becomes its tanh form (``FastGelu``) with its bias an
    ``Add`` that onnxruntime folds into the int8 multiply before it (the fused ``BiasGelu`` was a fifth of the
    int8 image tower's time). Weights use 7 of their 8 bits (``reduce_range``): on CPUs without VNNI or AMX
    onnxruntime multiplies uint8 activations by int8 weights with ``vpmaddubsw``, which adds two products in a
    saturating int16 (255 x 127 x 2 overflows it; 255 x 64 x 2 fits). The measurements behind each choice:
    ``bench/results/int8_design_choices.md``.
    ``keep_fp32``: the nodes to leave in fp32 instead (bench/int8_sensitivity.py tries others)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source)).graph
    keep_fp32 = list(int8_sensitive_nodes(graph) if keep_fp32 is None else keep_fp32)
    # QAttention has no attention-bias input (the text tower's padding mask): the quantizer would drop it
    keep_fp32 += [n.name for n in graph.node if n.op_type == "Attention" and any(n.input[5:])]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            logs.dropped(None, logs.quantizer_preprocessing_hint):
        warnings.simplefilter("ignore")
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=["MatMul", "Gemm", "Attention"], nodes_to_exclude=list(keep_fp32))
    model = onnx.load(str(target))
    nodes = []
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.op_type in ("BiasGelu", "Gelu"):
            node.op_type = "FastGelu"  # same inputs (x and an optional bias), same output
            if len(node.input) > 1 and node.input[1]:
                nodes.append(_bias_as_add(node))
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(target))
    return target


def _bias_as_add(gelu: onnx.NodeProto) -> onnx.NodeProto:
    """Move a GELU's bias into an ``Add`` before it (rewiring ``gelu``): onnxruntime folds that Add into the
    int8 matrix multiply that feeds it (one pass over the activations fewer; +2-5% img/s, same outputs)."""
    biased = gelu.output[0] + "/biased"
    add = onnx.helper.make_node("Add", [gelu.input[0], gelu.input[1]], [biased], name=gelu.name + "/bias")
    del gelu.input[1:]
    gelu.input[0] = biased
    return add


VARIANT_BUILDERS = {"fp16": to_fp16, "int8": to_int8}


def check_variants(variants: Sequence[str]) -> list[str]:
    """Unique variant names in order; an unknown name is a user error."""
    unknown = [v for v in variants if v not in VARIANT_BUILDERS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; choose from {sorted(VARIANT_BUILDERS)}")
    return list(dict.fromkeys(variants))
