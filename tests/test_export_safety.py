"""Artifact safety: manifest round trip, tampering refused, all-or-nothing writes, CLI errors, BentoML."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import export
import export.pipeline as pipeline
from export.__main__ import main
from export_helpers import CLASSES, TEMPLATES, TINY
from orthserve.artifact import SCHEMA_VERSION, ArtifactError, load_artifact
from orthserve.preprocess import PreprocessSpec

REPO = Path(__file__).resolve().parents[1]


def tiny_source(classes=CLASSES):
    return export.from_model(TINY, "none", classes, TEMPLATES)


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "art"
    export.export_artifact(tiny_source(), out)
    return out


def leftovers(out: Path) -> list[str]:
    """Anything an export left beside or at ``out`` other than a finished artifact."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_manifest_round_trip(artifact_dir):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    artifact = load_artifact(artifact_dir)
    assert artifact.manifest == manifest and artifact.root == artifact_dir
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["opset"] >= 17
    for key in ("model", "pretrained", "method", "adapters", "classnames", "templates", "preprocess", "tokenizer",
                "embed_dim", "logit_scale", "opset", "files", "variants", "versions", "created"):
        assert key in manifest, key
    assert artifact.classnames == CLASSES and artifact.templates == TEMPLATES
    assert artifact.preprocess == PreprocessSpec.from_dict(manifest["preprocess"])
    assert artifact.preprocess.image_size == 64 and manifest["tokenizer"] == {
        "model": TINY, "file": "tokenizer.json", "kind": "clip-bpe", "clean": "lower", "context_length": 32, "pad_id": 0}
    assert artifact.class_embeddings.shape == (3, manifest["embed_dim"]) and artifact.class_embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(artifact.class_embeddings, axis=1), 1.0, atol=1e-5)
    assert artifact.logit_scale == pytest.approx(manifest["logit_scale"])
    assert artifact.variants("image") == ["fp32"] and artifact.onnx_path("text") == artifact_dir / "text.onnx"
    assert set(manifest["files"]) == {p.name for p in artifact_dir.iterdir()} - {"manifest.json"}
    tokens = artifact.tokenize(["a photo of a bee.", "x"])
    assert tokens.dtype == np.int64 and tokens.shape == (2, 32)
    with pytest.raises(ArtifactError, match="no 'int8' variant"):
        artifact.onnx_path("image", "int8")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "image.onnx").write_bytes((d / "image.onnx").read_bytes()[:-1] + b"\0"), "sha256"),
    (lambda d: (d / "classifier.safetensors").unlink(), "missing"),
    (lambda d: (d / "manifest.json").write_text(
        json.dumps({**json.loads((d / "manifest.json").read_text()), "schema_version": 99})), "schema_version 99"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "manifest.json").unlink(), "not an artifact"),
])
def test_damaged_artifact_refused(artifact_dir, tmp_path, damage, message):
    copy = tmp_path / "copy"
    shutil.copytree(artifact_dir, copy)
    load_artifact(copy)
    damage(copy)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(copy)


def test_interrupted_export_leaves_nothing(artifact_dir, tmp_path, monkeypatch):
    """Ctrl-C while a graph is being written: no half artifact, no temporary directory."""
    def interrupted(model, component, example, path, spec, opset):
        path.write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export_tower", interrupted)
    out = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        export.export_artifact(tiny_source(), out)
    assert not out.exists() and leftovers(out) == []
    # over an earlier artifact: the earlier one stays, intact
    previous = tmp_path / "previous"
    shutil.copytree(artifact_dir, previous)
    with pytest.raises(KeyboardInterrupt):
        export.export_artifact(tiny_source(["cat"]), previous)
    assert load_artifact(previous).classnames == CLASSES and leftovers(previous) == []


def test_failed_verification_exits_nonzero_and_writes_nothing(tmp_path, monkeypatch, capsys):
    reference = pipeline._reference

    def off_by_a_little(*args):
        ref = reference(*args)
        return {**ref, "image": ref["image"] + 1e-3}

    monkeypatch.setattr(pipeline, "_reference", off_by_a_little)
    out = tmp_path / "art"
    assert main(["--model", TINY, "--pretrained", "none", "--labels", "ant,bee", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "image max_abs_diff" in err and "Traceback" not in err
    assert not out.exists() and leftovers(out) == []


def test_rerun_replaces_cleanly(artifact_dir, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(artifact_dir, out)  # an earlier export, with classes and no variants
    stale = tmp_path / ".art.tmp-999999999-deadbeef"  # what a SIGKILLed export leaves behind
    stale.mkdir()
    export.export_artifact(export.from_model(TINY, "none"), out, variants=["int8"])  # no classes this time
    artifact = load_artifact(out)
    assert artifact.classnames == [] and artifact.class_embeddings is None
    assert artifact.variants("image") == artifact.variants("text") == ["fp32", "int8"]
    assert sorted(p.name for p in out.iterdir()) == [
        "image.int8.onnx", "image.onnx", "manifest.json", "open_clip_model.safetensors", "parity.json",
        "text.int8.onnx", "text.onnx", "tokenizer.json"]
    assert leftovers(out) == []


def test_refuses_to_replace_a_directory_that_is_not_an_artifact(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(export.ExportError, match="not an artifact"):
        export.export_artifact(tiny_source(), out)
    assert (out / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("argv, message", [
    (["--run", "/nonexistent/run"], "run directory /nonexistent/run does not exist"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", TINY, "--pretrained", "none", "--variant", "fp8"], "unknown variant 'fp8'"),
    (["--model", TINY, "--pretrained", "none", "--opset", "13"], "opset 13 is too old"),
    (["--model", TINY, "--pretrained", "none", "--classnames", "/nonexistent/classes.txt"], "class-names file"),
    (["--model", TINY, "--pretrained", "/nonexistent/weights.safetensors"], "does not exist"),
    (["--model", TINY, "--pretrained", "none", "--bento-model", "Bad Name!"], "invalid --bento-model name"),
])
def test_cli_user_errors(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "art")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "art").exists()


def test_cli_run_dir_without_run_json(tmp_path, capsys):
    assert main(["--run", str(tmp_path), "--out", str(tmp_path / "art")]) == 1
    assert "is not a training run" in capsys.readouterr().err


def test_cli_with_bento_model_store(tmp_path):
    """End to end through ``python -m export``, storing into a private BentoML home."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "HF_HUB_OFFLINE": "1"}
    out, classes = tmp_path / "art", tmp_path / "classes.txt"
    classes.write_text("# insects\nant\n\nbee\n")
    result = subprocess.run([sys.executable, "-m", "export", "--model", TINY, "--pretrained", "none", "--classnames", str(classes),
                             "--template", "a photo of a {}.", "--template", "itap of a {}.", "--int8",
                             "--bento-model", "orthserve-test", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["bento_tag"].startswith("orthserve-test:") and summary["classes"] == 2
    artifact = load_artifact(out)
    assert artifact.variants("text") == ["fp32", "int8"]

    import bentoml
    from bentoml._internal.models.model import ModelStore

    stored = ModelStore(tmp_path / "bentoml" / "models").get(summary["bento_tag"])
    assert stored.info.metadata["files"] == artifact.manifest["files"]
    assert stored.info.labels["model"] == TINY and stored.info.labels["method"] == "zeroshot"
    assert load_artifact(stored.path).classnames == ["ant", "bee"]
    assert artifact.templates == ["a photo of a {}.", "itap of a {}."]
    assert isinstance(bentoml.Tag.from_taglike(summary["bento_tag"]), bentoml.Tag)


def test_make_artifact_re_exports_only_what_is_stale(artifact_dir, tmp_path):
    """export.builtin: missing or unloadable -> export; the built-in model older than its weights -> export;
    an up-to-date one, or another model's artifact, is left alone."""
    import json
    import os

    from export.builtin import needs_export

    assert needs_export(tmp_path / "nothing-here")
    copy = tmp_path / "art"
    shutil.copytree(artifact_dir, copy)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"x")
    os.utime(copy / "manifest.json", (1, 1))  # the artifact is older than the weights
    assert not needs_export(copy, weights)  # orthserve-tiny: not the built-in model, never replaced for age
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(model="orthserve-mini", pretrained="default")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    os.utime(copy / "manifest.json", (1, 1))
    assert needs_export(copy, weights)
    os.utime(weights, (0, 0))
    assert not needs_export(copy, weights)
    (copy / "manifest.json").write_text("{}")
    assert needs_export(copy, weights)  # does not load
