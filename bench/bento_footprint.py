"""What the served Bento weighs and how fast it starts, for one checkout of this repo (issue 23).

    python bench/bento_footprint.py --label after                       # this checkout
    python bench/bento_footprint.py --label before --repo /tmp/before   # another checkout (git worktree)

For the checkout's ``bentofile.yaml`` it measures:
  environment  a fresh virtualenv with exactly the Bento's ``python.packages`` installed (what its image installs
               on top of the OS layer): size on disk, number of distributions, whether torch is among them
  bento        ``bentoml build`` into a throwaway BentoML home holding the artifact as ``orthserve:latest``:
               the Bento's own size (code and settings; BentoML 1.4 keeps the model beside it, in the model
               store, and adds it when the Bento is exported or containerized: ``model MB``, the artifact)
  cold start   ``bentoml serve`` in that environment, from the command to the first 200 of ``/readyz``
               (median of ``--starts`` starts; each one a new process tree), and the modules its service imports
Results are merged into ``bench/results/bento_footprint.{json,md}`` under the label, so two runs (before and
after a change) sit side by side.  torch, when a bentofile lists it, is pinned to the CPU build on this
machine's disk (``--torch``), as the Bento's CPU index would give it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
HEAVY = ("torch", "open_clip", "transformers")


def bento_packages(repo: Path, torch_pin: str) -> list[str]:
    import yaml

    packages = yaml.safe_load((repo / "bentofile.yaml").read_text())["python"]["packages"]
    return [torch_pin if p.split(">")[0].split("=")[0].strip() == "torch" else p for p in packages]


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def make_env(packages: list[str], venv: Path) -> dict:
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *packages], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    dists = sorted(p.name.split("-")[0].lower() for p in site.glob("*.dist-info"))
    return {"packages": packages, "site_packages_mb": round(dir_mb(site), 1), "distributions": len(dists),
            "has_torch": "torch" in dists}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_start(venv: Path, repo: Path, artifact: Path, timeout: float = 180.0) -> float:
    """Seconds from ``bentoml serve`` to the first 200 of /readyz."""
    port = free_port()
    env = {**os.environ, "ORTHSERVE_MODEL": str(artifact), "HF_HUB_OFFLINE": "1", "ORTHSERVE_WORKERS": "1",
           "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.Popen([str(venv / "bin" / "bentoml"), "serve", "service.service:Classifier", "--port", str(port)],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while time.perf_counter() - start < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode} in {repo}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"/readyz not ready after {timeout} s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def imported_heavy(venv: Path, repo: Path, artifact: Path) -> list[str]:
    code = f"import sys; import service.service; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "ORTHSERVE_MODEL": str(artifact), "HF_HUB_OFFLINE": "1"}, check=True)
    return done.stdout.split()


def bento_size(venv: Path, repo: Path, artifact: Path) -> float:
    home = Path(tempfile.mkdtemp(prefix="bentoml-home-"))
    env = {**os.environ, "BENTOML_HOME": str(home), "PYTHONPATH": str(repo)}
    try:
        # what `python -m export --bento-model orthserve` stores, without export's torch imports
        store = ("import shutil, bentoml; from pathlib import Path\n"
                 "with bentoml.models.create('orthserve', module='orthserve.artifact') as m:\n"
                 f"    for p in Path({str(artifact)!r}).iterdir(): shutil.copy2(p, Path(m.path) / p.name)")
        subprocess.run([str(venv / "bin" / "python"), "-c", store], cwd=repo, env=env, check=True,
                       capture_output=True)
        subprocess.run([str(venv / "bin" / "bentoml"), "build", "."], cwd=repo, env=env, check=True,
                       capture_output=True)
        return round(dir_mb(home / "bentos"), 1)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def write_report(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bento_footprint.json").write_text(json.dumps(results, indent=2))
    lines = ["# The Bento's weight and cold start", "",
             "`bench/bento_footprint.py`; environment = a fresh virtualenv with the bentofile's `python.packages` "
             "(what the image installs above the OS); cold start = `bentoml serve` to the first 200 of `/readyz`, "
             "one worker, CPU.", "",
             "| checkout | environment MB | distributions | torch | bento MB (code) | model MB | cold start s (median) | "
             "starts | service imports |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} ({r['commit']}) | {r['environment']['site_packages_mb']:,} | "
                     f"{r['environment']['distributions']} | {'yes' if r['environment']['has_torch'] else 'no'} | "
                     f"{r['bento_mb']} | {r.get('model_mb', '-')} | {r['cold_start_s']['median']:.2f} | "
                     f"{', '.join(f'{s:.2f}' for s in r['cold_start_s']['runs'])} | "
                     f"{', '.join(r['service_imports']) or 'none of torch, open_clip, transformers'} |")
    lines += ["", "Environment: `pip install` of the bentofile's packages into a new virtualenv (torch pinned to the CPU "
              "build, 2.13.0, as the Bento's CPU index gave it); both hold onnxruntime-gpu with its CUDA 13 and cuDNN "
              "wheels (about 2.4 GB), so the GPU image and the CPU image are the same. Cold starts run in the "
              "environment named in the JSON (`cold_start_s.venv`): the 'before' environment cannot import here "
              "(PyPI's torchvision against the CPU torch file), so its starts ran in the development virtualenv "
              "(torch 2.14.1), and 'after' was started in both for a like-for-like figure. A start includes "
              "loading and checking the artifact (sha256 of 263 MB), both ONNX sessions and their warm-up."]
    lines += ["", "Measured on this 2-CPU machine, one checkout after the other on the same day (labels: "
              f"{', '.join(k + ': ' + v['date'] for k, v in results.items())})."]
    (RESULTS / "bento_footprint.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True)
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--artifact", type=Path, help="default: REPO/artifacts/default")
    parser.add_argument("--venv", type=Path, help="default: /tmp/bento-env-LABEL (reused when present)")
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--start-venv", type=Path, help="the environment the cold starts run in (default: --venv); "
                        "for a bentofile whose torch cannot import here (PyPI's torchvision against the CPU torch file)")
    parser.add_argument("--torch", default="torch==2.13.0", help="what a bentofile's torch becomes here")
    args = parser.parse_args()
    repo = args.repo.resolve()
    artifact = (args.artifact or repo / "artifacts" / "default").resolve()
    venv = args.venv or Path(tempfile.gettempdir()) / f"bento-env-{args.label}"
    environment = make_env(bento_packages(repo, args.torch), venv)
    start_venv = args.start_venv or venv
    imports = imported_heavy(start_venv, repo, artifact)
    starts = [cold_start(start_venv, repo, artifact) for _ in range(args.starts)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout.strip()
    path = RESULTS / "bento_footprint.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[args.label] = {"commit": commit.strip() + ("+changes" if dirty else ""), "date": time.strftime("%Y-%m-%d"),
                           "environment": environment, "bento_mb": bento_size(start_venv, repo, artifact),
                           "model_mb": round(dir_mb(artifact), 1),
                           "cold_start_s": {"median": round(statistics.median(starts), 2), "venv": str(start_venv),
                                            "runs": [round(s, 2) for s in starts]},
                           "service_imports": imports}
    write_report(results)
    print(json.dumps(results[args.label], indent=2))


if __name__ == "__main__":
    main()
