"""A user's common mistakes end in one line that says what is wrong and what to do, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # each case starts a Python process

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ENV.pop("ORTHSERVE_DEBUG", None)


def fails_in_one_line(*argv: str, env: dict | None = None) -> str:
    proc = subprocess.run(list(argv), cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0, proc.stdout[-500:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("WARNING ")]
    assert len(lines) == 1, lines  # the error itself (warnings before it are fine)
    return lines[0]


@pytest.fixture
def images(tmp_path) -> Path:
    from PIL import Image

    for name in ("ant", "bee"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "data" / name / "a.png")
    return tmp_path / "data"


@pytest.fixture
def artifact_like(tmp_path) -> Path:
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    return folder


@pytest.fixture
def run_like(tmp_path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_text("{}")
    return folder


def test_unknown_pretrained_tag(images, tmp_path):
    line = fails_in_one_line(sys.executable, "-m", "training.finetune", "--model", "ViT-B-32", "--pretrained", "laion9",
                             "--data", str(images), "--out", str(tmp_path / "r"))
    assert line.startswith("training.finetune: error:") and "'laion9' is neither a tag of ViT-B-32 (openai" in line


def test_default_weights_belong_to_orthserve_mini(images, tmp_path):
    line = fails_in_one_line(sys.executable, "-m", "export", "--model", "ViT-B-32", "--pretrained", "default",
                             "--out", str(tmp_path / "art"))
    assert "--pretrained default means orthserve-mini's embedded weights" in line and "openai" in line


def test_no_silent_random_weights(images, tmp_path):
    line = fails_in_one_line(sys.executable, "-m", "training.finetune", "--model", "ViT-B-32",
                             "--data", str(images), "--out", str(tmp_path / "r"))
    assert "--pretrained is required for ViT-B-32" in line and "'none' for random weights" in line
    line = fails_in_one_line(sys.executable, "-m", "training.evaluate", "--model", "ViT-B-32", "--data", str(images))
    assert "--pretrained is required for ViT-B-32" in line


def test_artifact_given_as_a_run(artifact_like, images, tmp_path):
    line = fails_in_one_line(sys.executable, "-m", "export", "--run", str(artifact_like), "--out", str(tmp_path / "x"))
    assert "is an exported artifact, not a training run" in line and "bentoml serve" in line
    line = fails_in_one_line(sys.executable, "-m", "training.evaluate", "--run", str(artifact_like), "--data", str(images))
    assert "is an exported artifact, not a training run" in line


def test_run_given_as_an_artifact_to_the_service(run_like):
    line = fails_in_one_line(str(Path(sys.executable).with_name("bentoml")), "serve", "service.service:Classifier",
                             "--port", "39871", env={**ENV, "ORTHSERVE_MODEL": str(run_like)})
    assert line.startswith("orthserve: cannot serve:") and "is a training run, not an artifact" in line
    assert f"python -m export --run {run_like} --out ART_DIR" in line


@pytest.mark.parametrize("damage, message", [
    ("missing", "does not exist"),
    ("empty", "is not an artifact: no manifest.json"),
    ("bad-json", "is not valid JSON"),
])
def test_missing_or_damaged_artifact_at_service_start(tmp_path, damage, message):
    from service.runtime import open_artifact

    folder = tmp_path / "art"
    if damage != "missing":
        folder.mkdir()
    if damage == "bad-json":
        (folder / "manifest.json").write_text("{ half")
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        open_artifact(str(folder))


def test_data_folder_without_images(tmp_path):
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    line = fails_in_one_line(sys.executable, "-m", "training.finetune", "--model", "orthserve-tiny", "--pretrained", "none",
                             "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"))
    assert "class folders without images" in line and "cats" in line


def test_debug_flag_shows_the_traceback(images, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.finetune", "--model", "ViT-B-32", "--pretrained", "laion9",
                           "--data", str(images), "--out", str(tmp_path / "r"), "--debug"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
