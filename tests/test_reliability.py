"""Reliability, the cheap parts of bench/faults.py and bench/bad_inputs.py (the long runs live there):

* a real SIGKILL of `python -m export` mid-build (test_export_safety.py covers Ctrl-C in process and a
  fake stale directory), then a re-run: no half artifact is ever accepted, the re-run cleans up;
* the service's startup path (ORTHSERVE_MODEL -> service.runtime) refuses a tampered artifact with a clear
  message (test_export_safety.py covers load_artifact itself, test_service*.py only good artifacts);
* the regressions bench/bad_inputs.py found are tested in test_service.py and test_preprocess.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import export
from orthserve.artifact import ArtifactError, load_artifact

pytestmark = pytest.mark.slow  # SIGKILLs real export and training processes

REPO = Path(__file__).resolve().parents[1]
TINY = "orthserve-tiny"


def leftovers(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory):
    """SIGKILL an export subprocess once its temporary directory has a graph in it; then re-run in process."""
    out = tmp_path_factory.mktemp("reliability") / "art"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "export", "--model", TINY, "--pretrained", "none", "--labels", "ant,bee", "--out", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_in = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        tmp = leftovers(out)
        if tmp and any(tmp[0].glob("*.onnx")):  # mid-build: a graph written, no manifest yet
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_in = tmp[0]
            break
        time.sleep(0.005)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    state = {"out_exists": out.exists(), "killed_in": killed_in,
             "left": [(p, _verdict(p)) for p in leftovers(out)]}
    manifest = export.export_artifact(export.from_model(TINY, "none", ["ant", "bee"]), out)
    return out, state, manifest


def _verdict(path: Path) -> str:
    try:
        load_artifact(path)
        return "accepted"
    except ArtifactError as err:
        return f"refused: {err}"


def test_sigkill_mid_export_leaves_no_loadable_half_artifact(killed_then_rerun):
    out, state, _ = killed_then_rerun
    if state["killed_in"] is None:
        pytest.skip("the export finished before a graph appeared in its temporary directory (machine too fast)")
    assert not state["out_exists"], "a killed first export must not leave anything at --out"
    assert state["left"], "the SIGKILLed export's temporary directory should be there (nothing can remove it)"
    for path, verdict in state["left"]:
        assert verdict.startswith("refused") and "manifest.json" in verdict, (path, verdict)


def test_rerun_after_sigkill_succeeds_and_cleans_up(killed_then_rerun):
    out, _, manifest = killed_then_rerun
    artifact = load_artifact(out)
    assert artifact.classnames == ["ant", "bee"] and artifact.manifest["files"] == manifest["files"]
    assert leftovers(out) == [], "the re-run must remove what the killed export left beside --out"


@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "image.onnx").write_bytes((d / "image.onnx").read_bytes()[:1000]), "image.onnx does not match its sha256"),
    (lambda d: (d / "text.onnx").unlink(), "text.onnx is listed in the manifest but missing"),
])
def test_service_startup_refuses_tampered_artifact(killed_then_rerun, tmp_path, monkeypatch, damage, needle):
    from service.runtime import ImageModel, TextModel, open_artifact

    out, _, _ = killed_then_rerun
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    damage(copy)
    monkeypatch.setenv("ORTHSERVE_MODEL", str(copy))
    with pytest.raises(ArtifactError, match=needle) as err:
        ImageModel()  # what Classifier.__init__ runs
    assert "re-export or re-copy" in str(err.value) or "incomplete copy" in str(err.value)
    with pytest.raises(ArtifactError, match=needle):
        TextModel(open_artifact())  # what Classifier.__init__ runs


def test_bentoml_serve_exits_on_a_tampered_artifact(killed_then_rerun, tmp_path):
    """`bentoml serve` stops at once with the reason (it used to stay up, never ready)."""
    sys.path.insert(0, str(REPO))
    from bench.server import launch, stop

    out, _, _ = killed_then_rerun
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    (copy / "image.onnx").write_bytes((copy / "image.onnx").read_bytes()[:1000])
    proc, server = launch(copy, tmp_path / "serve.log")
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(f"bentoml serve kept running on a tampered artifact:\n{server.log_tail()}")
    assert code != 0
    assert "image.onnx does not match its sha256" in server.log_tail(20000)
