"""Seconds per training step and peak memory for each method, on the real training code.

    python bench/train_step.py                      # ViT-B-16, random weights, batch 32, 224 px, CPU (+ GPU if any)
    python bench/train_step.py --methods lora orthcr --steps 3 --warmup 2
    python bench/train_step.py --interleave lora orthcr-ce --interleave lora-orthcr orthcr   # ratios, side by side
    python bench/train_step.py --interleave orthcr-ce@4896f2c orthcr-ce lora --flops   # against the code before
    python bench/train_step.py --devices cuda --interleave lora orthcr-ce lora:compiled orthcr-ce:compiled --flops

Each (method, device) runs in its own process so peak memory is that method's alone
(CPU: peak resident set size of the process, including the model; GPU: peak
``torch.cuda.max_memory_allocated``).  A step is ``training.finetune.train_step``:
forward under autocast (GPU bf16), the method's objective, backward, AdamW, schedule.
Inputs are random pixels: timing does not depend on image content.  ``orthcr-ce`` is the
orthogonal adapter trained with plain cross-entropy, to separate the adapter's cost
from the OrthCR objective's (which adapts two views per image and runs the frozen
model on both); ``lora-orthcr`` is LoRA under that same objective.  Ratios compare each
method with LoRA under the same objective.

Variants: ``METHOD:compiled`` runs the step's forward and loss through ``torch.compile`` (as ``--compile``
does); ``orthcr-ce@4896f2c`` / ``orthcr@4896f2c`` rebuild the orthogonal adapter's arithmetic as it was before
the batched Cayley transform (one ``torch.linalg.solve`` per layer, per-step hooks, a host read of the loss
each step), so that the change can be timed side by side in one process.

``--flops`` adds the model FLOPs of a step and the fraction of the device's dense matmul rate it reaches:

    fraction = FLOPs of one step / median step seconds / matmul rate

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one real step (forward and backward of
every pass the objective runs, frozen passes and Cayley transforms included: matmuls, convolutions and
attention, i.e. the work the step really does, not 6 x parameters x tokens); the matmul rate is torch's
n x n matmul on the same device in the step's precision (bf16 on a GPU, fp32 on a CPU), best of a few.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("taskres", "lora", "lora-orthcr", "aoft", "orthcr-ce", "orthcr", "orthcr-bs32", "orthcr-bs16",
           "orthcr+taskres", "full")
# (CLI method, objective) where the benchmark's name says more than the method
VARIANTS = {"orthcr-ce": ("orthcr", "ce"), "lora-orthcr": ("lora", "orthcr"),
            "orthcr-bs32": ("orthcr", "orthcr"), "orthcr-bs16": ("orthcr", "orthcr")}
# extra training CLI flags of a variant: block sides as bench/common.py's transfer variants use them
EXTRA_FLAGS = {"orthcr-bs32": ["--block-size", "32"], "orthcr-bs16": ["--block-size", "16"]}
BEFORE = "@4896f2c"  # the orthogonal adapter as it was before the batched Cayley transform


def method_and_objective(method: str) -> tuple[str, str]:
    method = method.removesuffix(":compiled").removesuffix(BEFORE)
    return VARIANTS.get(method, (method, "orthcr" if method.startswith("orthcr") else "ce"))


def variant(text: str) -> str:
    """argparse type: a method, optionally ``:compiled``, or an orthcr method ``@4896f2c``."""
    base = text.removesuffix(":compiled")
    if base.endswith(BEFORE) and base.removesuffix(BEFORE) in ("orthcr", "orthcr-ce"):
        return text
    if base not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}: one of {', '.join(METHODS)}, with ':compiled' "
                                         f"or (orthcr, orthcr-ce) '{BEFORE}'")
    return text


def rotation_as_before(rotation):
    """Give one BlockRotation the arithmetic of commit 4896f2c: a ``linalg.solve`` per layer for R, and the
    weight-side layers solving with W as right-hand side (today's CPU path, now on every device: the LU
    kernel). Differences left: today's weight-side solve skips the error check (no sync); the step's per-step
    loss read adds the syncs the old loop had."""
    import torch

    def rotation_blocks():
        with torch.autocast(rotation.generator.device.type, enabled=False):
            q = rotation.skew_generator()
            eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
            return torch.linalg.solve(eye - q, eye + q)

    rotation.kernel = "lu"
    rotation.rotation_blocks = rotation_blocks


def build_step(method: str, args):
    """``(step, trainable parameter count, image size)``: ``step()`` runs one real training step, returns seconds.

    The step runs as the training loop runs it: inside ``orthserve.fast_rotations`` (entered once, here)."""
    import contextlib

    import torch

    import orthserve
    from orthserve.adapters import BlockRotation
    from training import finetune
    from training.objective import CrossEntropyObjective, OrthCRConfig, OrthCRObjective

    device = torch.device(args.device)
    name, objective_name = method_and_objective(method)
    options = finetune.parse_args(["--data", "-", "--out", "-", "--model", args.model, "--pretrained", "none",
                                   "--method", name, "--objective", objective_name, "--batch-size", str(args.batch_size),
                                   *EXTRA_FLAGS.get(method.removesuffix(":compiled"), [])])
    classes = [f"class {i}" for i in range(args.classes)]
    classifier, _, _ = finetune.build_classifier(options, classes, device)
    params = finetune.trainable_parameters(classifier)
    autocast, fp16 = finetune.autocast_for(device, "auto")
    generator = torch.Generator(device=device).manual_seed(0)
    objective = (OrthCRObjective(classifier, OrthCRConfig(cutout=args.cutout), generator)
                 if objective_name == "orthcr" else CrossEntropyObjective())
    before = BEFORE in method
    if method.endswith(":compiled"):
        objective = finetune.compile_objective(objective)
    if before:
        for module in classifier.modules():
            if isinstance(module, BlockRotation):
                rotation_as_before(module)
        context = contextlib.nullcontext()
    else:
        context = orthserve.fast_rotations(classifier)
    stack = contextlib.ExitStack()
    stack.enter_context(context)
    optimizer = finetune.make_optimizer([{"params": list(params.values()), "lr": options.lr}], options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    size = finetune.PreprocessSpec.from_model(classifier.model).image_size
    images = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.randint(0, len(classes), (args.batch_size,), generator=torch.Generator().manual_seed(2)).to(device)

    def one_step():
        if before:  # as the loop was: hooks registered each step, the loss read each step
            with orthserve.rotate_inputs(classifier):
                loss, correct, parts = finetune.train_step(classifier, objective, optimizer, scheduler, scaler,
                                                           images, labels, autocast, 1.0)
            return float(loss), int(correct), {k: float(v) for k, v in parts.items()}
        return finetune.train_step(classifier, objective, optimizer, scheduler, scaler, images, labels, autocast, 1.0)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step.count_flops = lambda: count_flops(one_step)  # type: ignore[attr-defined]
    step.keep = stack  # type: ignore[attr-defined]  # the hooks live as long as the step
    return step, sum(p.numel() for p in params.values()), size


def count_flops(one_step) -> float:
    """FLOPs of one real step (forward, backward, every pass), as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        one_step()
    return float(counter.get_total_flops())


def matmul_rate(device: str, dtype_name: str, n: int) -> float:
    """Best FLOP/s of an n x n matmul on the device (bench/inference.py's measurement)."""
    import torch
    from inference import matmul_rate as measure_rate

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    return measure_rate(n, 6, device, dtype)["gflops_best"] * 1e9


def measure(method: str, args) -> dict:
    """One method on one device, in this process."""
    import torch

    device = torch.device(args.device)
    step, n_params, size = build_step(method, args)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(args.steps)]
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"method": method, "objective": method_and_objective(method)[1], "device": device.type, "image_size": size,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "trainable_params": n_params,
            "step_s_median": sorted(times)[len(times) // 2], "step_s_mean": sum(times) / len(times),
            "step_s_all": times, "peak_memory_mib": peak / 2**20,
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS"}


def interleaved(methods: list[str], rounds: int, args) -> dict:
    """The methods built side by side in one process, one step each per round, the order reversed every
    other round, so that a shared machine's drift (which moves separate runs by 30% here) hits all alike."""
    steps = {m: build_step(m, args)[0] for m in methods}
    for m in methods:  # warm-up
        steps[m]()
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        for m in (methods if r % 2 == 0 else methods[::-1]):
            times[m].append(steps[m]())
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in methods), flush=True)
    median = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
    result = {"methods": methods, "rounds": rounds, "step_s_all": times, "step_s_median": median,
              "ratio_to_first": {m: median[m] / median[methods[0]] for m in methods}}
    if args.flops:
        dtype = "bf16" if args.device.startswith("cuda") else "fp32"
        rate = matmul_rate(args.device, dtype, 8192 if args.device.startswith("cuda") else 2048)
        # a compiled step runs inductor kernels that FlopCounterMode does not see: its eager twin's count
        flops = {m: steps[m].count_flops() for m in methods if not m.endswith(":compiled")}
        flops.update({m: flops.get(m.removesuffix(":compiled")) or steps[m].count_flops()
                      for m in methods if m.endswith(":compiled")})
        result["flops"] = {"matmul_rate_flops": rate, "matmul_dtype": dtype, "per_step": flops,
                           "achieved_flops": {m: flops[m] / median[m] for m in methods},
                           "fraction_of_matmul_rate": {m: flops[m] / median[m] / rate for m in methods}}
    return result


def markdown(report: dict) -> str:
    lines = [f"# Training step benchmark: {report['model']}, random weights, batch {report['batch_size']}, "
             f"{report['image_size']} px, {report['classes']} classes", "",
             (f"{report['warmup']} warm-up + {report['steps']} timed steps per method, each method in its own process; "
              if report["results"] else "Side-by-side runs only; ")
             + f"Cutout: {report['cutout']}. Host: {report['host']}. Generated by `python bench/train_step.py`.", ""]
    for device, rows in report["results"].items():
        lora = {r["objective"]: r for r in rows if r["method"] in ("lora", "lora-orthcr")}
        lines += [f"## {device} ({rows[0]['device_name']}, {rows[0]['threads']} threads)", "",
                  "| method | objective | trainable params | s / step (median) | x LoRA, same objective | "
                  "peak memory (MiB) |", "|---|---|---:|---:|---:|---:|"]
        for r in rows:
            same = lora.get(r["objective"])
            ratio = f"{r['step_s_median'] / same['step_s_median']:.2f}" if same else "-"
            lines.append(f"| {r['method']} | {r['objective']} | {r['trainable_params']:,} | {r['step_s_median']:.3f} "
                         f"| {ratio} | {r['peak_memory_mib']:.0f} |")
        lines.append("")
    lines += ["Peak memory: CPU rows are the process's peak resident set size (model, activations, optimizer); "
              "GPU rows are torch's peak allocated device memory.", ""]
    for run in report.get("interleaved", []):
        first = run["methods"][0]
        lines += [f"## Side by side in one process ({report['interleave_device']}): {', '.join(run['methods'])}, "
                  f"{run['rounds']} rounds", "",
                  "Built together, one step of each per round (order reversed every other round), after one warm-up "
                  "step each; this is the ratio to trust on a shared machine.", "",
                  f"| method | s / step (median) | x {first} | every step (s) |" + (
                      " GFLOP / step | fraction of matmul rate |" if "flops" in run else ""),
                  "|---|---:|---:|---|" + ("---:|---:|" if "flops" in run else "")]
        for m in run["methods"]:
            flops = (f" {run['flops']['per_step'][m] / 1e9:,.1f} | {run['flops']['fraction_of_matmul_rate'][m]:.1%} |"
                     if "flops" in run else "")
            lines.append(f"| {m} | {run['step_s_median'][m]:.3f} | {run['ratio_to_first'][m]:.2f} | "
                         f"{', '.join(f'{t:.3f}' for t in run['step_s_all'][m])} |" + flops)
        if "flops" in run:
            lines += ["", f"Matmul rate: {run['flops']['matmul_rate_flops'] / 1e12:.2f} TFLOP/s "
                      f"({run['flops']['matmul_dtype']}); fraction = FLOPs per step / median step seconds / matmul rate."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10, help="class names in the classifier (text tower batch)")
    p.add_argument("--methods", nargs="+", default=None, type=variant,
                   help="each in its own process (default: all, or none when only --interleave is given)")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cutout", default="random", choices=("random", "attentive", "none"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_step"), help="writes OUT.json and OUT.md")
    p.add_argument("--flops", action="store_true", help="with --interleave: FLOPs per step and the fraction of the "
                   "device's matmul rate")
    p.add_argument("--interleave", nargs="+", action="append", metavar="METHOD", type=variant, default=None,
                   help="also time these methods side by side in one process (repeatable), e.g. "
                        "--interleave lora orthcr-ce --interleave lora-orthcr orthcr")
    p.add_argument("--rounds", type=int, default=5, help="rounds of --interleave")
    p.add_argument("--one", help=argparse.SUPPRESS)      # internal: measure one method in this process
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args)))
        return

    import torch

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    methods = args.methods if args.methods is not None else ([] if args.interleave else list(METHODS))
    results: dict[str, list[dict]] = {}
    for device in devices:
        for method in methods:
            command = [sys.executable, __file__, "--one", method, "--device", device, "--model", args.model,
                       "--batch-size", str(args.batch_size), "--classes", str(args.classes), "--warmup",
                       str(args.warmup), "--steps", str(args.steps), "--cutout", args.cutout]
            started = time.time()
            proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{method} on {device} failed")
            row = json.loads(line[len("RESULT "):])
            results.setdefault(device, []).append(row)
            print(f"{device:5s} {method:15s} {row['step_s_median']:8.3f} s/step  {row['peak_memory_mib']:8.0f} MiB "
                  f"({time.time() - started:.0f} s)", flush=True)
    import open_clip

    side_by_side = []
    for group in args.interleave or []:
        print(f"side by side on {devices[0]}: {', '.join(group)}", flush=True)
        args.device = devices[0]
        side_by_side.append(interleaved(group, args.rounds, args))
    report = {"model": args.model, "pretrained": "none", "batch_size": args.batch_size,
              "image_size": model_image_size(args.model),
              "classes": args.classes, "warmup": args.warmup,
              "steps": args.steps, "cutout": args.cutout, "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results,
              "ratios_to_lora_same_objective": {device: {r["method"]: r["step_s_median"] / next(
                  x["step_s_median"] for x in rows if x["method"] in ("lora", "lora-orthcr") and x["objective"] == r["objective"])
                  for r in rows if any(x["method"] in ("lora", "lora-orthcr") and x["objective"] == r["objective"] for x in rows)}
                  for device, rows in results.items()},
              "interleaved": side_by_side, "interleave_device": devices[0]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def model_image_size(name: str) -> int:
    """The image side of a model config (registers our own configs, e.g. orthserve-mini, first)."""
    import open_clip

    from orthserve import mini
    from orthserve.models import resolve_model_name

    name = mini.register() if name == mini.MODEL_NAME else resolve_model_name(name)
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


if __name__ == "__main__":
    main()
