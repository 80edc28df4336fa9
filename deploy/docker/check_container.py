"""Build the Bento's container image (or reuse one), run it, and check it answers exactly as `bentoml serve` does.

    nice .venv/bin/python deploy/docker/check_container.py                  # make container: build + check
    nice .venv/bin/python deploy/docker/check_container.py --image orthserve:TAG   # check an image already built
    nice .venv/bin/python deploy/docker/check_container.py --gpus            # the container with --gpus all

Steps (each printed with its command):
  1. a Docker daemon must answer (`docker info`); the base image `python:3.11-slim` must exist or is made here
     by deploy/docker/base_image.sh (Debian bookworm + Debian's python3.11: this machine cannot pull images);
  2. the artifact (ARTIFACT, default artifacts/default: `make artifact`) goes into the BentoML model store as
     `orthserve` unless the store's `orthserve:latest` already holds these very files (same manifest.json);
  3. `bentoml build`, then `bentoml containerize BENTO -t orthserve:VERSION --opt network=host` (Docker's layer
     cache makes a rebuild with unchanged requirements quick); without the buildx plugin, DOCKER_BUILDKIT=0;
  4. `docker run --network host IMAGE --host 127.0.0.1 --port P` READY_RUNS times, each timed from `docker run`
     to the first 200 of /readyz (the last run stays up); `bentoml serve service.service:Classifier` on the
     same artifact on another loopback port, timed the same way;
  5. the same requests to both: real photos (hymenoptera-val and flowers5 under ../shared/data, read in place)
     on /classify (the model's classes and zero-shot labels), /classify_batch, /embed_image, /embed_text,
     GET /model; hostile inputs (empty file, not an image, truncated JPEG, huge dimensions, bad labels JSON,
     oversize upload, wrong content types) and bench/bad_inputs.py's whole suite.  Equal means: same status
     code, same content type, the same JSON apart from numbers (every string equal, error messages included),
     scores and embedding components within TOLERANCE (absolute), plain-text bodies byte-equal;
  6. bench/results/container.json and .md: image size and layers, build time, time to /readyz, what was
     compared and every difference.  Exit status 1 when anything differs or a server fails.
Everything listens on 127.0.0.1 (host networking); nothing else is contacted except by the image build
(Debian and PyPI).  Not part of `make test`: it needs Docker.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
BENTOML = str(Path(sys.executable).with_name("bentoml"))
BENTOML_SHOWN = os.path.relpath(BENTOML, REPO) if BENTOML.startswith(str(REPO)) else BENTOML
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"
LOGS = REPO / "runs" / "container"
BASE_IMAGE = "python:3.11-slim"  # what bentofile.yaml's docker: distro debian + python_version 3.11 build on
TOLERANCE = 1e-5                 # |difference| allowed for a score or an embedding component
PACKAGES = ["bentoml", "onnxruntime-gpu", "numpy", "pillow", "tokenizers", "ftfy", "uvicorn", "starlette",
            "python-multipart", "pydantic", "safetensors", "httptools", "uvloop"]
_VERSIONS = ("import importlib.metadata as m, json, platform; print(json.dumps({'python': platform.python_version(), "
             "**{p: m.version(p) for p in %r}}))" % PACKAGES)


def cpu_model() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def say(*parts) -> None:
    print("[check_container]", *parts, flush=True)


def sh(cmd: list[str], log: Path | None = None, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    say("$", " ".join(cmd))
    if log is None:
        done = subprocess.run(cmd, text=True, capture_output=True, env=env)
    else:
        with open(log, "w") as out:
            done = subprocess.run(cmd, text=True, stdout=out, stderr=subprocess.STDOUT, env=env)
    if check and done.returncode != 0:
        detail = done.stderr[-3000:] if log is None else f"see {log}:\n" + log.read_text()[-3000:]
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{detail}")
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- build

def docker_ready() -> dict:
    if shutil.which("docker") is None:
        raise SystemExit("no docker client: apt-get install docker.io")
    done = subprocess.run(["docker", "version", "--format", "{{json .}}"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit("no Docker daemon answers: start it as root, e.g. `dockerd > /var/log/dockerd.log 2>&1 &`\n"
                         + done.stderr[-500:])
    info = json.loads(done.stdout)
    return {"client": info["Client"]["Version"], "server": info["Server"]["Version"],
            "buildx": subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0}


def ensure_base(make_base: bool) -> dict:
    have = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, text=True)
    if have.returncode != 0:
        if not make_base:
            raise SystemExit(f"no {BASE_IMAGE} image: `docker pull {BASE_IMAGE}` or `bash deploy/docker/base_image.sh`")
        sh(["bash", str(REPO / "deploy" / "docker" / "base_image.sh")], log=LOGS / "base_image.log")
        have = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, text=True, check=True)
    info = json.loads(have.stdout)[0]
    labels = info["Config"].get("Labels") or {}
    return {"image": BASE_IMAGE, "id": info["Id"], "size_bytes": info["Size"],
            "local_debian_build": labels.get("org.orthserve.base") == "1", "python": labels.get("org.orthserve.python")}


def ensure_model(artifact: Path, name: str = "orthserve") -> str:
    """The store's `name:latest` holds ``artifact``'s files (same manifest.json), else a new store entry does."""
    import bentoml

    manifest = (artifact / "manifest.json").read_bytes()
    try:
        latest = bentoml.models.get(f"{name}:latest")
        if (Path(latest.path) / "manifest.json").read_bytes() == manifest:
            say(f"model store: {latest.tag} holds {artifact} (same manifest.json)")
            return str(latest.tag)
    except bentoml.exceptions.NotFound:
        pass
    sys.path.insert(0, str(REPO))
    from export.bento import store

    tag = store(name, artifact, json.loads(manifest))
    say(f"model store: {artifact} stored as {tag}")
    return tag


def build_image(no_cache: bool = False) -> dict:
    done = sh([BENTOML, "build", "--output", "tag"], env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"})
    bento = next(line.split("__tag__:", 1)[1].strip() for line in done.stdout.splitlines() if "__tag__:" in line)
    image = f"orthserve:{bento.split(':', 1)[1]}"
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    buildx = subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0
    if not buildx and "DOCKER_BUILDKIT" not in env:
        env["DOCKER_BUILDKIT"] = "0"  # a docker CLI >= 23 without the buildx plugin cannot use BuildKit
    builder = "BuildKit" if env.get("DOCKER_BUILDKIT", "1") != "0" else "classic (DOCKER_BUILDKIT=0: no buildx plugin)"
    cmd = [BENTOML, "containerize", bento, "-t", image, "--opt", "network=host", *(["--opt", "no-cache"] if no_cache else [])]
    start = time.perf_counter()
    sh(cmd, log=LOGS / "containerize.log", env=env)
    seconds = time.perf_counter() - start
    prefix = "DOCKER_BUILDKIT=0 " if env.get("DOCKER_BUILDKIT") == "0" else ""
    return {"bento": bento, "image": image, "build_seconds": round(seconds, 1), "builder": builder, "no_cache": no_cache,
            "commands": [f"{BENTOML_SHOWN} build", prefix + " ".join([BENTOML_SHOWN, *cmd[1:]])]}


def image_facts(image: str) -> dict:
    info = json.loads(sh(["docker", "image", "inspect", image]).stdout)[0]
    layers = []
    for line in sh(["docker", "history", "--no-trunc", "--format", "{{json .}}", image]).stdout.splitlines():
        row = json.loads(line)
        step = row["CreatedBy"].split("/bin/sh -c ", 1)[-1].replace("#(nop) ", "").strip() or "base image (docker import)"
        layers.append({"size": row["Size"], "created_by": " ".join(step.split())[:160]})
    big = sorted(layers, key=lambda r: _bytes(r["size"]), reverse=True)[:6]
    return {"image": image, "id": info["Id"], "size_bytes": info["Size"], "size_gb": round(info["Size"] / 1e9, 2),
            "largest_layers": big}


def _bytes(size: str) -> float:
    units = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    for unit in ("kB", "KB", "MB", "GB", "B"):
        if size.endswith(unit):
            return float(size[: -len(unit)]) * units[unit]
    return 0.0


# --------------------------------------------------------------------------- servers

def wait_ready(url: str, alive, start: float, seconds: float, log: callable) -> float:
    while True:
        if not alive():
            raise SystemExit(f"server at {url} exited before ready:\n{log()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        if time.perf_counter() - start > seconds:
            raise SystemExit(f"{url} not ready in {seconds} s:\n{log()[-3000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def container(image: str, port: int, gpus: bool, env: dict[str, str], timeout: float):
    name = f"orthserve-check-{port}"
    cmd = ["docker", "run", "-d", "--rm", "--name", name, "--network", "host", *(["--gpus", "all"] if gpus else []),
           *[a for k, v in env.items() for a in ("-e", f"{k}={v}")], image, "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    sh(cmd)
    alive = lambda: subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name],  # noqa: E731
                                   capture_output=True, text=True).stdout.strip() == "true"
    logs = lambda: subprocess.run(["docker", "logs", name], capture_output=True, text=True).stdout  # noqa: E731
    try:
        ready = wait_ready(url, alive, start, timeout, logs)
        yield url, ready, " ".join(cmd)
    finally:
        (LOGS / f"container-{port}.log").write_text(logs())
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


@contextlib.contextmanager
def host_server(artifact: Path, port: int, env: dict[str, str], timeout: float):
    cmd = [BENTOML, "serve", "service.service:Classifier", "--host", "127.0.0.1", "--port", str(port)]
    log = LOGS / f"serve-{port}.log"
    full_env = {**os.environ, "ORTHSERVE_MODEL": str(artifact), "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true", **env}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    say("$", f"ORTHSERVE_MODEL={artifact.relative_to(REPO)}", " ".join(cmd), f"(pid {proc.pid})")
    try:
        ready = wait_ready(f"http://127.0.0.1:{port}", lambda: proc.poll() is None, start, timeout, log.read_text)
        yield f"http://127.0.0.1:{port}", ready, f"ORTHSERVE_MODEL={artifact.relative_to(REPO)} " + " ".join([BENTOML_SHOWN, *cmd[1:]])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# --------------------------------------------------------------------------- requests

def select(folder: Path, per_class: int) -> list[Path]:
    """``per_class`` photos of each class sub-folder, evenly spread over its sorted files (deterministic)."""
    out = []
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(f for f in cls.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        step = max(1, len(files) // per_class)
        out += files[::step][:per_class]
    return out


def png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def requests_to_compare(per_class: int, max_bytes: int) -> list[tuple[str, str, str, callable]]:
    """(group, name, path, build) where build() -> httpx request kwargs: the same bytes to both servers."""
    sets = {"hymenoptera-val": (select(DATA / "hymenoptera-val", per_class), ["ant", "bee"]),
            "flowers5": (select(DATA / "flowers5", per_class), ["daisy", "dandelion", "rose", "sunflower", "tulip"])}
    out = [("model", "GET /model", "/model", None), ("health", "GET /readyz", "/readyz", None),
           ("health", "GET /livez", "/livez", None)]
    for set_name, (paths, labels) in sets.items():
        if not paths:
            raise SystemExit(f"no photos under {DATA / set_name}")
        for p in paths:
            rel = f"{set_name}/{p.parent.name}/{p.name}"
            out.append(("photo /classify (model classes)", rel, "/classify",
                        lambda p=p: {"files": {"image": (p.name, p.read_bytes(), "image/jpeg")}}))
            out.append(("photo /classify (zero-shot labels)", rel, "/classify",
                        lambda p=p, labels=labels: {"files": {"image": (p.name, p.read_bytes(), "image/jpeg")},
                                                    "data": {"labels": json.dumps(labels), "top_k": str(len(labels))}}))
        for p in paths[:10]:
            out.append(("photo /embed_image", f"{set_name}/{p.parent.name}/{p.name}", "/embed_image",
                        lambda p=p: {"files": {"image": (p.name, p.read_bytes(), "image/jpeg")}}))
        for i in range(0, min(len(paths), 32), 8):
            chunk = paths[i:i + 8]
            out.append(("photo /classify_batch", f"{set_name} batch of {len(chunk)} from #{i}", "/classify_batch",
                        lambda chunk=chunk, labels=labels: {"files": [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in chunk],
                                                            "data": {"labels": ", ".join(labels)}}))
        out.append(("/embed_text", f"{set_name} labels", "/embed_text", lambda labels=labels: {"json": {"texts": labels}}))
    photo = sets["hymenoptera-val"][0][0]
    jpeg = photo.read_bytes()
    img = lambda data, ctype="image/jpeg", **fields: {"files": {"image": ("x", data, ctype)}, "data": fields}  # noqa: E731
    hostile = [
        ("empty file", "/classify", lambda: img(b"")),
        ("not an image (text)", "/classify", lambda: img(b"definitely not an image\n" * 40)),
        ("not an image (random bytes)", "/embed_image", lambda: img(np.random.default_rng(7).bytes(65536))),
        ("truncated JPEG (first half)", "/classify", lambda: img(jpeg[: len(jpeg) // 2])),
        ("JPEG headers only (600 bytes)", "/classify", lambda: img(jpeg[:600])),
        ("huge dimensions: 9000x9000 1-bit PNG bomb", "/classify",
         lambda: img(png(Image.new("1", (9000, 9000)), optimize=True), "image/png")),
        ("huge dimensions: 1x60000 PNG", "/classify", lambda: img(png(Image.new("RGB", (1, 60000))), "image/png")),
        ("bad labels JSON: unterminated", "/classify", lambda: img(jpeg, labels='["ant", "bee"')),
        ("labels: a JSON object (read as one comma-separated name)", "/classify", lambda: img(jpeg, labels='{"ant": 1}')),
        ("bad labels JSON: numbers", "/classify", lambda: img(jpeg, labels="[1, 2]")),
        ("bad labels: duplicates", "/classify", lambda: img(jpeg, labels='["ant", " ant"]')),
        ("bad top_k", "/classify", lambda: img(jpeg, top_k="-1")),
        ("oversize upload (limit + 4 KiB)", "/classify",
         lambda: img(np.random.default_rng(8).bytes(max_bytes + 4096))),
        ("JSON body on /classify", "/classify", lambda: {"json": {"image": "x"}}),
        ("missing image field", "/classify", lambda: {"files": {"picture": ("a.jpg", jpeg, "image/jpeg")}}),
        ("/embed_text wrong key", "/embed_text", lambda: {"json": {"text": ["a dog"]}}),
        ("/classify_batch with one bad image", "/classify_batch",
         lambda: {"files": [("images", ("a.jpg", jpeg, "image/jpeg")), ("images", ("b.jpg", b"garbage", "image/jpeg"))]}),
    ]
    out += [("hostile", name, path, build) for name, path, build in hostile]
    return out


def bad_input_suite():
    """bench/bad_inputs.py's cases (the project's hostile-input suite), or [] when it cannot be imported."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bad_inputs
        return bad_inputs, bad_inputs.cases()
    except Exception as err:  # noqa: BLE001  (another engineer's file: report, do not fail the check on it)
        say(f"bench/bad_inputs.py not used: {type(err).__name__}: {err}")
        return None, []


# --------------------------------------------------------------------------- comparison

class Diff:
    def __init__(self, tolerance: float = TOLERANCE) -> None:
        self.max_number, self.tolerance = 0.0, tolerance

    def compare(self, a, b, where: str = "") -> str | None:
        """None when equal (numbers within TOLERANCE), else where and how they differ."""
        if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
            return None if a == b else f"{where}: {a!r} != {b!r}"
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if isinstance(a, float) or isinstance(b, float):
                if not (math.isfinite(a) and math.isfinite(b)):
                    return None if a == b else f"{where}: {a!r} != {b!r}"
                d = abs(a - b)
                self.max_number = max(self.max_number, d)
                return None if d <= self.tolerance else f"{where}: {a!r} vs {b!r} (|diff| {d:.2e} > {self.tolerance})"
            return None if a == b else f"{where}: {a} != {b}"
        if type(a) is not type(b):
            return f"{where}: {type(a).__name__} vs {type(b).__name__}"
        if isinstance(a, dict):
            if set(a) != set(b):
                return f"{where}: keys {sorted(set(a) ^ set(b))} differ"
            return next((r for k in a if (r := self.compare(a[k], b[k], f"{where}.{k}"))), None)
        if isinstance(a, list):
            if len(a) != len(b):
                return f"{where}: {len(a)} vs {len(b)} items"
            if a and all(isinstance(x, dict) and set(x) == {"label", "score"} for x in a + b):
                # predictions: the same labels with the same scores; order may differ only between near-ties
                sa, sb = {x["label"]: x["score"] for x in a}, {x["label"]: x["score"] for x in b}
                if set(sa) != set(sb):
                    return f"{where}: labels {sorted(set(sa) ^ set(sb))[:5]} in one answer only"
                return next((r for k in sa if (r := self.compare(sa[k], sb[k], f"{where}[{k!r}]"))), None)
            return next((r for i, (x, y) in enumerate(zip(a, b)) if (r := self.compare(x, y, f"{where}[{i}]"))), None)
        return None if a == b else f"{where}: {str(a)[:200]!r} != {str(b)[:200]!r}"


def answer(status: int, headers: dict, body: bytes) -> dict:
    ctype = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
    out = {"status": status, "content_type": ctype.split(";")[0].strip(), "body": body}
    if out["content_type"] == "application/json":
        try:
            out["json"] = json.loads(body)
        except ValueError:
            pass
    return out


def same(diff: Diff, a: dict, b: dict, name: str) -> str | None:
    if a["status"] != b["status"]:
        return f"status {a['status']} vs {b['status']}"
    if a["content_type"] != b["content_type"]:
        return f"content type {a['content_type']!r} vs {b['content_type']!r}"
    if "json" in a or "json" in b:
        ja, jb = a.get("json"), b.get("json")
        if name == "GET /model" and isinstance(ja, dict) and isinstance(jb, dict):
            ja, jb = {k: v for k, v in ja.items() if k != "label_cache"}, {k: v for k, v in jb.items() if k != "label_cache"}
        return diff.compare(ja, jb, "body")
    return None if a["body"] == b["body"] else f"body {a['body'][:120]!r} vs {b['body'][:120]!r}"


def run_checks(container_url: str, host_url: str, per_class: int, use_suite: bool, tolerance: float) -> dict:
    diff, rows = Diff(tolerance), []
    with httpx.Client(base_url=container_url, timeout=120) as c, httpx.Client(base_url=host_url, timeout=120) as h:
        limits = c.get("/model").json()["limits"]
        for group, name, path, build in requests_to_compare(per_class, limits["max_bytes"]):
            if build is None:
                got = [answer(r.status_code, dict(r.headers), r.content) for r in (c.get(path), h.get(path))]
            else:
                kw = build()
                got = [answer(r.status_code, dict(r.headers), r.content) for r in (c.post(path, **kw), h.post(path, **kw))]
            rows.append({"group": group, "name": name, "route": path, "status": got[0]["status"],
                         "host_status": got[1]["status"], "error": (got[0].get("json") or {}).get("error")
                         if isinstance(got[0].get("json"), dict) else None, "difference": same(diff, *got, name)})
        if use_suite:
            module, cases = bad_input_suite()
            if cases:
                photo = select(DATA / "hymenoptera-val", 1)[0].read_bytes()
                classes = c.get("/model").json()["classes"]
                for case in cases:
                    got = []
                    for url, client in ((container_url, c), (host_url, h)):
                        ctx = module.Ctx(url, limits, photo, classes)
                        try:
                            got.append(answer(*case.send(client, ctx)))
                        except httpx.HTTPError as err:
                            got.append({"status": 0, "content_type": "", "body": f"{type(err).__name__}".encode()})
                    status = got[0]["status"]
                    rows.append({"group": "bench/bad_inputs.py", "name": case.name, "route": case.route,
                                 "status": status, "host_status": got[1]["status"], "expect": case.expect,
                                 "as_expected": {"4xx": 400 <= status < 500, "200": status == 200}.get(
                                     case.expect, status == 200 or 400 <= status < 500),
                                 "error": (got[0].get("json") or {}).get("error") if isinstance(got[0].get("json"), dict) else None,
                                 "difference": same(diff, *got, case.name)})
        ready = [c.get("/readyz").status_code, h.get("/readyz").status_code]
    groups: dict[str, dict] = {}
    for r in rows:
        g = groups.setdefault(r["group"], {"requests": 0, "equal": 0, "statuses": {}})
        g["requests"] += 1
        g["equal"] += r["difference"] is None
        g["statuses"][str(r["status"])] = g["statuses"].get(str(r["status"]), 0) + 1
    return {"tolerance": tolerance, "requests": len(rows), "equal": sum(r["difference"] is None for r in rows),
            "max_abs_number_difference": diff.max_number, "groups": groups,
            "differences": [r for r in rows if r["difference"] is not None],
            "hostile": [r for r in rows if r["group"] == "hostile"], "readyz_after": ready,
            "suite_not_as_expected": [r for r in rows if r.get("as_expected") is False], "rows": rows,
            "no_5xx": all(r["status"] < 500 and r["host_status"] < 500 for r in rows)}


# --------------------------------------------------------------------------- report

def write_report(result: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    img, chk = result["image"], result["checks"]
    ready = result["ready_seconds"]
    lines = [
        "# The Bento's container image, built and run here",
        "",
        f"{result['date']}, {result['machine']}; Docker {result['docker']['server']} (daemon), "
        f"client {result['docker']['client']}; `deploy/docker/check_container.py` (`make container`), raw numbers in "
        "`container.json`. CPU only: this machine has no GPU (the image is the GPU one: onnxruntime-gpu with the "
        "CUDA 13 pip libraries; without a GPU it runs on onnxruntime's CPU provider).",
        "",
        "| | |",
        "|---|---|",
        f"| image | `{img['image']}` ({img['id'][7:19]}) from Bento `{result['build'].get('bento', '?')}` |",
        f"| image size | **{img['size_gb']} GB** ({img['size_bytes']:,} bytes, `docker image inspect`) |",
        f"| base image | `{result['base']['image']}` {result['base']['size_bytes'] / 1e6:.0f} MB"
        + (f" (built here from Debian bookworm, Python {result['base']['python']}: deploy/docker/base_image.sh)"
           if result["base"]["local_debian_build"] else "") + " |",
        f"| build (`bentoml containerize`) | " + (f"{result['build']['build_seconds']} s, {result['build']['builder']}, "
        + ("no layer cache (every package downloaded)" if result["build"]["no_cache"] else "Docker's layer cache on")
        if "build_seconds" in result["build"] else "an existing image, not rebuilt") + " |",
        f"| time to /readyz, container | {', '.join(f'{s:.1f}' for s in ready['container'])} s "
        f"(median {statistics.median(ready['container']):.1f} s; `docker run` to the first 200) |",
        f"| time to /readyz, `bentoml serve` | {ready['host']:.1f} s |",
        f"| answers compared | **{chk['equal']} of {chk['requests']} equal**; largest number difference "
        f"{chk['max_abs_number_difference']:.1e} (tolerance {chk['tolerance']}) |",
        f"| no 5xx, /readyz after | {chk['no_5xx']}, {chk['readyz_after']} |",
        "",
        "Largest layers:",
        "",
        "| size | layer |",
        "|---|---|",
        *[f"| {l['size']} | `{l['created_by'][:110].replace('|', '/')}` |" for l in img["largest_layers"]],
        "",
        "Requests (same bytes to both; equal = same status, content type, strings and error messages, numbers within "
        "the tolerance):",
        "",
        "| group | requests | equal | statuses |",
        "|---|---|---|---|",
        *[f"| {g} | {v['requests']} | {v['equal']} | {', '.join(f'{k}: {n}' for k, n in sorted(v['statuses'].items()))} |"
          for g, v in chk["groups"].items()],
        "",
        "Hostile inputs (the container's answer; `bentoml serve` answered the same):",
        "",
        "| input | route | status | error |",
        "|---|---|---|---|",
        *[f"| {r['name']} | {r['route']} | {r['status']} | {(r['error'] or '').replace('|', '/')[:110]} |" for r in chk["hostile"]],
        "",
    ]
    if chk["suite_not_as_expected"]:
        lines += ["bench/bad_inputs.py cases answered otherwise than that suite expects (the same from both servers, so "
                  "not a container matter):", "",
                  *[f"- {r['name']} ({r['route']}): expected {r['expect']}, got {r['status']}" for r in chk["suite_not_as_expected"]], ""]
    if chk["differences"]:
        lines += ["Differences:", "", *[f"- {r['group']} / {r['name']}: {r['difference']}" for r in chk["differences"]], ""]
    lines += ["Packages (container | `bentoml serve`'s .venv): " + ", ".join(
        f"{k} {v}" + ("" if result["packages"]["host"].get(k) == v else f" | {result['packages']['host'].get(k)}")
        for k, v in result["packages"]["container"].items()), "",
              "Commands:", "", "```", *result["commands"], "```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", help="check this image, build nothing")
    parser.add_argument("--artifact", default=os.environ.get("ARTIFACT", "artifacts/default"))
    parser.add_argument("--ready-runs", type=int, default=3, help="container starts timed (default 3)")
    parser.add_argument("--per-class", type=int, default=20, help="photos per class of each data set (default 20)")
    parser.add_argument("--no-bad-input-suite", action="store_true", help="leave out bench/bad_inputs.py's cases")
    parser.add_argument("--no-base", action="store_true", help="do not build the local base image when it is missing")
    parser.add_argument("--no-cache", action="store_true", help="containerize without Docker's layer cache (a cold build)")
    parser.add_argument("--gpus", action="store_true", help="docker run --gpus all (untested here: no GPU)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest |difference| of a score or embedding component (default {TOLERANCE})")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for /readyz")
    parser.add_argument("--out", default=str(RESULTS / "container"), help="result files, without suffix")
    args = parser.parse_args()
    LOGS.mkdir(parents=True, exist_ok=True)
    artifact = (REPO / args.artifact).resolve()
    if not (artifact / "manifest.json").is_file():
        raise SystemExit(f"no artifact at {artifact}: run `make artifact`")
    # defaults on both sides (workers and threads from the CPU count, which the container sees as the host does);
    # ORTHSERVE_* settings in this environment go to both
    serve_env = {k: v for k, v in os.environ.items() if k.startswith("ORTHSERVE_") and k != "ORTHSERVE_MODEL"}
    docker = docker_ready()
    base = ensure_base(not args.no_base)
    if args.image:
        build = {"image": args.image, "commands": []}
    else:
        ensure_model(artifact)
        build = build_image(args.no_cache)
    image = image_facts(build["image"])
    versions = json.loads(sh(["docker", "run", "--rm", "--network", "host", "--entrypoint", "/app/.venv/bin/python",
                              build["image"], "-c", _VERSIONS]).stdout)
    host_versions = json.loads(sh([sys.executable, "-c", _VERSIONS]).stdout)
    ready_container, commands = [], []
    for i in range(args.ready_runs - 1):
        with container(build["image"], free_port(), args.gpus, serve_env, args.timeout) as (_, ready, cmd):
            ready_container.append(ready)
        say(f"container start {i + 1}: ready in {ready:.1f} s")
    with container(build["image"], free_port(), args.gpus, serve_env, args.timeout) as (curl, ready, ccmd):
        ready_container.append(ready)
        say(f"container start {len(ready_container)}: ready in {ready:.1f} s ({curl})")
        with host_server(artifact, free_port(), serve_env, args.timeout) as (hurl, host_ready, hcmd):
            say(f"bentoml serve: ready in {host_ready:.1f} s ({hurl})")
            checks = run_checks(curl, hurl, args.per_class, not args.no_bad_input_suite, args.tolerance)
    commands = [
        "dockerd > /var/log/dockerd.log 2>&1 &        # as root, once",
        "bash deploy/docker/base_image.sh              # as root, once: python:3.11-slim from Debian packages",
        "make artifact",
        ".venv/bin/python -c \"import json, pathlib; from export.bento import store; a = pathlib.Path('artifacts/default'); "
        "print(store('orthserve', a, json.loads((a / 'manifest.json').read_text())))\"   # skipped when orthserve:latest holds it",
        *build["commands"],
        ccmd + "   # READY_RUNS times",
        " ".join([*(f"{k}={v}" for k, v in serve_env.items()), hcmd]),
        " ".join(["nice .venv/bin/python deploy/docker/check_container.py", *sys.argv[1:]]),
    ]
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{cpu_model()}, {platform.platform()}, {os.cpu_count()} CPUs",
              "docker": docker, "base": base, "build": build, "image": image, "serve_env": serve_env,
              "ready_seconds": {"container": [round(s, 2) for s in ready_container], "host": round(host_ready, 2)},
              "packages": {"container": versions, "host": host_versions}, "checks": checks, "commands": commands,
              "gpu": "--gpus all" if args.gpus else "not used (no GPU on this machine)"}
    write_report(result, Path(args.out))
    say(f"image {image['image']}: {image['size_gb']} GB; ready in {statistics.median(ready_container):.1f} s (container), "
        f"{host_ready:.1f} s (bentoml serve); {checks['equal']} of {checks['requests']} answers equal, "
        f"largest number difference {checks['max_abs_number_difference']:.1e}; {Path(args.out).with_suffix('.md')}")
    for row in checks["differences"]:
        say("DIFFERENT:", row["group"], "/", row["name"], ":", row["difference"])
    return 0 if not checks["differences"] and checks["no_5xx"] else 1


if __name__ == "__main__":
    sys.exit(main())
