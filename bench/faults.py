"""Fault injection: kill -9 during training's checkpoint writes and during export; tampered artifacts at service start.

    nice -n 5 .venv/bin/python bench/faults.py                       # full: 8 training kills, 8 export kills, 4 tamperings
    nice -n 5 .venv/bin/python bench/faults.py --smoke               # 3 + 3 kills, 1 tampering served
    nice -n 5 .venv/bin/python bench/faults.py --parts export tamper # some parts only (results merged into faults.json)

training  `python -m training.finetune --model orthserve-tiny --method full ... --out RUN` (method full: the whole model
          and AdamW state in checkpoint.pt, the largest write), SIGKILLed either at a random time or the moment a
          temporary checkpoint file appears (mid-write); after every kill: checkpoint.pt, if present, must load with
          torch.load(weights_only=True) and hold a complete state, adapter.safetensors must load; then the next
          invocation is `--resume` (or `--overwrite` when no checkpoint exists yet).  Finally a run is left to finish:
          it must complete with every epoch in its history.  Full mode also compares the final metrics with an
          uninterrupted run of the same seed.
export    `python -m export --model orthserve-tiny ... --out ART` SIGKILLed at random times, first with no ART, then over
          an earlier artifact: after every kill load_artifact(ART) must either refuse (no ART) or give a complete
          artifact (every variant opens in onnxruntime), an earlier artifact must survive intact, and every
          directory a kill left behind must be refused by load_artifact unless it is complete; then a re-run must
          succeed and clean up.
tamper    copies of an artifact with a truncated / byte-flipped graph, a missing file, a bad manifest: the service's
          startup code (service.runtime.open_artifact with ORTHSERVE_MODEL) must raise ArtifactError with a clear
          message; `bentoml serve` on them must never become ready and must say why in its log.
Bounded: every process has a timeout; every loop has a count.  Results: bench/results/faults.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from server import launch, stop  # noqa: E402  (bench/ is sys.path[0])

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
DATA = REPO.parent / "shared" / "data"
PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CHECKPOINT_KEYS = {"epoch", "step", "history", "trainable", "optimizer", "scheduler", "scaler", "rng", "model", "method"}


def kill_when(proc: subprocess.Popen, deadline_s: float, watch: Path | None = None, pattern: str = "",
              delay_after_seen: float = 0.0) -> dict:
    """SIGKILL ``proc`` after ``deadline_s`` seconds, or ``delay_after_seen`` after a file matching ``pattern``
    appears in ``watch`` (polled every 2 ms).  Returns what happened."""
    start = time.monotonic()
    seen_at = None
    while proc.poll() is None:
        now = time.monotonic() - start
        if watch is not None and seen_at is None and watch.is_dir() and any(watch.glob(pattern)):
            seen_at = now
        if (seen_at is not None and now >= seen_at + delay_after_seen) or now >= deadline_s:
            tmp_present = bool(watch is not None and watch.is_dir() and any(watch.glob(pattern)))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"killed": True, "at_s": round(now, 3), "trigger": "file" if seen_at is not None else "timer",
                    "temp_file_present_at_kill": tmp_present}
        time.sleep(0.002)
    return {"killed": False, "exit_code": proc.returncode, "at_s": round(time.monotonic() - start, 3)}


# --------------------------------------------------------------------------- training

def finetune_cmd(run: Path, epochs: int, *extra: str) -> list[str]:
    return [PY, "-m", "training.finetune", "--model", "orthserve-tiny", "--pretrained", "none", "--method", "full",
            "--data", str(DATA / "flowers5"), "--out", str(run), "--shots", "4", "--epochs", str(epochs),
            "--batch-size", "10", "--workers", "0", "--val-shots", "1", "--test-per-class", "4",
            "--eval-batch-size", "32", "--progress", "off", "--seed", "3", *extra]


def inspect_run(run: Path) -> dict:
    """What a kill left: is checkpoint.pt loadable and complete, is adapter.safetensors loadable, temp files."""
    import torch
    from safetensors.torch import load_file

    state: dict = {"temp_files": sorted(p.name for p in run.glob(".*tmp*"))} if run.is_dir() else {"run_dir": False}
    ckpt = run / "checkpoint.pt"
    if ckpt.is_file():
        try:
            data = torch.load(ckpt, map_location="cpu", weights_only=True)
            missing = CHECKPOINT_KEYS - set(data)
            state["checkpoint"] = {"loads": True, "epoch": data.get("epoch"), "complete": not missing,
                                   "history_rows": len(data.get("history", [])), "bytes": ckpt.stat().st_size}
        except Exception as err:  # noqa: BLE001 - that is what we look for
            state["checkpoint"] = {"loads": False, "error": f"{type(err).__name__}: {err}"[:300]}
    weights = run / "adapter.safetensors"
    if weights.is_file():
        try:
            state["weights"] = {"loads": True, "tensors": len(load_file(str(weights)))}
        except Exception as err:  # noqa: BLE001
            state["weights"] = {"loads": False, "error": f"{type(err).__name__}: {err}"[:300]}
    return state


def training_faults(work: Path, kills: int, epochs: int, reference: bool, seed: int) -> dict:
    rng = random.Random(seed)
    run = work / "run"
    events, problems = [], []
    # one clean epoch first (a checkpoint to resume from), so every kill below interrupts a --resume run
    first = subprocess.run(finetune_cmd(run, epochs, "--stop-after-epochs", "1"), cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=900)
    if first.returncode != 0:
        problems.append(f"first epoch failed: {first.stderr[-300:]}")
    cmd_kind = "resume" if (run / "checkpoint.pt").is_file() else "fresh"
    for i in range(kills):
        extra = {"fresh": (), "resume": ("--resume",), "overwrite": ("--overwrite",)}[cmd_kind]
        proc = subprocess.Popen(finetune_cmd(run, epochs, *extra), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        on_write = i % 2 == 0  # alternate: the moment a checkpoint temp file appears, or a random time
        # this process's own temp file: earlier killed runs leave theirs behind (named by their pid)
        kill = kill_when(proc, deadline_s=rng.uniform(4.0, 25.0) if not on_write else 120.0,
                         watch=run, pattern=f".checkpoint.pt.tmp-{proc.pid}-*", delay_after_seen=rng.uniform(0.0, 0.03))
        stderr = proc.stderr.read() if proc.stderr else ""
        state = inspect_run(run)
        event = {"attempt": i + 1, "command": cmd_kind, "mode": "on checkpoint write" if on_write else "random time",
                 **kill, "after": state}
        if not kill["killed"]:
            event["stderr_tail"] = stderr[-500:]
            if kill.get("exit_code") not in (0, None):
                problems.append(f"attempt {i + 1}: {cmd_kind} run exited {kill.get('exit_code')}: {stderr[-300:]}")
        if state.get("checkpoint", {}).get("loads") is False or state.get("checkpoint", {}).get("complete") is False:
            problems.append(f"attempt {i + 1}: corrupt or incomplete checkpoint.pt after kill: {state['checkpoint']}")
        if state.get("weights", {}).get("loads") is False:
            problems.append(f"attempt {i + 1}: adapter.safetensors unreadable after kill: {state['weights']}")
        events.append(event)
        print(f"  training attempt {i + 1}: {event['mode']}, {cmd_kind}: killed={kill['killed']} at {kill['at_s']} s, "
              f"temp file at kill={kill.get('temp_file_present_at_kill')}, checkpoint={state.get('checkpoint')}", flush=True)
        if not kill["killed"] and kill.get("exit_code") == 0:
            break  # finished before we could kill it
        cmd_kind = "resume" if (run / "checkpoint.pt").is_file() else ("overwrite" if (run / "run.json").is_file() else "fresh")
    # let it finish
    final_kind = "resume" if (run / "checkpoint.pt").is_file() else ("overwrite" if (run / "run.json").is_file() else "fresh")
    extra = {"fresh": (), "resume": ("--resume",), "overwrite": ("--overwrite",)}[final_kind]
    start = time.monotonic()
    done = subprocess.run(finetune_cmd(run, epochs, *extra), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    final = {"command": final_kind, "exit_code": done.returncode, "seconds": round(time.monotonic() - start, 1),
             "stderr_tail": done.stderr[-800:] if done.returncode else ""}
    metrics_file = run / "metrics.json"
    if done.returncode != 0 or not metrics_file.is_file():
        problems.append(f"final {final_kind} run did not complete: exit {done.returncode}: {done.stderr[-400:]}")
    else:
        metrics = json.loads(metrics_file.read_text())
        final["epochs_in_history"] = len(metrics["epochs"]) - 1  # without the zero-shot row
        final["test_top1"] = metrics.get("test", {}).get("top1")
        run_info = json.loads((run / "run.json").read_text())
        final["finished_marker"] = "finished" in run_info.get("extra", {})
        if [r["epoch"] for r in metrics["epochs"]] != list(range(0, epochs + 1)):  # 0: the zero-shot row
            problems.append(f"history after resumes has epochs {[r['epoch'] for r in metrics['epochs']]}, expected 0..{epochs}")
        if reference:
            ref_dir = work / "reference"
            ref = subprocess.run(finetune_cmd(ref_dir, epochs), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
            if ref.returncode == 0:
                ref_metrics = json.loads((ref_dir / "metrics.json").read_text())
                untimed = lambda rows: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]  # noqa: E731
                same = untimed(ref_metrics["epochs"]) == untimed(metrics["epochs"]) and ref_metrics.get("test") == metrics.get("test")
                final["same_as_uninterrupted_run"] = same
                if not same:
                    final["note"] = ("differs from an uninterrupted run of the same seed (a kill during an epoch loses that "
                                     "epoch's partial work; the resumed epoch is redone from the checkpoint's RNG state, "
                                     "so equality is expected)")
                    problems.append("final metrics differ from an uninterrupted run of the same seed")
    final["after"] = inspect_run(run)
    killed_mid_write = sum(1 for e in events if e.get("temp_file_present_at_kill"))
    return {"kills_attempted": kills, "kills": sum(1 for e in events if e["killed"]), "killed_with_temp_file_present": killed_mid_write,
            "epochs": epochs, "events": events, "final": final, "leftover_temp_files": final["after"].get("temp_files", []),
            "problems": problems, "pass": not problems}


# --------------------------------------------------------------------------- export

def export_cmd(out: Path, labels: str) -> list[str]:
    return [PY, "-m", "export", "--model", "orthserve-tiny", "--pretrained", "none", "--labels", labels, "--int8",
            "--out", str(out)]


def check_artifact_dir(path: Path) -> dict:
    """load_artifact's verdict; when it accepts, prove the artifact complete (every graph opens, classes present)."""
    from orthserve.artifact import ArtifactError, load_artifact, ort_session

    try:
        art = load_artifact(path)
    except ArtifactError as err:
        return {"accepted": False, "message": str(err)[:300]}
    except Exception as err:  # noqa: BLE001 - any other exception is a finding
        return {"accepted": False, "unexpected_exception": f"{type(err).__name__}: {err}"[:300]}
    try:
        for component in ("image", "text"):
            for variant in art.variants(component):
                ort_session(art.onnx_path(component, variant), variant)
        complete = art.class_embeddings is not None and art.variants("image") == ["fp32", "int8"]
    except Exception as err:  # noqa: BLE001
        return {"accepted": True, "complete": False, "error": f"{type(err).__name__}: {err}"[:300]}
    return {"accepted": True, "complete": complete, "classnames": art.classnames}


def export_faults(work: Path, kills: int, seed: int) -> dict:
    rng = random.Random(seed + 1)
    out = work / "art"
    events, problems = [], []
    previous = None
    for i in range(kills):
        over_previous = i >= kills // 2  # second half: an earlier artifact is at ART
        if over_previous and previous is None:
            done = subprocess.run(export_cmd(out, "ants,bees"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                problems.append(f"baseline export failed: {done.stderr[-300:]}")
                break
            previous = check_artifact_dir(out)
        if not over_previous and out.exists():
            shutil.rmtree(out)
        proc = subprocess.Popen(export_cmd(out, "wasps,flies,moths"), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        # either the moment the temporary directory appears plus a random delay (mid-build), or a random time
        on_tmp = i % 2 == 0
        kill = kill_when(proc, deadline_s=rng.uniform(3.0, 20.0) if not on_tmp else 300.0, watch=work,
                         pattern=f".{out.name}.tmp-{proc.pid}-*", delay_after_seen=rng.uniform(0.0, 8.0))
        art_state = check_artifact_dir(out) if out.exists() else {"exists": False}
        leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith(f".{out.name}."))
        leftover_states = {name: check_artifact_dir(work / name) for name in leftovers}
        event = {"attempt": i + 1, "over_previous_artifact": over_previous, "mode": "after temp dir appeared" if on_tmp else "random time",
                 **kill, "art": art_state, "leftovers": leftover_states}
        if art_state.get("accepted") and not art_state.get("complete"):
            problems.append(f"attempt {i + 1}: load_artifact accepted an incomplete artifact at ART: {art_state}")
        if over_previous and not art_state.get("accepted"):
            problems.append(f"attempt {i + 1}: the earlier artifact at ART was lost or damaged: {art_state}")
        if over_previous and art_state.get("accepted") and art_state.get("classnames") not in (["ants", "bees"], ["wasps", "flies", "moths"]):
            problems.append(f"attempt {i + 1}: ART holds neither the old nor the new artifact: {art_state}")
        for name, st in leftover_states.items():
            if st.get("unexpected_exception"):
                problems.append(f"attempt {i + 1}: load_artifact raised a non-ArtifactError on {name}: {st['unexpected_exception']}")
            if st.get("accepted") and not st.get("complete"):
                problems.append(f"attempt {i + 1}: load_artifact accepted a half artifact {name}: {st}")
        if art_state.get("unexpected_exception"):
            problems.append(f"attempt {i + 1}: load_artifact raised a non-ArtifactError on ART: {art_state['unexpected_exception']}")
        events.append(event)
        print(f"  export attempt {i + 1}: {event['mode']}{' over previous' if over_previous else ''}: killed={kill['killed']} "
              f"at {kill['at_s']} s; ART accepted={art_state.get('accepted', False)}; leftovers={ {k: v.get('accepted') for k, v in leftover_states.items()} }",
              flush=True)
    start = time.monotonic()
    done = subprocess.run(export_cmd(out, "wasps,flies,moths"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    rerun = {"exit_code": done.returncode, "seconds": round(time.monotonic() - start, 1), "art": check_artifact_dir(out),
             "leftovers": sorted(p.name for p in work.iterdir() if p.name.startswith(f".{out.name}."))}
    if done.returncode != 0 or not rerun["art"].get("complete") or rerun["art"].get("classnames") != ["wasps", "flies", "moths"]:
        problems.append(f"re-run after kills failed: exit {done.returncode}, {rerun['art']}, {done.stderr[-300:]}")
    if rerun["leftovers"]:
        problems.append(f"re-run left directories beside ART: {rerun['leftovers']} (_remove_stale only removes .tmp-*; "
                        "a .old-* one is left when a kill lands between the two renames of _publish)")
    return {"kills_attempted": kills, "kills": sum(1 for e in events if e["killed"]), "events": events, "rerun": rerun,
            "problems": problems, "pass": not problems}


# --------------------------------------------------------------------------- tampered artifacts at service start

def tamperings(art: Path) -> dict:
    def truncate(d: Path) -> None:
        f = d / "image.onnx"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    def flip(d: Path) -> None:
        f = d / "text.onnx"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))

    def missing(d: Path) -> None:
        (d / "image.int8.onnx").unlink()

    def bad_manifest(d: Path) -> None:
        (d / "manifest.json").write_text((d / "manifest.json").read_text()[:-20])

    return {"truncated image.onnx": truncate, "one byte flipped in text.onnx": flip,
            "image.int8.onnx missing": missing, "manifest.json cut short": bad_manifest}


def startup_code_refuses(path: Path) -> dict:
    """The service's own startup path: ORTHSERVE_MODEL -> service.runtime.open_artifact (what Classifier calls)."""
    code = ("import os, sys; sys.path.insert(0, os.getcwd())\n"
            "from orthserve.artifact import ArtifactError\n"
            "from service.runtime import open_artifact, ImageModel\n"
            "try:\n    ImageModel(open_artifact())\nexcept ArtifactError as err:\n    print('REFUSED:', err); sys.exit(3)\n"
            "print('ACCEPTED')\n")
    done = subprocess.run([PY, "-c", code], cwd=REPO, env={**ENV, "ORTHSERVE_MODEL": str(path)}, capture_output=True,
                          text=True, timeout=300)
    return {"exit_code": done.returncode, "refused": done.returncode == 3 and "REFUSED" in done.stdout,
            "message": (done.stdout.strip() or done.stderr.strip()[-400:])[:400]}


def serve_refuses(path: Path, work: Path, wait_s: float) -> dict:
    """`bentoml serve` with ORTHSERVE_MODEL=path: never ready; exit (or not) within wait_s; the reason in its log."""
    import httpx

    log_path = work / f"serve-{path.name}.log"
    proc, server = launch(path, log_path, {**ENV, "BENTOML_HOME": str(work / "bentoml_home")})
    ready, start = False, time.monotonic()
    try:
        while time.monotonic() - start < wait_s and proc.poll() is None:
            try:
                ready = ready or httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    finally:
        exited = proc.poll() is not None
        if not exited:
            stop(proc, timeout=20)
    text = log_path.read_text(errors="replace")
    lines = text.splitlines()
    reason = (next((line.strip() for line in lines if "ArtifactError:" in line), None)  # the exception's message
              or next((line.strip() for line in lines if "ArtifactError" in line or "sha256" in line
                       or "not valid JSON" in line or "missing" in line), None))
    return {"ever_ready": ready, "exited_by_itself": exited, "exit_code": proc.returncode if exited else None,
            "seconds": round(time.monotonic() - start, 1), "reason_in_log": reason[:400] if reason else None,
            "log_tail": text[-600:]}


def tamper_faults(work: Path, serve_cases: int, serve_wait: float) -> dict:
    art = work / "good"
    done = subprocess.run(export_cmd(art, "ants,bees"), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"problems": [f"export failed: {done.stderr[-300:]}"], "pass": False}
    results, problems = [], []
    control = startup_code_refuses(art)
    if control["refused"] or control["exit_code"] != 0:
        problems.append(f"the untouched artifact was not accepted by the startup code: {control}")
    for i, (name, damage) in enumerate(tamperings(art).items()):
        copy = work / f"tampered-{i}"
        shutil.copytree(art, copy)
        damage(copy)
        row = {"tampering": name, "startup_code": startup_code_refuses(copy)}
        if not row["startup_code"]["refused"]:
            problems.append(f"{name}: service startup code did not refuse it: {row['startup_code']}")
        if i < serve_cases:
            row["bentoml_serve"] = serve_refuses(copy, work, serve_wait)
            s = row["bentoml_serve"]
            if s["ever_ready"]:
                problems.append(f"{name}: bentoml serve became ready on a tampered artifact")
            if not s["exited_by_itself"] or s["exit_code"] == 0:
                problems.append(f"{name}: bentoml serve did not exit with an error by itself")
            if not s["reason_in_log"]:
                problems.append(f"{name}: bentoml serve log does not say why it failed")
        results.append(row)
        print(f"  tamper {name!r}: startup refused={row['startup_code']['refused']} ({row['startup_code']['message'][:120]})"
              + (f"; serve ready={row['bentoml_serve']['ever_ready']} exited={row['bentoml_serve']['exited_by_itself']} "
                 f"reason={row['bentoml_serve']['reason_in_log']!r:.120}" if "bentoml_serve" in row else ""), flush=True)
    return {"control_untouched_accepted": control, "cases": results, "problems": problems, "pass": not problems}


# --------------------------------------------------------------------------- report

def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "faults.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Fault injection: kill -9 during checkpoint writes and export; tampered artifacts at service start", ""]
    if any(p.get("scale") == "smoke" for p in report["parts"].values()):
        lines += ["**SMOKE SCALE** where marked: fewer kills than the full run (`nice -n 5 .venv/bin/python bench/faults.py`), "
                  "on a shared busy 2-core machine.", ""]
    if t := report["parts"].get("training"):
        f = t["final"]
        lines += [f"## Training ({t['scale']}): {t['kills']} kills of {t['kills_attempted']} attempts, "
                  f"{t['killed_with_temp_file_present']} with a temporary checkpoint file present (mid-write) — "
                  f"{'PASS' if t['pass'] else 'FAIL'}", "",
                  "| # | command | kill mode | killed at s | temp file present | checkpoint after (loads / complete / epoch) | weights load |",
                  "|---|---|---|---|---|---|---|"]
        for e in t["events"]:
            c, w = e["after"].get("checkpoint"), e["after"].get("weights")
            lines.append(f"| {e['attempt']} | {e['command']} | {e['mode']} | {e['at_s']}{'' if e['killed'] else ' (not killed: exit ' + str(e.get('exit_code')) + ')'} | "
                         f"{e.get('temp_file_present_at_kill', '-')} | "
                         f"{'none' if not c else str(c.get('loads')) + ' / ' + str(c.get('complete')) + ' / ' + str(c.get('epoch'))} | "
                         f"{'none' if not w else w.get('loads')} |")
        lines += ["", f"Final `{f['command']}` run: exit {f['exit_code']}, {f.get('epochs_in_history')} of {t['epochs']} epochs in "
                  f"the history, test top-1 {f.get('test_top1')}"
                  + (f", same as an uninterrupted run: {f['same_as_uninterrupted_run']}" if "same_as_uninterrupted_run" in f else "")
                  + f". Leftover temporary files: {t['leftover_temp_files'] or 'none'}.", ""]
        lines += [f"- problem: {p}" for p in t["problems"]] + ([""] if t["problems"] else [])
    if x := report["parts"].get("export"):
        lines += [f"## Export ({x['scale']}): {x['kills']} kills — {'PASS' if x['pass'] else 'FAIL'}", "",
                  "| # | over earlier artifact | kill mode | killed at s | ART after kill | left beside ART (load_artifact verdict) |",
                  "|---|---|---|---|---|---|"]
        for e in x["events"]:
            art = e["art"]
            art_s = ("absent" if art.get("exists") is False else
                     ("accepted, complete " + str(art.get("classnames")) if art.get("accepted") else "refused: " + art.get("message", "")[:60]))
            left = "; ".join(f"{k}: {'accepted' if v.get('accepted') else 'refused'}" for k, v in e["leftovers"].items()) or "nothing"
            lines.append(f"| {e['attempt']} | {e['over_previous_artifact']} | {e['mode']} | {e['at_s']}"
                         f"{'' if e['killed'] else ' (finished first)'} | {art_s} | {left} |")
        r = x["rerun"]
        lines += ["", f"Re-run: exit {r['exit_code']} in {r['seconds']} s; artifact accepted and complete: "
                  f"{r['art'].get('accepted')} / {r['art'].get('complete')}; left beside ART: {r['leftovers'] or 'nothing'}.", ""]
        lines += [f"- problem: {p}" for p in x["problems"]] + ([""] if x["problems"] else [])
    if m := report["parts"].get("tamper"):
        lines += [f"## Tampered artifacts at service start ({m['scale']}) — {'PASS' if m['pass'] else 'FAIL'}", "",
                  "| tampering | startup code refuses | its message | `bentoml serve`: ever ready / exited by itself / reason in log |",
                  "|---|---|---|---|"]
        for row in m.get("cases", []):
            s = row.get("bentoml_serve")
            serve_s = (f"{s['ever_ready']} / {s['exited_by_itself']} (exit {s['exit_code']}, {s['seconds']} s) / "
                       f"`{(s['reason_in_log'] or 'NONE')[:150]}`" if s else "not run")
            msg = row["startup_code"]["message"].replace("|", "\\|")[:200]
            lines.append(f"| {row['tampering']} | {row['startup_code']['refused']} | `{msg}` | {serve_s} |")
        lines += [""] + [f"- problem: {p}" for p in m.get("problems", [])]
    lines += ["", f"{report['created']}; {report['machine']}."]
    (out_dir / "faults.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["training", "export", "tamper"], choices=["training", "export", "tamper"])
    parser.add_argument("--training-kills", type=int, default=None, help="default 8 (--smoke 3)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 12, --smoke 6)")
    parser.add_argument("--export-kills", type=int, default=None, help="default 8 (--smoke 3)")
    parser.add_argument("--serve-cases", type=int, default=None, help="tamperings also tried with bentoml serve (default all, --smoke 1)")
    parser.add_argument("--serve-wait", type=float, default=90.0, help="seconds to watch a refused bentoml serve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    smoke = args.smoke
    scale = "smoke" if smoke else "full"
    path = args.out / "faults.json"
    report = json.loads(path.read_text()) if path.is_file() else {"parts": {}}
    ok = True
    with tempfile.TemporaryDirectory(prefix="orthserve-faults-") as tmp:
        work = Path(tmp)
        if "training" in args.parts:
            print("training: kill -9 during checkpoint writes", flush=True)
            (work / "training").mkdir()
            res = training_faults(work / "training", args.training_kills or (3 if smoke else 8), args.epochs or (6 if smoke else 12),
                                  reference=not smoke, seed=args.seed)
            report["parts"]["training"] = {"scale": scale, **res}
            ok &= res["pass"]
        if "export" in args.parts:
            print("export: kill -9 during export", flush=True)
            (work / "export").mkdir()
            res = export_faults(work / "export", args.export_kills or (3 if smoke else 8), args.seed)
            report["parts"]["export"] = {"scale": scale, **res}
            ok &= res["pass"]
        if "tamper" in args.parts:
            print("tamper: damaged artifacts at service start", flush=True)
            (work / "tamper").mkdir()
            serve_cases = args.serve_cases if args.serve_cases is not None else (1 if smoke else 4)
            res = tamper_faults(work / "tamper", serve_cases, args.serve_wait)
            report["parts"]["tamper"] = {"scale": scale, **res}
            ok &= res["pass"]
    report.update(created=time.strftime("%Y-%m-%dT%H:%M:%S"), machine=f"{platform.platform()}, {os.cpu_count()} CPUs",
                  command=" ".join(sys.argv))
    write_report(report, args.out)
    for name, part in report["parts"].items():
        print(f"{'PASS' if part['pass'] else 'FAIL'}: {name} ({part['scale']})" + "".join(f"\n  - {p}" for p in part["problems"]))
    print(f"wrote {path} and .md")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
