"""Export: every adapter method folds and exports with parity; graphs, variants, checkpoint."""
from __future__ import annotations

import collections
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import pytest
import torch
import torch.nn.functional as F

import export
from export import towers, verify
from conftest import REPO, requires_data
from export_helpers import CLASSES, METHODS, TINY, base_checkpoint, make_run
from orthserve.artifact import load_artifact
from orthserve.preprocess import normalize
from orthserve.runs import load_run

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return base_checkpoint(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def method_artifacts(checkpoint, tmp_path_factory) -> dict:
    """method -> (run dir, artifact), exported once per module (dynamo export is the slow part)."""
    cache: dict = {}

    def get(method: str):
        if method not in cache:
            root = tmp_path_factory.mktemp(method.replace("+", "-"))
            run_dir = make_run(root / "run", checkpoint, method)
            export.export_artifact(export.from_run(run_dir), root / "art")
            cache[method] = run_dir, load_artifact(root / "art")
        return cache[method]
    return get


@pytest.fixture(scope="module")
def all_run(checkpoint, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "all", checkpoint, "all")


@pytest.fixture(scope="module")
def all_artifact(all_run, tmp_path_factory):
    """Orthogonal + LoRA + AOFT + TaskRes at once, with both variants."""
    out = tmp_path_factory.mktemp("all-art") / "art"
    export.export_artifact(export.from_run(all_run), out, variants=["fp16", "int8"])
    return load_artifact(out)


def onnx_embed(artifact, component: str, batch: np.ndarray, variant: str = "fp32") -> np.ndarray:
    session = ort.InferenceSession(str(artifact.onnx_path(component, variant)), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def check_against_unfolded(artifact, run_dir) -> None:
    """Independently of parity.json: the artifact reproduces a freshly rebuilt unfolded run."""
    parity = json.loads((artifact.root / "parity.json").read_text())
    for key in ("image", "text", "classifier"):
        assert parity[key]["max_abs_diff"] <= TOLERANCE, (key, parity[key])
    classifier, info = load_run(run_dir)
    pixels, _ = verify.verification_images(artifact.preprocess)  # uint8: the graph normalizes
    images = normalize(pixels, artifact.preprocess)
    tokens = artifact.tokenize(["a photo of a bee.", "x", "a long " * 40])
    with torch.no_grad():
        image_ref = F.normalize(classifier.model.encode_image(torch.from_numpy(images)), dim=-1).numpy()
        text_ref = F.normalize(classifier.model.encode_text(torch.from_numpy(tokens)), dim=-1).numpy()
        logits_ref = classifier(torch.from_numpy(images)).numpy()
    image = onnx_embed(artifact, "image", pixels)
    np.testing.assert_allclose(image, image_ref, atol=TOLERANCE)
    np.testing.assert_allclose(onnx_embed(artifact, "text", tokens), text_ref, atol=TOLERANCE)
    logits = artifact.logit_scale * image @ artifact.class_embeddings.T
    np.testing.assert_allclose(logits, logits_ref, atol=TOLERANCE * artifact.logit_scale * 2)
    assert artifact.manifest["method"] == info.method and artifact.classnames == info.classnames


@pytest.mark.parametrize("method", [m for m in METHODS if m != "all"])
def test_parity_every_method(method, method_artifacts):
    run_dir, artifact = method_artifacts(method)
    check_against_unfolded(artifact, run_dir)
    assert artifact.manifest["adapters"] == json.loads(json.dumps([c.to_dict() for c in METHODS[method] or []]))


def test_parity_all_methods_combined(all_artifact, all_run):
    check_against_unfolded(all_artifact, all_run)


def test_folded_graph_has_no_adapter_nodes(all_artifact, method_artifacts):
    """Same node count and op types as the unadapted base model's export."""
    _, base_artifact = method_artifacts("zeroshot")
    for component in ("image", "text"):
        graphs = [onnx.load(str(a.onnx_path(component))).graph for a in (all_artifact, base_artifact)]
        adapted, base = (collections.Counter(n.op_type for n in g.node) for g in graphs)
        assert adapted == base, component
        assert sum(adapted.values()) == all_artifact.manifest["graph_nodes"][component]
        assert len(graphs[0].initializer) == len(graphs[1].initializer)


def test_graphs_are_fused_for_onnxruntime(all_artifact):
    """Attention is one fused node per layer (in the image tower an Attention node, its q/k/v projections
    included; in orthserve-tiny's masked text tower onnxscript packs no q/k/v, so MultiHeadAttention), GELU
    one BiasGelu; int8 turns the image tower's Attention nodes into QAttention and quantizes every weight
    matrix multiply except the first attention (its Attention node and output projection) and the final
    projection, keeps the patch convolution in fp32 and computes GELU in its tanh form."""
    from export.towers import int8_sensitive_nodes

    layers = {"image": 2, "text": 2}  # orthserve-tiny
    for component, count in layers.items():
        graph = onnx.load(str(all_artifact.onnx_path(component))).graph
        ops = collections.Counter(n.op_type for n in graph.node)
        assert ops["Attention"] + ops["MultiHeadAttention"] == ops["BiasGelu"] == count, (component, ops)
        assert not {"Softmax", "Erf"} & set(ops), (component, ops)
        fusions = all_artifact.manifest["graph_fusions"][component]
        assert fusions["multi_head_attention"] == count and fusions["attention"] == ops["Attention"]
        # the quantizer skips Attention nodes that name their q/k/v widths
        assert not any(a.name == "qkv_hidden_sizes" for n in graph.node for a in n.attribute)
    fp32 = onnx.load(str(all_artifact.onnx_path("image"))).graph
    assert sum(n.op_type == "Attention" for n in fp32.node) == layers["image"]
    kept = int8_sensitive_nodes(fp32)
    attentions = [n for n in fp32.node if n.op_type == "Attention"]
    matmuls = [n.name for n in fp32.node if n.op_type == "MatMul"]
    out_projection = next(n.name for n in fp32.node if n.op_type == "MatMul" and attentions[0].output[0] in n.input)
    assert kept == [attentions[0].name, out_projection, matmuls[-1]]
    int8 = onnx.load(str(all_artifact.onnx_path("image", "int8"))).graph
    weights = {init.name for init in int8.initializer}
    fp32_left = [n.name for n in int8.node if n.op_type in ("MatMul", "Gemm", "Attention") and n.input[1] in weights]
    assert sorted(fp32_left) == sorted(kept)
    ops = collections.Counter(n.op_type for n in int8.node)
    assert ops["QAttention"] == layers["image"] - 1 and ops["Attention"] == 1, ops
    assert ops["Conv"] == 1 and "ConvInteger" not in ops and ops["MatMulInteger"] > 0
    assert ops["FastGelu"] == layers["image"] and "BiasGelu" not in ops, ops
    # each GELU's bias is an Add on the int8 multiply's output (onnxruntime folds it into that multiply)
    producers = {out: n for n in int8.node for out in n.output}
    for gelu in (n for n in int8.node if n.op_type == "FastGelu"):
        add = producers[gelu.input[0]]
        assert len(gelu.input) == 1 and add.op_type == "Add" and add.input[1] in weights, (gelu, add)
    # a text tower's attention carries its mask as an attention bias, which QAttention has no input for
    text_ops = collections.Counter(n.op_type for n in onnx.load(str(all_artifact.onnx_path("text", "int8"))).graph.node)
    assert "QAttention" not in text_ops, text_ops


def test_int8_weights_leave_room_for_avx2(all_artifact):
    """Every int8 weight is within 7 bits: onnxruntime's AVX2 kernel (no VNNI) adds two uint8 x int8 products in
    a saturating int16, and 255 x 64 x 2 = 32640 fits where 255 x 127 x 2 does not."""
    from onnx import numpy_helper

    for component in ("image", "text"):
        graph = onnx.load(str(all_artifact.onnx_path(component, "int8"))).graph
        quantized = [numpy_helper.to_array(i) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
        assert quantized and max(int(abs(q.astype(int)).max()) for q in quantized if q.size) <= 64, component


def test_int8_quantizes_attention_without_a_bias_and_keeps_a_masked_one(tmp_path):
    """QAttention has no attention-bias input, so an Attention node that takes a mask stays fp32 (the quantizer
    would drop the mask); one without becomes QAttention and still computes the same attention closely."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.towers import to_int8

    width, length = 16, 5
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.triu(np.full((1, 1, length, length), -1e4, np.float32), 1), "mask")]
    for name in ("plain", "masked"):  # weights of std 0.25: with std 1 the softmax is nearly one-hot, and int8
        # rounding (6% off at 7-bit weights) moves which token it picks rather than measuring the quantization
        inits += [numpy_helper.from_array(rng.normal(scale=0.25, size=(width, 3 * width)).astype(np.float32), f"w_{name}"),
                  numpy_helper.from_array(rng.normal(size=3 * width).astype(np.float32), f"b_{name}")]
    nodes = [helper.make_node("Attention", ["x", "w_plain", "b_plain"], ["plain"], name="plain",
                              domain="com.microsoft", num_heads=2),
             helper.make_node("Attention", ["x", "w_masked", "b_masked", "", "", "mask"], ["masked"], name="masked",
                              domain="com.microsoft", num_heads=2)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, length, width]) for n in ("plain", "masked")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, length, width])],
                              outputs, inits)
    source = tmp_path / "attention.onnx"
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                       helper.make_opsetid("com.microsoft", 1)]), source)
    target = to_int8(source, tmp_path / "attention.int8.onnx", keep_fp32=[])
    ops = {n.output[0]: n.op_type for n in onnx.load(str(target)).graph.node if "Attention" in n.op_type}
    assert ops == {"plain": "QAttention", "masked": "Attention"}
    x = {"x": rng.normal(size=(2, length, width)).astype(np.float32)}
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)
    (plain, masked), (plain8, masked8) = run(source), run(target)
    assert np.array_equal(masked8, masked)
    assert np.abs(plain8 - plain).max() < 0.05 * np.abs(plain).max()


def test_int8_keeps_the_projections_of_a_graph_fused_only_to_multi_head_attention(tmp_path):
    """A graph whose attention stayed MultiHeadAttention (q/k/v as three MatMuls): the three MatMuls that feed
    the first one stay fp32 in its place."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from export.towers import int8_sensitive_nodes

    width = 8
    weights = [numpy_helper.from_array(np.eye(width, dtype=np.float32), f"w{i}") for i in range(5)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"p{i}"], name=f"proj{i}") for i in range(3)]
    nodes += [helper.make_node("MultiHeadAttention", ["p0", "p1", "p2"], ["a"], name="mha", domain="com.microsoft",
                               num_heads=2),
              helper.make_node("MatMul", ["a", "w3"], ["o"], name="out"),
              helper.make_node("MatMul", ["o", "w4"], ["y"], name="last")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, width])], weights)
    assert int8_sensitive_nodes(graph) == ["proj0", "proj1", "proj2", "out", "last"]


def test_int8_tanh_gelu_matches_erf_gelu_closely(tmp_path):
    """The int8 graph's FastGelu against BiasGelu on the same inputs: the approximation is far below int8's error."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from export.towers import to_int8

    def graph(op):
        node = helper.make_node(op, ["x", "b"], ["y"], domain="com.microsoft")
        return helper.make_model(helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 768])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 768])],
            [helper.make_tensor("b", TensorProto.FLOAT, [768], np.linspace(-1, 1, 768).astype(np.float32))]),
            opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)], ir_version=10)

    erf, tanh = tmp_path / "erf.onnx", tmp_path / "tanh.onnx"
    onnx.save(graph("BiasGelu"), str(erf))
    to_int8(erf, tanh)  # nothing to quantize here; only the GELU rewrite, its bias moved into an Add
    assert [n.op_type for n in onnx.load(str(tanh)).graph.node] == ["Add", "FastGelu"]
    x = np.random.default_rng(0).normal(0, 3, (4, 768)).astype(np.float32)
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] for p in (erf, tanh)]
    assert np.abs(outs[0] - outs[1]).max() < 1e-3


@pytest.mark.parametrize("case", ["self", "cross", "float-mask", "bool-mask", "3d-mask", "with-weights", "padding"])
def test_sdpa_attention_is_multihead_attention(case):
    """The export-time attention (projections + SDPA) computes nn.MultiheadAttention's function."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    query = torch.randn(3, 5, 32)
    memory = torch.randn(3, 7, 32) if case == "cross" else query
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    mask = {"float-mask": torch.zeros(5, 5).masked_fill(causal, float("-inf")), "bool-mask": causal,
            "3d-mask": torch.randn(3 * 4, 5, 5)}.get(case)
    options = {"need_weights": case == "with-weights", "attn_mask": mask,  # these two take MHA's own forward
               "key_padding_mask": torch.tensor([[False] * 4 + [True]] * 3) if case == "padding" else None}
    with torch.no_grad():
        expected = mha(query, memory, memory, **options)
        with towers.sdpa_attention(mha):
            got = mha(query, memory, memory, **options)
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=1e-5)
    assert (got[1] is None) == (expected[1] is None)
    assert "forward" not in vars(mha)  # the class's own forward again


def test_variant_figures(all_artifact):
    parity = json.loads((all_artifact.root / "parity.json").read_text())
    images, _ = verify.verification_images(all_artifact.preprocess)
    fp32 = onnx_embed(all_artifact, "image", images)
    for variant, min_cosine in (("fp16", 0.999), ("int8", 0.98)):
        assert all_artifact.variants("image") == all_artifact.variants("text") == ["fp32", "fp16", "int8"]
        for component in ("image", "text"):
            figures = parity["variants"][variant][component]
            assert figures["cosine_min"] >= min_cosine, (variant, component, figures)
            assert 0.0 <= figures["top1_agreement"] <= 1.0
        assert parity["variants"][variant]["image"]["top1_agreement"] >= 0.9
        assert all_artifact.onnx_path("image", variant).stat().st_size < all_artifact.onnx_path("image").stat().st_size
    int8 = onnx_embed(all_artifact, "image", images, "int8")  # the service runs it with default options
    assert verify.cosine_stats(int8, fp32)["cosine_min"] >= 0.98


def test_the_tokenizer_ships_in_the_artifact(all_artifact):
    """tokenizer.json is listed and hashed like every file; the artifact tokenizes as open_clip does."""
    entry = all_artifact.manifest["tokenizer"]
    assert entry["file"] == "tokenizer.json" and "tokenizer.json" in all_artifact.manifest["files"]
    assert entry["kind"] == "clip-bpe" and entry["context_length"] == all_artifact.context_length
    texts = ["a photo of a bee.", "", "Crème brûlée &amp; 日本", "long " * 100]
    expected = open_clip.get_tokenizer(TINY)(texts, context_length=all_artifact.context_length).numpy()
    np.testing.assert_array_equal(all_artifact.tokenize(texts), expected)


def test_image_graphs_take_uint8_pixels_and_normalize_inside(all_artifact):
    """A quarter of the bytes of float32 pixels cross to the device; the fp16 graph normalizes in fp16."""
    assert all_artifact.manifest["inputs"]["image"]["dtype"] == "uint8"
    for variant in ("fp32", "fp16", "int8"):
        graph = onnx.load(str(all_artifact.onnx_path("image", variant))).graph
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8, variant
        assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT, variant
        (cast,) = [n for n in graph.node if graph.input[0].name in n.input and n.op_type == "Cast"]
        to = {a.name: a.i for a in cast.attribute}["to"]
        assert to == (onnx.TensorProto.FLOAT16 if variant == "fp16" else onnx.TensorProto.FLOAT), variant
    pixels, _ = verify.verification_images(all_artifact.preprocess)
    with pytest.raises(Exception, match="(?i)type|uint8"):  # float pixels are refused, not reinterpreted
        onnx_embed(all_artifact, "image", pixels.astype(np.float32))


@requires_data
def test_int8_fidelity_benchmark_on_an_artifact(all_artifact, tmp_path):
    """bench/int8_fidelity.py: int8 vs fp32 of an artifact on both real image sets, with verdicts."""
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "bench/int8_fidelity.py", str(all_artifact.root),
                           "--accuracy-images", "4", "--tiny-per-class", "1", "--threads", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "int8_fidelity.json").read_text())
    fidelity = report["results"][0]["int8_fidelity"]
    assert fidelity["hymenoptera-val"]["images"] == 4 and fidelity["tiny-imagenet val"]["images"] == 200
    assert set(fidelity["hymenoptera-val"]["label_sets"]) == {"ants/bees", "tiny-imagenet 202 names"}
    for row in fidelity.values():
        assert row["image_cosine_min"] >= 0.98
        for figures in row["label_sets"].values():
            assert 0.0 <= figures["top1_agreement_image_only"] <= 1.0
            flips = figures["fp32_margins_of_flips"]  # one fp32 top-1 margin per image the int8 tower flips
            assert len(flips) == round((1 - figures["top1_agreement_image_only"]) * row["images"])
            assert all(0.0 <= m <= 2.0 for m in flips) and figures["fp32_margin_median"] >= 0.0
    assert len(report["verdicts"]) == 5 and "int8 image tower top-1 agreement" in (out / "int8_fidelity.md").read_text()
    refused = subprocess.run([sys.executable, "bench/int8_fidelity.py", str(tmp_path)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "manifest" in refused.stderr


def test_open_clip_checkpoint_loads(all_artifact):
    """The folded weights run anywhere open_clip runs: no orthserve code involved."""
    model = open_clip.create_model(TINY, pretrained=str(all_artifact.root / "open_clip_model.safetensors")).eval()
    pixels, _ = verify.verification_images(all_artifact.preprocess)
    with torch.no_grad():
        images = torch.from_numpy(normalize(pixels, all_artifact.preprocess))
        embeddings = F.normalize(model.encode_image(images), dim=-1).numpy()
    np.testing.assert_allclose(embeddings, onnx_embed(all_artifact, "image", pixels), atol=TOLERANCE)


def test_dynamic_batch_and_opset(all_artifact):
    model = onnx.load(str(all_artifact.onnx_path("image")))
    assert model.opset_import[0].version >= 17 and all_artifact.manifest["opset"] >= 17
    assert model.graph.input[0].name == "pixels" and model.graph.output[0].name == "embeddings"
    for batch in (1, 5):
        pixels = np.random.default_rng(batch).integers(0, 256, (batch, 3, 64, 64), np.uint8)
        out = onnx_embed(all_artifact, "image", pixels)
        assert out.shape == (batch, all_artifact.manifest["embed_dim"])
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_orthserve_mini_exports(tmp_path):
    """The Hugging Face BERT text tower exports too (padding mask included: varied lengths are verified)."""
    export.export_artifact(export.from_model("orthserve-mini", "none", CLASSES), tmp_path / "art")
    artifact = load_artifact(tmp_path / "art")
    parity = json.loads((artifact.root / "parity.json").read_text())
    assert parity["image"]["max_abs_diff"] <= TOLERANCE and parity["text"]["max_abs_diff"] <= TOLERANCE
    assert artifact.manifest["embed_dim"] == 384 and artifact.tokenize(["a bee"]).shape == (1, 32)


@requires_data
def test_int8_sensitivity_benchmark_on_an_artifact(all_artifact, tmp_path):
    """bench/int8_sensitivity.py: every weight matrix multiply of the image tower (an Attention node's packed
    query/key/value counts as one) named by its role and scored alone in fp32, and the export's choice scored on two photo sets at three batch sizes."""
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "bench/int8_sensitivity.py", str(all_artifact.root), "--val-per-class", "1",
                           "--heldout-per-class", "1", "--threads", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "int8_sensitivity.json").read_text())
    single = report["single_layer_fp32_batch32_val"]
    layers = 2  # orthserve-tiny
    roles = [f"block {i} {r}" for i in range(layers) for r in ("query/key/value", "attention out", "MLP in", "MLP out")]
    assert sorted(single) == sorted(["none", *roles, "projection"]) and all(0 <= v <= 1 for v in single.values())
    assert report["export_choice"] == ["block 0 query/key/value", "block 0 attention out", "projection"]
    assert report["photos"] == {"tiny-imagenet val": 200, "tiny-imagenet train, held out": 202}
    for rows in report["groups"].values():
        assert set(rows) == set(report["photos"]) and all(set(row) == {"1", "8", "32"} for row in rows.values())
    assert "Groups kept in fp32" in (out / "int8_sensitivity.md").read_text() and (out / "int8_sensitivity.png").stat().st_size > 0


def test_variant_figures_are_explained_in_words():
    from export.verify import describe_variants

    figures = {"int8": {"image": {"cosine_mean": 0.99998, "cosine_min": 0.9999, "top1_agreement": 1.0, "images": 21, "classes": 202},
                        "text": {"cosine_mean": 0.9947, "cosine_min": 0.9906, "top1_agreement": 15 / 21, "images": 21,
                                 "classes": 202}}}
    image, text, served = describe_variants(figures)
    assert "21 of 21" in image and "202 class names" in image and "acceptable" in image
    assert "15 of 21" in text and "keep it in fp32" in text
    assert "ORTHSERVE_INT8=1" in served
