"""Adapter properties: identity at init, orthogonality, folding, bypass, checkpoints."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import orthserve
from orthserve import AOFTConfig, CLIPClassifier, LoRAConfig, OrthogonalConfig, TaskResConfig
from orthserve.adapters import AOFT, LoRA, BlockRotation, WeightAdapter
from orthserve.classifier import is_text_side

IMAGES = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
CLASSES = ["cat", "dog", "tulip"]
WEIGHT_CONFIGS = {
    "orthogonal": OrthogonalConfig(),
    "orthogonal-neumann": OrthogonalConfig(cayley="neumann", block_size=16),
    "coft": OrthogonalConfig(max_norm=0.05),
    "lora": LoRAConfig(),
    "aoft": AOFTConfig(),
}
COMBINATIONS = {
    **{name: [cfg] for name, cfg in WEIGHT_CONFIGS.items()},
    "taskres": [TaskResConfig()],
    "orthogonal+taskres": [OrthogonalConfig(), TaskResConfig()],
    "orthogonal+lora": [OrthogonalConfig(), LoRAConfig()],
    "orthogonal-attention": [OrthogonalConfig(targets=(r"\.attn$", r"attn\.out_proj$"))],
}


def embeddings(classifier: CLIPClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return classifier.image_features(IMAGES), classifier.class_embeddings()


def perturb(target: nn.Module, scale: float = 0.05) -> None:
    """Move every adapter away from its identity initialization."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in orthserve.adapter_parameters(target).values():
            p.add_(scale * torch.randn_like(p))


def adapted_classifier(tiny, configs) -> CLIPClassifier:
    model, _, tokenizer = tiny
    classifier = CLIPClassifier(model, tokenizer, CLASSES, ["a photo of a {}.", "a drawing of a {}."])
    for config in configs:
        orthserve.inject(classifier, config)
    return classifier


@pytest.mark.parametrize("name", COMBINATIONS)
def test_identity_at_initialization(tiny, name):
    model, _, tokenizer = tiny
    before = embeddings(CLIPClassifier(model, tokenizer, CLASSES, ["a photo of a {}.", "a drawing of a {}."]))
    after = embeddings(adapted_classifier(tiny, COMBINATIONS[name]))
    assert torch.equal(before[0], after[0]) and torch.allclose(before[1], after[1], atol=1e-7)


@pytest.mark.parametrize("name", COMBINATIONS)
def test_fold_matches_adapted_and_restores_base_keys(tiny, name):
    base_keys = set(tiny[0].state_dict().keys())
    classifier = adapted_classifier(tiny, COMBINATIONS[name])
    perturb(classifier)
    adapted = embeddings(classifier)
    orthserve.fold(classifier)
    assert set(classifier.model.state_dict().keys()) == base_keys
    assert not any(parametrize.is_parametrized(m) for m in classifier.model.modules())
    folded = embeddings(classifier)
    assert (adapted[0] - folded[0]).abs().max() <= 1e-5
    assert (adapted[1] - folded[1]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", COMBINATIONS)
def test_gradients_reach_only_adapters(tiny, name):
    classifier = adapted_classifier(tiny, COMBINATIONS[name])
    perturb(classifier)
    classifier(IMAGES).logsumexp(-1).sum().backward()
    adapter_ids = {id(p) for p in orthserve.adapter_parameters(classifier).values()}
    for pname, p in classifier.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, pname
        else:
            assert not p.requires_grad and p.grad is None, pname
    assert orthserve.count_trainable(classifier) == sum(p.numel() for p in orthserve.adapter_parameters(classifier).values())


@pytest.mark.parametrize("name", ["orthogonal", "lora", "aoft", "orthogonal+taskres"])
def test_bypass_gives_the_frozen_model(tiny, name):
    model, _, tokenizer = tiny
    frozen = embeddings(CLIPClassifier(model, tokenizer, CLASSES, ["a photo of a {}.", "a drawing of a {}."]))
    classifier = adapted_classifier(tiny, COMBINATIONS[name])
    perturb(classifier)
    adapted = embeddings(classifier)
    with orthserve.bypass(classifier):
        bypassed = embeddings(classifier)
    assert torch.equal(frozen[0], bypassed[0]) and torch.allclose(frozen[1], bypassed[1], atol=1e-7)
    assert not torch.allclose(adapted[0], bypassed[0])
    assert torch.equal(embeddings(classifier)[0], adapted[0])  # switched back on


@pytest.mark.parametrize("name", ["orthogonal", "coft", "lora", "aoft", "orthogonal+taskres", "orthogonal+lora"])
def test_adapter_checkpoint_roundtrip(tiny, tmp_path, name):
    classifier = adapted_classifier(tiny, COMBINATIONS[name])
    perturb(classifier)
    path = orthserve.save_adapters(tmp_path / "adapter.safetensors", classifier, COMBINATIONS[name])
    assert path.with_suffix(".json").is_file()
    torch.manual_seed(0)
    model, _, tokenizer = orthserve.load_model("orthserve-tiny", "none")
    fresh = CLIPClassifier(model, tokenizer, CLASSES, ["a photo of a {}.", "a drawing of a {}."])
    configs = orthserve.load_adapters(path, fresh)
    assert [c.to_dict() for c in configs] == [c.to_dict() for c in COMBINATIONS[name]]
    for a, b in zip(embeddings(classifier), embeddings(fresh)):
        assert torch.equal(a, b)


def test_adapter_checkpoint_for_another_model_is_refused(tiny, tmp_path):
    classifier = adapted_classifier(tiny, [OrthogonalConfig()])
    path = orthserve.save_adapters(tmp_path / "a.safetensors", classifier, [OrthogonalConfig()])
    model, _, tokenizer = orthserve.load_model("orthserve-tiny", "none")
    with pytest.raises(ValueError, match="does not fit"):
        orthserve.load_adapters(path, model)  # keys were saved on a classifier ("model." prefix)


@pytest.mark.parametrize("mode,blocks", [("exact", 4), ("neumann", 4), ("exact", 1)])
def test_rotation_is_orthogonal(mode, blocks):
    rotation = BlockRotation(64, blocks, mode, neumann_terms=12)
    with torch.no_grad():
        rotation.generator.normal_(0, 0.02)
    r = rotation.rotation()
    assert r.shape == (64, 64)
    assert (r.T @ r - torch.eye(64)).abs().max() <= 1e-5
    assert (r - torch.eye(64)).abs().max() > 1e-3  # a real rotation, not the identity


def test_rotation_keeps_row_norms_and_angles():
    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    rotation = BlockRotation(64, 4)
    with torch.no_grad():
        rotation.generator.normal_(0, 0.1)
    rotated = rotation(weight)
    assert torch.allclose(rotated.norm(dim=1), weight.norm(dim=1), atol=1e-5)
    gram = lambda w: nn.functional.normalize(w, dim=1) @ nn.functional.normalize(w, dim=1).T  # noqa: E731
    assert (gram(rotated) - gram(weight)).abs().max() <= 1e-5
    assert torch.allclose(rotated, weight @ rotation.rotation(), atol=1e-5)


def test_coft_bounds_the_generator():
    rotation = BlockRotation(32, 2, max_norm=0.01)
    with torch.no_grad():
        rotation.generator.normal_(0, 1.0)
    r = rotation.rotation_blocks()
    eye = torch.eye(16).expand_as(r)
    # |R - I| <= 2|Q| / (1 - |Q|) for the Cayley transform; |Q| <= 0.01
    assert torch.linalg.matrix_norm(r - eye, ord=2).max() <= 0.0203
    assert (r.transpose(-1, -2) @ r - eye).abs().max() <= 1e-5


def test_orthogonal_on_packed_attention_and_out_proj(tiny):
    model, _, _ = tiny
    names = orthserve.inject(model, OrthogonalConfig(targets=(r"\.attn$", r"attn\.out_proj$")))
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in names
    assert "transformer.resblocks.1.attn.out_proj.weight" in names
    attn = model.visual.transformer.resblocks[0].attn
    assert attn.in_proj_weight.shape == (192, 64)  # packed q, k, v: R acts on the shared input dim
    assert attn.parametrizations.in_proj_weight[0].generator.shape == (4, 16, 16)


def test_lora_on_packed_qkv_has_a_pair_per_slice(tiny):
    model, _, _ = tiny
    orthserve.inject(model, LoRAConfig(rank=2))
    lora = model.visual.transformer.resblocks[0].attn.parametrizations.in_proj_weight[0]
    assert isinstance(lora, LoRA) and lora.down.shape == (3, 2, 64) and lora.up.shape == (3, 64, 2)
    assert lora.scale == pytest.approx(1 / 2 ** 0.5)  # alpha / sqrt(r)
    # 2 attention blocks per tower, 2 towers, 3 slices x r x (in + out)
    assert orthserve.count_trainable(model) == 4 * 3 * 2 * (64 + 64)


def test_aoft_projections_are_orthogonal_unlike_lora():
    torch.manual_seed(0)
    aoft, lora = AOFT(192, 64, rank=8, scale=1.0, slices=3), LoRA(192, 64, rank=8, scale=1.0, slices=3)
    with torch.no_grad():
        lora.up.normal_()  # a trained LoRA's up projection is not zero

    def max_abs_cos(vectors: torch.Tensor) -> float:  # [slices, r, n] -> largest off-diagonal |cos|
        unit = nn.functional.normalize(vectors, dim=-1)
        cos = unit @ unit.transpose(-1, -2) - torch.eye(vectors.shape[1])
        return float(cos.abs().max())

    down, up = aoft.projections()
    aoft_cos = max(max_abs_cos(down), max_abs_cos(up.transpose(-1, -2)))
    lora_cos = max(max_abs_cos(lora.down), max_abs_cos(lora.up.transpose(-1, -2)))
    assert aoft_cos < 1e-5 and lora_cos > 0.1
    assert sum(p.numel() for p in aoft.parameters()) == 3 * (64 + 64 + 8)  # in + out + r per slice


def test_hugging_face_text_tower_linears_are_adapted():
    model, _, tokenizer = orthserve.load_model("orthserve-mini", "none")
    tokens = tokenizer(["a photo of a dog"])
    with torch.no_grad():
        before = model.encode_text(tokens)
    names = orthserve.inject(model, OrthogonalConfig())
    orthserve.inject(model, LoRAConfig())
    text_names = [n for n in names if is_text_side(n)]
    assert "text.transformer.encoder.layer.0.intermediate.dense.weight" in text_names
    assert "text.transformer.encoder.layer.5.output.dense.weight" in text_names
    assert not any("attention.output.dense" in n for n in names)
    assert isinstance(model.text.transformer.encoder.layer[0].attention.self.query.parametrizations.weight[0], LoRA)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), before, atol=1e-6)
    perturb(model)
    with torch.no_grad():
        adapted = model.encode_text(tokens)
        orthserve.fold(model)
        assert (model.encode_text(tokens) - adapted).abs().max() <= 1e-5


def test_autocast_bf16(tiny):
    classifier = adapted_classifier(tiny, [OrthogonalConfig(), LoRAConfig(), TaskResConfig()])
    perturb(classifier)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = classifier(IMAGES)
    assert torch.isfinite(logits).all()
    reference = classifier(IMAGES)
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max()
    logits.float().sum().backward()
    assert all(p.grad is not None for p in orthserve.adapter_parameters(classifier).values())


def test_unmatched_targets_and_bad_blocks_are_clear(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="no nn.Linear"):
        orthserve.inject(model, OrthogonalConfig(targets=("nothing_here",)))
    with pytest.raises(ValueError, match="not divisible into 5 blocks"):
        orthserve.inject(model, OrthogonalConfig(blocks=5))
    with pytest.raises(ValueError, match="exactly one of"):
        OrthogonalConfig(blocks=4, block_size=16)
    with pytest.raises(TypeError, match="CLIPClassifier"):
        orthserve.inject(model, TaskResConfig())


def test_vit_b16_default_orthogonal_count_matches_the_paper():
    """43,450,368: both FFN linears of all 24 blocks, 4 full b x b blocks each (OrthSR paper)."""
    from orthserve.params import count_by_tower

    model, _, _ = orthserve.load_model("ViT-B-16", "none")
    orthserve.inject(model, OrthogonalConfig())
    assert count_by_tower(model) == {"image": 30_081_024, "text": 13_369_344, "total": 43_450_368}
    assert all(isinstance(m, WeightAdapter) for m in orthserve.surgery.adapters(model))


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_rotating_inputs_gives_the_same_outputs_and_gradients(tiny, max_norm):
    """``rotate_inputs`` (the training shortcut) computes ``linear(x R^T, W)``: same as ``linear(x, W R)``."""
    model, _, tokenizer = tiny
    classifier = CLIPClassifier(model, tokenizer, ["a cat", "a dog", "a bird"])
    orthserve.inject(classifier, OrthogonalConfig(max_norm=max_norm))
    adapters = [m for m in classifier.modules() if isinstance(m, BlockRotation)]
    torch.manual_seed(1)
    with torch.no_grad():
        for adapter in adapters:
            adapter.generator.normal_(0, 0.05)
    images = torch.randn(2, 3, 64, 64)

    def logits_and_grads():
        classifier.zero_grad()
        logits = classifier(images)
        logits.square().sum().backward()
        return logits.detach(), [a.generator.grad.clone() for a in adapters]

    reference, reference_grads = logits_and_grads()
    with orthserve.rotate_inputs(classifier) as switched:
        # orthserve-tiny: c_fc (64 -> 256, blocks of 16) switches; c_proj (256 -> 64, blocks of 64) does not
        assert switched == 4 and sum(a.applied_to_input for a in adapters) == 4
        logits, grads = logits_and_grads()
        with orthserve.bypass(classifier):
            frozen_inside = classifier(images).detach()
    assert torch.allclose(logits, reference, atol=1e-5)
    for got, want in zip(grads, reference_grads):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # fp32 sums in another order
    with orthserve.bypass(classifier):
        assert torch.allclose(frozen_inside, classifier(images), atol=1e-6)
    assert not any(a.applied_to_input for a in adapters)
    assert all(not m._forward_pre_hooks for m in classifier.modules() if isinstance(m, nn.Linear))


def test_folded_classifier_does_not_reuse_class_embeddings_cached_before_adaptation(tiny):
    """Issue 26: a frozen base, TaskRes (caches the class embeddings), then an orthogonal adapter on the text
    tower, then fold: the folded classifier must give the adapted logits, not the pre-adaptation ones."""
    model, _, tokenizer = tiny
    model.requires_grad_(False)  # as users hold a pretrained model
    clf = orthserve.CLIPClassifier(model, tokenizer, ["cat", "dog", "bird"], ["a photo of a {}."]).eval()
    orthserve.inject(clf, orthserve.TaskResConfig(alpha=0.5))
    orthserve.inject(clf, orthserve.OrthogonalConfig())
    torch.manual_seed(1)
    with torch.no_grad():
        for p in orthserve.adapter_parameters(clf).values():
            p.add_(0.3 * torch.randn_like(p))
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        adapted = clf(images)
        orthserve.fold(clf)
        folded = clf(images)
    assert torch.allclose(folded, adapted, atol=1e-4), (folded - adapted).abs().max()


def test_peft_style_names_are_the_same_operations(tiny):
    model, _, tokenizer = tiny
    assert orthserve.disable_adapter is orthserve.bypass
    orthserve.inject(model, orthserve.LoRAConfig())
    assert orthserve.merge_and_unload(model) is model and not list(orthserve.surgery.adapters(model))
