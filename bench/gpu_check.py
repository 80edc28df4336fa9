"""Every GPU figure the project needs, in one run of a few minutes (run by bench/gpu_check.sh).

    bash bench/gpu_check.sh                      # a CUDA machine: writes bench/results/gpu_check.{md,json} and gpu_*.md
    bash bench/gpu_check.sh --smoke --out DIR    # toy scale on any machine (the tests run this on the CPU)

Sections, each timed and isolated (one that fails is recorded and the rest still run; one that would not fit
the time budget is skipped and says so):
  environment    GPU, driver, torch, CUDA, the packages found
  cayley         bench/cayley.py: exact Cayley candidates on ViT-B-16's rotation groups (time, kernels, orthogonality)
  steps          bench/train_step.py side by side: LoRA and the orthogonal adapter, cross-entropy, batch 32 and 128,
                 eager and compiled, the code before the batched transform (``@4896f2c``), FLOPs and the fraction
                 of the bf16 matmul rate; then LoRA and OrthCR under the OrthCR objective
  data           the training loader alone (decode, augment, collate, pinned) at 224 px: images/s with the CLI's
                 default workers, to set beside the steps' images/s (is the GPU fed?)
  training       ``python -m training.finetune`` for every method on the device (orthserve-tiny, --data), one
                 OrthCR run with ``--compile``; the orthogonality error each run ends with
  export         ``python -m export`` of the device-trained OrthCR run; its parity report
  inference      bench/gpu_inference.py (torch paths, onnxruntime CUDA / TensorRT and the service's runtime
                 where this onnxruntime has the CUDA provider)
Nothing is downloaded: open_clip and friends come as wheels (bench/gpu_check.sh installs them), data with --data.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TRAIN_METHODS = ("zeroshot", "taskres", "lora", "aoft", "orthcr", "orthcr+taskres", "full")


class Check:
    """Runs the sections in order within a time budget; collects their results and their logs."""

    def __init__(self, budget_s: float, out: Path) -> None:
        self.start, self.budget_s, self.out = time.time(), budget_s, out
        self.sections: dict[str, dict] = {}

    def left(self) -> float:
        return self.budget_s - (time.time() - self.start)

    def run(self, name: str, needs_s: float, body) -> None:
        if self.left() < needs_s:
            self.sections[name] = {"status": "skipped", "why": f"{self.left():.0f} s of the budget left, needs ~{needs_s:.0f} s"}
            print(f"=== {name}: skipped (budget)", flush=True)
            return
        print(f"=== {name} ({self.left():.0f} s of the budget left)", flush=True)
        started = time.time()
        try:
            self.sections[name] = {"status": "ok", **(body() or {})}
        except Exception as err:  # noqa: BLE001 - one failing section must not hide the others
            self.sections[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000],
                                   "traceback": traceback.format_exc()[-4000:]}
            print(traceback.format_exc(), flush=True)
        self.sections[name]["seconds"] = round(time.time() - started, 1)
        print(f"    {name}: {self.sections[name]['status']} in {self.sections[name]['seconds']} s", flush=True)


def environment(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": device, "cpus": os.cpu_count()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    for module in ("open_clip", "onnx", "onnxscript", "onnxruntime", "timm", "transformers"):
        try:
            mod = __import__(module)
            info[module] = getattr(mod, "__version__", "?")
        except ImportError:
            info[module] = None
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    return info


def cayley_section(device: str, smoke: bool, out: Path) -> dict:
    import cayley

    argv = ["--devices", device, "--out", str(out)] + (["--smoke"] if smoke else ["--rounds", "5", "--spectral", "1", "10"])
    report = cayley.main(argv)
    return {"runs": report["runs"], "markdown": cayley.markdown(report)}


def steps_section(device: str, smoke: bool, compiled: bool) -> dict:
    """Side-by-side step times; each group built, timed and freed before the next (GPU memory).

    ``compiled``: only the ``:compiled`` variants beside their eager twins (this section runs last: compiling
    ViT-B-16 takes the longest, and the other sections should not wait for it)."""
    import gc

    import torch

    import train_step

    model, batches, rounds = ("orthserve-tiny", [4], 2) if smoke else ("ViT-B-16", [32, 128], 5)
    if compiled:
        groups = [(batch, ["lora", "orthcr-ce", "lora:compiled", "orthcr-ce:compiled"]) for batch in batches]
    else:
        groups = [(batches[0], ["lora", "orthcr-ce", "orthcr-ce@4896f2c"]), *((b, ["lora", "orthcr-ce"]) for b in batches[1:]),
                  (batches[0], ["lora-orthcr", "orthcr", "orthcr@4896f2c"])]
    runs = []
    for batch, methods in groups:
        args = argparse.Namespace(model=model, batch_size=batch, classes=10, cutout="random", device=device, flops=True)
        print(f"  batch {batch}: {', '.join(methods)}", flush=True)
        run = train_step.interleaved(methods, rounds, args)
        run["batch_size"] = batch
        runs.append(run)
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"model": model, "runs": runs}


def data_section(data: Path, smoke: bool, device: str) -> dict:
    """Images/s of the training DataLoader as the CLI builds it (ViT-B-16's 224 px preprocessing), no model."""
    import torch
    from torch.utils.data import DataLoader

    from orthserve.preprocess import PreprocessSpec
    from training.data import EpochSampler, TrainImages, load_labelled
    from training.finetune import default_workers

    dataset = load_labelled(str(data), None, "all")
    clip = PreprocessSpec(image_size=224, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    images = TrainImages(dataset, clip, seed=0)
    results = {}
    for workers in sorted({0, default_workers()}):
        sampler = EpochSampler(len(images), 0)
        loader = DataLoader(images, batch_size=32, sampler=sampler, num_workers=workers, pin_memory=device != "cpu",
                            persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
        for _ in loader:  # first epoch: worker start-up, not timed
            break
        seen, start = 0, time.perf_counter()
        for epoch in range(1 if smoke else 2):
            sampler.set_epoch(epoch + 1)
            for batch, _ in loader:
                seen += len(batch)
        results[str(workers)] = {"images": seen, "images_per_s": round(seen / (time.perf_counter() - start), 1)}
        del loader
    return {"dataset": str(data), "image_size": 224, "default_workers": default_workers(), "by_workers": results}


def cli(args: list[str], log: list[str], timeout: float) -> subprocess.CompletedProcess:
    started = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    log.append(f"$ python {' '.join(args)}  # rc {proc.returncode}, {time.time() - started:.0f} s\n"
               + "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                           if "INFO" in line or "rror" in line or "arning" in line)[-3000:])
    if proc.returncode:
        raise RuntimeError(f"python {' '.join(args[:3])} ... failed (rc {proc.returncode}): {proc.stderr[-1500:]}")
    return proc


def training_section(device: str, data: Path, runs: Path, log: list[str], smoke: bool, compiled: bool) -> dict:
    """``training.finetune.main`` for every method (smoke: LoRA and OrthCR, the plumbing), in this process (a
    process each would spend most of the time starting), plus OrthCR with ``--compile`` unless --no-compile."""
    import logging

    from training import finetune

    if not data.is_dir():
        raise FileNotFoundError(f"no training data at {data}: pass --data (an ImageFolder, e.g. flowers5)")
    common = ["--model", "orthserve-tiny", "--pretrained", "none", "--data", str(data), "--shots", "4",
              "--epochs", "2", "--device", device, "--progress", "off", "--overwrite", "--workers", "2"]
    methods = ["lora", "orthcr"] if smoke else list(TRAIN_METHODS)
    results = {}
    for method in methods + (["orthcr:compiled"] if compiled else []):
        name = method.replace("+", "_").replace(":", "_")
        extra = ["--compile"] if method.endswith(":compiled") else []
        started = time.time()
        try:
            metrics = finetune.main([*common, "--method", method.removesuffix(":compiled"), "--out", str(runs / name), *extra])
        except Exception as err:  # noqa: BLE001 - one method failing is a result, the others still run
            results[method] = {"error": f"{type(err).__name__}: {err}"[:500]}
            logging.getLogger("gpu_check").exception("finetune %s failed", method)
            continue
        last = (metrics["epochs"] or [{}])[-1]
        results[method] = {"test_top1": metrics.get("test", {}).get("top1"), "train_loss": last.get("train_loss"),
                           "orthogonality_error": last.get("orthogonality_error"),
                           "seconds": round(time.time() - started, 1)}
        log.append(f"finetune {method}: {results[method]}")
    failed = [m for m, r in results.items() if "error" in r]
    if failed:
        raise RuntimeError(f"finetune failed for {', '.join(failed)}: {[results[m]['error'] for m in failed]}")
    return {"runs": results}


def export_section(runs: Path, out_dir: Path, log: list[str], timeout: float) -> dict:
    artifact = out_dir / "artifact"
    cli(["-m", "export", "--run", str(runs / "orthcr"), "--out", str(artifact), "--fp16"], log, timeout)
    parity = json.loads((artifact / "parity.json").read_text())
    return {"parity": parity}


def inference_section(smoke: bool, device: str, out: Path, log: list[str], timeout: float) -> dict:
    args = ["bench/gpu_inference.py", "--out", str(out), "--device", device]
    args += ["--smoke"] if smoke else ["--seconds", "0.5", "--rounds", "3"]
    cli(args, log, timeout)
    return {"result": json.loads((out / "gpu_inference.json").read_text())}


def markdown(report: dict) -> str:
    env, sections = report["environment"], report["sections"]
    lines = [f"# GPU check ({'SMOKE SCALE on ' + env['device'] if report['smoke'] else env.get('gpu', env['device'])})", "",
             f"`{report['command']}` on {report['created']}, {report['seconds']:.0f} s of a {report['budget_s']:.0f} s "
             f"budget. torch {env['torch']} (CUDA {env['cuda']}), open_clip {env.get('open_clip')}, onnxruntime "
             f"{env.get('onnxruntime')} {env.get('onnxruntime_providers', '')}.", ""]
    if report["smoke"]:
        lines += ["**Smoke scale**: toy shapes on this machine to check the script; no figure here is a GPU figure.", ""]
    lines += ["| section | status | seconds | note |", "|---|---|---:|---|"]
    for name, sec in sections.items():
        note = sec.get("why") or sec.get("error", "")
        lines.append(f"| {name} | {sec['status']} | {sec.get('seconds', '-')} | {note[:200]} |")
    lines.append("")
    for key in ("steps", "steps_compiled"):
        steps = sections.get(key, {})
        if steps.get("status") != "ok":
            continue
        lines += [f"## Training steps{', compiled' if key == 'steps_compiled' else ''} ({steps['model']}, side by "
                  "side in one process, groups separated by a rule)", "",
                  "fraction = FLOPs per step (FlopCounterMode, one real step) / median step seconds / matmul rate "
                  "(bf16 on a GPU, fp32 on a CPU).", "",
                  "| batch | method | s / step | x first of its group | GFLOP / step | fraction of matmul rate |",
                  "|---:|---|---:|---:|---:|---:|"]
        for i, run in enumerate(steps["runs"]):
            if i:
                lines.append("| | | | | | |")
            for m in run["methods"]:
                lines.append(f"| {run['batch_size']} | {m} | {run['step_s_median'][m]:.4f} | {run['ratio_to_first'][m]:.2f} | "
                             f"{run['flops']['per_step'][m] / 1e9:,.1f} | {run['flops']['fraction_of_matmul_rate'][m]:.1%} |")
        lines.append("")
    cay = sections.get("cayley", {})
    if cay.get("status") == "ok":
        lines += [cay["markdown"].replace("# Exact", "## Exact"), ""]
    data = sections.get("data", {})
    if data.get("status") == "ok":
        lines += [f"## Data loading ({data['dataset']}, {data['image_size']} px, decode + augment + collate)", "",
                  "| workers | images / s |", "|---:|---:|"]
        lines += [f"| {w} | {row['images_per_s']:,.0f} |" for w, row in data["by_workers"].items()]
        lines += ["", f"The CLI's default here: {data['default_workers']} workers. Compare with the steps' images/s "
                  "(batch / s per step) above.", ""]
    training = sections.get("training", {})
    if training.get("status") == "ok":
        lines += ["## Training CLI on the device (orthserve-tiny, 4 shots, 2 epochs)", "",
                  "| method | test top-1 | last train loss | orthogonality error |", "|---|---:|---:|---:|"]
        for method, row in training["runs"].items():
            orth = "-" if row["orthogonality_error"] is None else f"{row['orthogonality_error']:.1e}"
            loss = "-" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
            top1 = "-" if row["test_top1"] is None else f"{row['test_top1']:.3f}"
            lines.append(f"| {method} | {top1} | {loss} | {orth} |")
        lines.append("")
    exported = sections.get("export", {})
    if exported.get("status") == "ok":
        lines += ["## Export of the device-trained OrthCR run", "", "```json",
                  json.dumps(exported["parity"], indent=1)[:3000], "```", ""]
    inference = sections.get("inference", {})
    if inference.get("status") == "ok":
        lines += ["## Inference: see gpu_inference.md beside this file", ""]
    return "\n".join(lines)


def keep_files(work: Path, out: Path, prefix: str) -> None:
    """Copy the sections' own result files out of the temporary folder, as ``<prefix>_<name>``."""
    for path in [*(work / "cayley").glob("cayley_*"), *(work / "inference").glob("gpu_inference.*")]:
        if path.is_file():
            (out / f"{prefix}_{path.name}").write_bytes(path.read_bytes())


def write_report(args, argv, check: Check, env: dict, log: list[str], prefix: str) -> dict:
    report = {"command": "bash bench/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "smoke": args.smoke, "budget_s": check.budget_s,
              "seconds": time.time() - check.start, "environment": env, "sections": check.sections, "log": log}
    (args.out / f"{prefix}.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / f"{prefix}.md").write_text(markdown(report))
    return report


def default_data() -> Path:
    """flowers5 from ../shared/data, or the copy `make gpu-data` puts in .gpu_data/ to carry to a GPU machine."""
    shared = REPO.parent / "shared" / "data" / "flowers5"
    return shared if shared.is_dir() else REPO / ".gpu_data" / "flowers5"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy scale on any device (CPU if there is no GPU)")
    p.add_argument("--device", default=None, help="default: cuda where there is one, else cpu")
    p.add_argument("--data", type=Path, default=default_data(),
                   help="ImageFolder for the training CLI and data sections (default ../shared/data/flowers5, "
                        "else .gpu_data/flowers5)")
    p.add_argument("--budget", type=float, default=None, help="seconds in all (default 450; --smoke 600)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled step variants")
    p.add_argument("--sections", nargs="+",
                   default=["cayley", "steps", "data", "training", "export", "inference", "steps_compiled"])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="writes gpu_check.{json,md} here")
    args = p.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.smoke and not device.startswith("cuda"):
        p.error("no CUDA device: run with --smoke for the CPU plumbing check")
    prefix = "gpu_check_smoke" if args.smoke else "gpu_check"
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.budget or (600 if args.smoke else 450), args.out)
    log: list[str] = []
    env = environment(device)
    print(json.dumps(env), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        # rough costs on an H200 (start-up and compiles included), used only to skip what cannot fit
        plan = {"cayley": (lambda: cayley_section(device, args.smoke, work / "cayley"), 30),
                "steps": (lambda: steps_section(device, args.smoke, compiled=False), 60),
                "steps_compiled": (lambda: steps_section(device, args.smoke, compiled=True), 240),
                "data": (lambda: data_section(args.data, args.smoke, device), 20),
                "training": (lambda: training_section(device, args.data, work / "runs", log, args.smoke, args.compile), 90),
                "export": (lambda: export_section(work / "runs", work, log, max(30, check.left())), 40),
                "inference": (lambda: inference_section(args.smoke, device, work / "inference", log,
                                                        max(30, check.left())), 60)}
        report = write_report(args, argv, check, env, log, prefix)
        for name in args.sections:
            if name == "steps_compiled" and not args.compile:
                continue
            body, needs = plan[name]
            if name == "export" and check.sections.get("training", {}).get("status") != "ok":
                check.sections[name] = {"status": "skipped", "why": "no device-trained run (training section)"}
                continue
            check.run(name, 5 if args.smoke else needs, body)
            keep_files(work, args.out, prefix)
            report = write_report(args, argv, check, env, log, prefix)  # after every section: a run cut short keeps it
        report = write_report(args, argv, check, env, log, prefix)
    print(markdown(report), flush=True)
    return report


if __name__ == "__main__":
    main()
