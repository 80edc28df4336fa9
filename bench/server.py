"""Shared by the bench scripts: start `bentoml serve service.service:Classifier` on a free loopback port,
wait until /readyz, stop it (process group) afterwards; loopback URL checks; server memory via psutil; the
CPU's int8 instructions (speed figures depend on them).

    with serve(artifact_dir, log_path) as server:   # server.url, server.pid
        ...
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "hymenoptera-val"
LOOPBACK_PREFIXES = ("http://127.", "http://localhost", "http://[::1]")


def require_loopback(url: str) -> str:
    if not url.startswith(LOOPBACK_PREFIXES):
        raise SystemExit(f"{url}: these benchmarks run against loopback addresses only")
    return url.rstrip("/")


def photo_paths(limit: int | None = None) -> list[Path]:
    """Real photos of both classes, interleaved (ants, bees, ants, ...), deterministic."""
    ants, bees = sorted((PHOTOS / "ants").glob("*.jpg")), sorted((PHOTOS / "bees").glob("*.jpg"))
    paths = [p for pair in zip(ants, bees) for p in pair] + ants[len(bees):] + bees[len(ants):]
    if not paths:
        raise SystemExit(f"no photos under {PHOTOS}")
    return paths[:limit] if limit else paths


INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_int8_instructions() -> dict:
    """The CPU's int8 dot-product instructions, from /proc/cpuinfo (Linux; elsewhere 'unknown'); read once."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": "unknown", "flags": {}, "int8_dot": "unknown"}
    fields = dict(line.split(":", 1) for line in reversed(text.splitlines()) if ":" in line)  # first CPU's values
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags, model = set(fields.get("flags", "").split()), fields.get("model name", "unknown")
    have = {f: f in flags for f in INT8_FLAGS}
    dot = ("AMX tiles" if have["amx_int8"] else "VNNI (vpdpbusd: one instruction per 4 int8 products)"
           if have["avx512_vnni"] or have["avx_vnni"] else
           "AVX2 only (vpmaddubsw + vpmaddwd: two instructions per 4 int8 products; no VNNI, no AMX)"
           if have["avx2"] else "no AVX2")
    return {"model": model, "flags": have, "int8_dot": dot}


def machine_description() -> str:
    """What a result file says about the machine: CPU model, platform, CPU count (the CPU varies between runs)."""
    return f"{cpu_int8_instructions()['model']}, {platform.platform()}, {os.cpu_count()} CPUs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_processes(pid: int | None) -> list:
    """``psutil.Process`` of the `bentoml serve` process ``pid`` and all its children (its workers); [] if gone."""
    import psutil

    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass
class Server:
    url: str
    pid: int | None          # the `bentoml serve` process (None: an external --url)
    log: Path | None

    def rss_bytes(self) -> int | None:
        """Resident memory of the server process and all its children (BentoML workers), summed."""
        import psutil

        procs = server_processes(self.pid)
        if not procs:
            return None
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_info().rss
        return total

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log and self.log.is_file() else ""


def launch(artifact: str | Path, log_path: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Server]:
    """Start `bentoml serve` on 127.0.0.1:<free port> with ORTHSERVE_MODEL=artifact and a private BENTOML_HOME,
    in its own process group, output to ``log_path``. Pair with :func:`stop`."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    home = log_path.parent / f"bentoml_home_{port}"
    full_env = {**os.environ, "ORTHSERVE_MODEL": str(artifact), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "BENTOML_HOME": str(home), **(env or {})}
    bentoml = Path(sys.executable).with_name("bentoml")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(bentoml), "serve", "service.service:Classifier", "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, Server(f"http://127.0.0.1:{port}", proc.pid, log_path)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def serve(artifact: str | Path, log_path: Path, env: dict[str, str] | None = None,
          ready_timeout: float = 240) -> Iterator[Server]:
    """A ready server for the ``with`` block (see :func:`launch`); stopped on exit."""
    proc, server = launch(artifact, log_path, env)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in {ready_timeout:.0f} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        stop(proc)


@contextlib.contextmanager
def external(url: str, pid: int | None = None) -> Iterator[Server]:
    yield Server(require_loopback(url), pid, None)
