"""Model loading: names, config files, weights or a clear error — never silent random weights."""
from __future__ import annotations

import json

import pytest
import torch

import orthserve
from orthserve.models import WeightsUnavailableError


def test_tiny_loads_with_transform_and_tokenizer(tiny):
    model, preprocess, tokenizer = tiny
    tokens = tokenizer(["a photo of a cat"])
    assert tokens.shape == (1, 32)
    assert model.encode_text(tokens).shape == (1, 64)
    assert model.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 64)
    assert not model.training


def test_json_config_path(tmp_path):
    config = json.loads(open(orthserve.models.CONFIG_DIR / "orthserve-tiny.json").read())
    path = tmp_path / "my-clip.json"
    path.write_text(json.dumps(config))
    model, _, _ = orthserve.load_model(str(path), "none")
    assert model.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 64)


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'no-such-clip'"):
        orthserve.load_model("no-such-clip")


def test_missing_checkpoint_file_names_model_and_file(tmp_path):
    missing = tmp_path / "weights.safetensors"
    with pytest.raises(WeightsUnavailableError, match="orthserve-tiny") as err:
        orthserve.load_model("orthserve-tiny", str(missing))
    assert str(missing) in str(err.value)


def test_unavailable_tag_says_how_to_pass_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as err:
        orthserve.load_model("RN50", "openai")  # no network here, nothing cached
    message = str(err.value)
    assert "RN50" in message and "'openai'" in message and "--pretrained /path/to/" in message


def test_unknown_tag_lists_known_tags():
    with pytest.raises(WeightsUnavailableError, match="Known tags"):
        orthserve.load_model("orthserve-tiny", "laion2b_nonexistent")


def test_local_checkpoint_roundtrip(tiny, tmp_path):
    from safetensors.torch import save_file

    model, _, _ = tiny
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, _, _ = orthserve.load_model("orthserve-tiny", str(path))
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))


def test_mini_uses_pretrained_minilm_text_tower():
    model, _, tokenizer = orthserve.load_model("orthserve-mini", "none")
    text = torch.nn.functional.normalize(model.encode_text(tokenizer(["a dog", "a puppy", "a spreadsheet"])), dim=-1)
    similar, unrelated = float(text[0] @ text[1]), float(text[0] @ text[2])
    assert similar > unrelated + 0.2  # real sentence embeddings, not random ones


def test_mini_default_weights_missing_is_clear(monkeypatch, tmp_path):
    from orthserve import mini

    monkeypatch.setattr(mini, "WEIGHTS", tmp_path / "absent.safetensors")
    with pytest.raises(WeightsUnavailableError, match="training.pretrain"):
        orthserve.load_model("orthserve-mini", "default")


def test_mini_image_tower_is_a_conv_stem_feeding_vit_blocks():
    from orthserve import mini

    model, _, _ = orthserve.load_model("orthserve-mini", "none")
    assert isinstance(model.visual.conv1, mini.ConvStem)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # shipped form: folded
    tokens = model.visual.conv1(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, mini.IMAGE_TOWER["width"], 8, 8)
    assert model.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, mini.EMBED_DIM)


def test_mini_shipped_weights_fold_batch_norm_and_reload_exactly(tmp_path):
    """Pretraining uses batch norm; the shipped file has it folded into the convs (fp16 storage)."""
    from safetensors.torch import save_file

    from orthserve import mini

    torch.manual_seed(0)
    trained, _, _ = orthserve.load_model("orthserve-mini", "none")
    mini.install_stem(trained, batch_norm=True)
    trained.train()
    with torch.no_grad():  # give the norms non-trivial statistics and affine parameters
        for _ in range(3):
            trained.encode_image(torch.randn(16, 3, 64, 64) * 2 + 0.5)
        for m in trained.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    trained.eval()
    path = tmp_path / "mini.safetensors"
    save_file(mini.shipped_state(trained), str(path))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trained.modules())  # the trained model is untouched
    shipped, _, _ = orthserve.load_model("orthserve-mini", "none")
    mini.load_default_weights(shipped, path)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected, got = trained.encode_image(images), shipped.encode_image(images)
    assert torch.nn.functional.cosine_similarity(expected, got).min() > 0.9999  # fp16 storage


def test_mini_unfolded_stem_computes_what_the_folded_one_does():
    """A warm restart puts the batch norms back (training.pretrain --init-weights): same function in eval mode,
    and in train mode on the batch its statistics came from."""
    from orthserve import mini

    torch.manual_seed(0)
    folded = mini.ConvStem(mini.IMAGE_TOWER["width"]).eval()
    with torch.no_grad():
        for stage in folded.stages:
            stage.conv.bias.uniform_(-0.3, 0.3)
    sample = torch.randn(32, 3, 64, 64)
    unfolded = folded.unfolded(sample)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in unfolded.modules()) == len(mini.STEM_CHANNELS)
    with torch.no_grad():
        expected = folded(sample)
        images = torch.randn(4, 3, 64, 64)
        assert torch.allclose(unfolded.eval()(images), folded(images), atol=1e-4)
        assert torch.allclose(unfolded.train()(sample), expected, atol=1e-3)
        assert torch.allclose(unfolded.eval().folded()(images), folded(images), atol=1e-4)  # and back
    with pytest.raises(ValueError, match="already"):
        unfolded.unfolded(sample)


def test_mini_full_checkpoint_loads_through_open_clip_loader(tmp_path):
    """The export's plain checkpoint of an orthserve-mini model (all tensors) loads by path."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model, _, _ = orthserve.load_model("orthserve-mini", "none")
    path = tmp_path / "mini-full.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, _, _ = orthserve.load_model("orthserve-mini", str(path))
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))


def test_mini_old_weights_file_is_refused_with_a_retrain_hint(tmp_path):
    from safetensors.torch import save_file

    from orthserve import mini

    path = tmp_path / "old.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(192, 3, 8, 8), "logit_scale": torch.zeros(())}, str(path))
    model, _, _ = orthserve.load_model("orthserve-mini", "none")
    with pytest.raises(ValueError, match="training.pretrain"):
        mini.load_default_weights(model, path)
