"""Shared by the service tests: one exported orthserve-tiny artifact per test session, test images."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "tests" / "fixtures" / "images" / "hymenoptera-val"  # committed synthetic photos (conftest)
CLASSES = ["ants", "bees"]
TEMPLATES = ["a photo of {}.", "a close-up photo of {}."]


def export_tiny(base: Path) -> Path:
    """Export orthserve-tiny (random weights, classes ants/bees) with the export CLI, once per session."""
    out = base / "orthserve-tiny-artifact"
    if (out / "manifest.json").is_file():
        return out
    cmd = [sys.executable, "-m", "export", "--model", "orthserve-tiny", "--pretrained", "none",
           "--labels", ",".join(CLASSES), "--fp16", "--int8", "--out", str(out)]
    for template in TEMPLATES:
        cmd += ["--template", template]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"export failed:\n{done.stdout}\n{done.stderr}"
    return out


def photos(n: int = 4) -> list[Path]:
    """A few photos, both classes (committed synthetic JPEGs: tests/fixtures/images)."""
    ants, bees = sorted((PHOTOS / "ants").glob("*.jpg")), sorted((PHOTOS / "bees").glob("*.jpg"))
    return [p for pair in zip(ants, bees) for p in pair][:n]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def odd_images(photo: Path) -> dict[str, bytes]:
    """The awkward-but-valid images the service must handle: every mode and container quirk."""
    rgb = Image.open(photo).convert("RGB").resize((96, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    frames = [rgb.convert("P"), rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    return {
        "grayscale": encode(rgb.convert("L"), "PNG"),
        "rgba": encode(rgb.convert("RGBA"), "PNG"),
        "cmyk": encode(rgb.convert("CMYK"), "JPEG"),
        "16bit": encode(Image.fromarray(gray16), "PNG"),
        "palette": encode(rgb.convert("P"), "PNG"),
        "exif_rotated": encode(rgb, "JPEG", exif=exif),
        "animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        "webp": encode(rgb, "WEBP"),
        "tiny_1x1": encode(rgb.resize((1, 1)), "PNG"),
    }


def bomb() -> bytes:
    """A small PNG that decodes to 64 megapixels (1-bit, compresses to a few KB)."""
    return encode(Image.new("1", (8000, 8000)), "PNG", optimize=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    """Poll ``url``/readyz until 200; fail with the server's log if it exits or takes longer than ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, f"server exited:\n{Path(log).read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"not ready in {seconds} s:\n{Path(log).read_text()[-3000:]}"
        time.sleep(0.5)


@contextlib.contextmanager
def live_server(artifact: Path, workdir: Path, **env_extra: str):
    """``bentoml serve`` of ``artifact`` on a free loopback port, as an ``httpx.Client`` (``.server_pid`` set), with
    two workers on any machine so the balancing between them runs; killed (process group) on exit."""
    port = free_port()
    log = open(workdir / "serve.log", "w+")
    env = {**os.environ, "ORTHSERVE_MODEL": str(artifact), "ORTHSERVE_WORKERS": "2", "HF_HUB_OFFLINE": "1",
           "BENTOML_HOME": str(workdir / "bentoml_home"), **env_extra}
    bentoml = Path(sys.executable).with_name("bentoml")
    proc = subprocess.Popen([str(bentoml), "serve", "service.service:Classifier", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, Path(log.name))
        with httpx.Client(base_url=url, timeout=60) as client:
            client.server_pid = proc.pid  # the workers' parent: it names their in-flight board
            yield client
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
