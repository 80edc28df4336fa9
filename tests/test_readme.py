"""The README's quickstart, run as a new user would: every command block that needs no download, in order,
against the installed project, each outcome checked.

The placeholders a user replaces (``path/to/photo.jpg``, ``path/to/your/images``) become a real photo and a
small image folder; ports, ``runs/mine`` and ``artifacts/mine`` move to free ports and a temporary folder,
so the test leaves the checkout as it was. Blocks that name ``/path/to/`` weights or an ``hf-hub:`` model
need a download and are skipped.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import DATA, REPO
from service_helpers import free_port, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DATA.is_dir(), reason=f"no images at {DATA}")]
FLOWERS = ["daisy", "dandelion", "rose", "sunflower", "tulip"]


def quickstart_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quickstart"):]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def needs_download(block: str) -> bool:
    return "/path/to/" in block or "hf-hub:" in block


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (make, bentoml and its workers), SIGKILL after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def user_images(tmp_path) -> Path:
    """A user's folder: 60 flower photos per class (symlinks)."""
    root = tmp_path / "my-images"
    for name in FLOWERS:
        (root / name).mkdir(parents=True)
        for photo in sorted((DATA / "flowers5" / name).iterdir())[:60]:
            (root / name / photo.name).symlink_to(photo)
    return root


def test_the_quickstart_runs_offline_as_written(tmp_path, user_images):
    blocks = quickstart_blocks()
    assert len(blocks) >= 5 and any("make serve" in b for b in blocks) and any("make finetune" in b for b in blocks)
    photo = sorted((DATA / "hymenoptera-val" / "ants").glob("*.jpg"))[0]
    ports = {"3000": str(free_port()), "3001": str(free_port())}
    replacements = {"path/to/photo.jpg": str(photo), "path/to/your/images": str(user_images),
                    "runs/mine": str(tmp_path / "runs" / "mine"), "artifacts/mine": str(tmp_path / "artifacts" / "mine"),
                    "localhost:3000": f"localhost:{ports['3000']}", "localhost:3001": f"localhost:{ports['3001']}",
                    "--port 3001": f"--port {ports['3001']}"}
    env = {**os.environ, "PHOTO": str(photo), "DATA": str(user_images), "PORT": ports["3000"],
           "ARTIFACT": str(tmp_path / "artifacts" / "default"), "BENTOML_HOME": str(tmp_path / "bentoml"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    servers: list[subprocess.Popen] = []
    outputs: list[str] = []
    try:
        for number, block in enumerate(blocks):
            if needs_download(block):
                continue
            for old, new in replacements.items():
                block = block.replace(old, new)
            lines = [line for line in block.splitlines() if line.strip()]
            serve = [line for line in lines if "make serve" in line or "bentoml serve" in line]
            for line in (line for line in lines if line not in serve):
                done = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True,
                                      timeout=900)
                assert done.returncode == 0, f"block {number}: {line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
                outputs.append(done.stdout)
            for line in serve:
                log = tmp_path / f"serve-{number}.log"
                proc = subprocess.Popen(["bash", "-c", line], cwd=REPO, env=env, stdout=log.open("w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
                servers.append(proc)
                port = ports["3001"] if "bentoml serve" in line else ports["3000"]
                wait_ready(f"http://127.0.0.1:{port}", proc, log, seconds=400)
    finally:
        for proc in servers:
            stop(proc)

    answers = [json.loads(out) for out in outputs if out.strip().startswith('{"predictions"')]
    zero_shot, own_classes, fine_tuned = answers
    assert {p["label"] for p in zero_shot["predictions"]} == {"ant", "bee", "butterfly"}
    assert len(own_classes["predictions"]) == 5 and zero_shot["model"] == "orthserve-mini"
    assert {p["label"] for p in fine_tuned["predictions"]} <= set(FLOWERS)
    metrics = json.loads((tmp_path / "runs" / "mine" / "metrics.json").read_text())
    assert metrics["model"] == "orthserve-mini" and metrics["pretrained"] == "default" and "test_top1" in metrics["gain"]
    for name in ("curves.png", "confusion.png"):
        assert (tmp_path / "runs" / "mine" / name).is_file()
    assert (tmp_path / "artifacts" / "mine" / "manifest.json").is_file()
