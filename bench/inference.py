"""Inference paths of the same model side by side, in one run, on real photos; against the CPU's matmul rate.

    nice -n 5 .venv/bin/python bench/inference.py            # full: ViT-B-32 (random weights) + orthserve-mini
    nice -n 5 .venv/bin/python bench/inference.py --smoke    # orthserve-tiny + orthserve-mini, short timings

Per model (built with the same seed each time, so every copy has the same weights):
  pytorch-base      the plain open_clip model, no adapters
  pytorch-unfolded  OrthogonalConfig() + LoRAConfig() injected, adapter parameters perturbed (so the adapters are
                    not the identity), left as parametrizations: the eager training-time graph
  pytorch-folded    the same adapted model after export folded it (export_artifact folds its source in place)
  ort-fp32          the exported image.onnx (export verified it against the unfolded model)
  ort-int8          the exported image.int8.onnx (dynamic quantization)
Images/second of the image tower (embeddings, L2-normalized) at each batch size, on photos from
../shared/data/hymenoptera-val preprocessed with orthserve.preprocess.  The paths run interleaved, in rounds,
so drift on a shared machine hits all of them alike; the figure is the median over rounds.  ort-fp32 and ort-int8
are also timed in the service's CPU layout (service/runtime.py: one worker process per CPU, one thread each, all
running at once), since that, not one session holding every CPU, is how the service runs them.

Hardware limit: this CPU's fp32 matmul rate (torch, n x n), and each model's images/s at that rate from its
FLOP count (torch.utils.flop_counter, one 224 px image of ViT-B-32 is about 8.8 GFLOP).
int8 fidelity: cosine of int8 to fp32 image embeddings and top-1 agreement (int8 towers end to end against fp32
towers) on all the real photos, with two label sets (ants/bees, and Tiny-ImageNet's 202 class names).
Targets (issue 7): folded >= 0.98x base; int8 >= 1.8x fp32; int8 cosine >= 0.99 and top-1 agreement >= 99%
(orthserve-mini).  Results: bench/results/inference.json, .md, .png.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from server import PHOTOS, cpu_int8_instructions, photo_paths  # noqa: E402  (bench/ is sys.path[0])
from timing import (image_gflop, matmul_rate, ort_runner, run_record, save_results,  # noqa: E402,F401
                    threads_available, time_path, timed_rounds)
from int8_fidelity import TARGETS as FIDELITY_TARGETS  # noqa: E402
from int8_fidelity import fidelity_image_sets, fidelity_table, fidelity_verdicts, int8_fidelity  # noqa: E402

DATA = REPO.parent / "shared" / "data"
PATHS = ("pytorch-base", "pytorch-unfolded", "pytorch-folded", "ort-fp32", "ort-int8")
VIT_B32_GFLOP = 8.8
TARGETS = {"folded_over_base": 0.98, "int8_over_fp32": 1.8, **FIDELITY_TARGETS}
FULL_COMMAND = "nice -n 5 .venv/bin/python bench/inference.py"


def pretrained_for(name: str) -> str:
    if name == "orthserve-mini":
        from orthserve.mini import WEIGHTS

        return "default" if WEIGHTS.is_file() else "none"
    return "none"


def build(name: str, pretrained: str, adapted: bool, perturb: float):
    """The model, seeded so every copy is the same; with ``adapted``: Orthogonal + LoRA, perturbed adapters."""
    import orthserve
    from orthserve import LoRAConfig, OrthogonalConfig

    torch.manual_seed(0)
    model, _, tokenizer = orthserve.load_model(name, pretrained)
    model.eval()
    configs = []
    if adapted:
        configs = [OrthogonalConfig(), LoRAConfig()]
        for config in configs:
            orthserve.inject(model, config)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in orthserve.adapter_parameters(model).values():
                param.add_(torch.randn(param.shape, generator=gen) * perturb)
    # Every path frozen alike: PyTorch's matmul picks mm or bmm for open_clip's transposed attention input by
    # whether the weights require grad, so the folded model (frozen by inject) ran 10-25% slower than a freshly
    # loaded base at batch 8 for that reason alone (aten::bmm 1.1 ms against aten::mm 0.5 ms per call).
    model.requires_grad_(False)
    return model, tokenizer, configs


def torch_runner(model: torch.nn.Module, spec):
    """uint8 pixels -> embeddings through the wrapper the export exports (normalization included)."""
    from export.towers import ImageTower

    tower = ImageTower(model, spec).eval()

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return tower(torch.from_numpy(pixels)).numpy()
    return run


class ServiceLayout:
    """onnxruntime fp32 and int8 in the service's CPU layout: ``workers`` processes, each with its own
    ``threads``-thread sessions, all running the same batch at once (service/runtime.py's defaults: one worker
    per CPU, one thread each).  The single session with every CPU's threads above is what one process gets; the
    service does not run that way on CPU, and tiny int8 kernels lose more to thread hand-offs than fp32 ones."""

    def __init__(self, paths: dict[str, Path], workers: int, threads: int, pixels: np.ndarray) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.barrier = ctx.Barrier(workers)  # every worker starts its timing together
        self.commands = [ctx.Queue() for _ in range(workers)]
        self.results = ctx.Queue()
        self.workers = [ctx.Process(target=_layout_worker, daemon=True,
                                    args=(paths, threads, pixels, self.barrier, queue, self.results))
                        for queue in self.commands]
        for worker in self.workers:
            worker.start()

    def rate(self, variant: str, batch: int, seconds: float, min_iters: int) -> float:
        """Images/second of all the workers together."""
        for queue in self.commands:
            queue.put((variant, batch, seconds, min_iters))
        return sum(self.results.get(timeout=900) for _ in self.workers)

    def __enter__(self) -> "ServiceLayout":
        return self

    def __exit__(self, *exc) -> None:
        for queue in self.commands:
            queue.put(None)
        for worker in self.workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()


def _layout_worker(paths: dict[str, Path], threads: int, pixels: np.ndarray, barrier, commands, results) -> None:
    runners = {variant: ort_runner(path, variant, threads) for variant, path in paths.items()}
    while (command := commands.get()) is not None:
        variant, batch, seconds, min_iters = command
        runners[variant](pixels[:batch])  # warm-up at this shape
        barrier.wait()
        results.put(time_path(runners[variant], pixels[:batch], seconds, min_iters))


def service_layout_rates(art, pixels: np.ndarray, args) -> dict:
    """fp32 and int8 in the service's layout, alternating in paired rounds like the single-session paths."""
    from service.runtime import default_threads, default_workers

    workers, threads = default_workers(), default_threads()
    rates: dict[str, dict[str, list[float]]] = {v: {str(b): [] for b in args.batches} for v in ("fp32", "int8")}
    paths = {v: art.onnx_path("image", v) for v in rates}
    with ServiceLayout(paths, workers, threads, pixels[:max(args.batches)]) as layout:
        for r in range(args.rounds):
            for b in args.batches:
                for variant in (("fp32", "int8") if r % 2 == 0 else ("int8", "fp32")):
                    rates[variant][str(b)].append(layout.rate(variant, b, args.seconds, args.min_iters))
    return {"workers": workers, "threads": threads,
            "images_per_s": {v: {b: round(statistics.median(x), 2) for b, x in d.items()} for v, d in rates.items()},
            "images_per_s_all_rounds": {v: {b: [round(x, 2) for x in xs] for b, xs in d.items()} for v, d in rates.items()},
            "int8_over_fp32": {str(b): paired_ratio(rates, "int8", "fp32", str(b)) for b in args.batches}}


def bench_model(name: str, args, threads: int, photos: list[Path], workdir: Path) -> dict:
    import export
    from orthserve.artifact import load_artifact
    from orthserve.preprocess import PreprocessSpec, load_pixels

    pretrained = pretrained_for(name)
    t0 = time.perf_counter()
    base, _, _ = build(name, pretrained, adapted=False, perturb=args.perturb)
    unfolded, _, _ = build(name, pretrained, adapted=True, perturb=args.perturb)
    to_fold, tokenizer, configs = build(name, pretrained, adapted=True, perturb=args.perturb)
    spec = PreprocessSpec.from_model(base)
    source = export.Source(model=to_fold, tokenizer=tokenizer, classifier=None, name=name, pretrained=pretrained,
                           method="bench:orthcr+lora", adapters=[c.to_dict() for c in configs], preprocess=spec)
    out = workdir / f"{name}-artifact"
    manifest = export.export_artifact(source, out, ["int8"], images_dir=PHOTOS, tolerance=args.tolerance)
    export_s = time.perf_counter() - t0
    art = load_artifact(out)
    parity = json.loads((out / "parity.json").read_text())
    folded = source.model  # folded in place by the export
    pixels_all = load_pixels([str(p) for p in photos[:max(args.batches)]], spec)

    runners = {"pytorch-base": torch_runner(base, spec), "pytorch-unfolded": torch_runner(unfolded, spec),
               "pytorch-folded": torch_runner(folded, spec),
               "ort-fp32": ort_runner(art.onnx_path("image", "fp32"), "fp32", threads),
               "ort-int8": ort_runner(art.onnx_path("image", "int8"), "int8", threads)}
    probe = pixels_all[:8]
    ref = runners["pytorch-unfolded"](probe)
    checks = {path: float(np.abs(runners[path](probe) - ref).max()) for path in PATHS}
    for b in args.batches:  # warm-up: one call per path and batch size
        for path in PATHS:
            runners[path](pixels_all[:b])
    rates = timed_rounds(runners, pixels_all, args.batches, args.rounds, args.seconds, args.min_iters, name)
    ips = {p: {str(b): round(statistics.median(v), 2) for b, v in d.items()} for p, d in rates.items()}
    print(f"  {name}: onnxruntime fp32 and int8 in the service's layout ...", flush=True)
    layout = service_layout_rates(art, pixels_all, args)
    gflop = image_gflop(base, spec.image_size)
    fidelity = int8_fidelity(art, threads, fidelity_image_sets(photos[:args.accuracy_images], args.tiny_per_class))
    return {"model": name, "pretrained": pretrained, "image_size": spec.image_size,
            "adapters": [c.to_dict() for c in configs], "perturb_std": args.perturb,
            "image_gflop_per_image": round(gflop, 4), "export_seconds": round(export_s, 1),
            "export_parity": {k: parity[k] for k in ("image", "tolerance")},
            "max_abs_diff_vs_unfolded_on_8_photos": checks,
            "images_per_s": ips, "images_per_s_all_rounds": {p: {str(b): [round(x, 2) for x in v] for b, v in d.items()}
                                                             for p, d in rates.items()},
            "service_layout": layout, "int8_fidelity": fidelity, "embed_dim": manifest["embed_dim"]}


RATIOS = {"folded_over_base": ("pytorch-folded", "pytorch-base"),
          "unfolded_over_base": ("pytorch-unfolded", "pytorch-base"),
          "ort_fp32_over_folded": ("ort-fp32", "pytorch-folded"), "int8_over_fp32": ("ort-int8", "ort-fp32")}


def paired_ratio(rounds: dict[str, dict[str, list[float]]], path: str, reference: str, batch: str) -> float:
    """Median over rounds of ``path``'s rate / ``reference``'s rate in the same round.  Within a round the
    paths run back to back, so the slow drift of a shared machine cancels out of each ratio; a ratio of
    two medians taken at different moments does not cancel it (folded/base read 0.85 that way)."""
    return round(statistics.median(a / b for a, b in zip(rounds[path][batch], rounds[reference][batch])), 3)


def ratios_and_verdicts(result: dict, batches: list[int]) -> tuple[dict, list[dict]]:
    rounds = result["images_per_s_all_rounds"]
    ratios: dict[str, dict[str, float]] = {key: {} for key in RATIOS}
    verdicts = []
    for b in map(str, batches):
        for key, (path, reference) in RATIOS.items():
            ratios[key][b] = paired_ratio(rounds, path, reference, b)
        for key in ("folded_over_base", "int8_over_fp32"):
            verdicts.append({"model": result["model"], "target": f"{key} >= {TARGETS[key]}", "batch": int(b),
                             "value": ratios[key][b], "pass": ratios[key][b] >= TARGETS[key]})
        layout = result.get("service_layout")
        if layout:
            value = layout["int8_over_fp32"][b]
            verdicts.append({"model": result["model"], "batch": int(b), "value": value,
                             "target": f"int8_over_fp32 >= {TARGETS['int8_over_fp32']} (service layout: "
                                       f"{layout['workers']} workers x {layout['threads']} threads)",
                             "pass": value >= TARGETS["int8_over_fp32"]})
    if result["model"] == "orthserve-mini":
        verdicts += fidelity_verdicts(result["model"], result["int8_fidelity"])
    return ratios, verdicts


def roofline(result: dict, gflops: float, batches: list[int]) -> dict:
    """The fp32 limit: images/s at the measured fp32 matmul rate, against the best fp32 path.  int8 is
    reported beside it, not as a fraction: its peak depends on the CPU's int8 instructions (AVX2 alone: about
    twice fp32's; VNNI or AMX: much more), which bench/int8_headroom.py measures."""
    ips = result["images_per_s"]

    def best(paths: list[str]) -> tuple[str, int]:
        return max(((p, b) for p in paths for b in batches), key=lambda pb: ips[pb[0]][str(pb[1])])

    limit = gflops / result["image_gflop_per_image"]
    fp32_path, fp32_batch = best([p for p in PATHS if p != "ort-int8"])
    _, int8_batch = best(["ort-int8"])
    value = ips[fp32_path][str(fp32_batch)]
    return {"images_per_s": round(limit, 2), "best_measured": value, "best_path": fp32_path, "best_batch": fp32_batch,
            "fraction": value / limit, "int8_best": ips["ort-int8"][str(int8_batch)], "int8_batch": int8_batch}


def write_markdown(report: dict, path: Path) -> None:
    batches = report["batches"]
    hw = report["hardware"]
    lines = ["# Inference paths side by side (image tower, CPU)", ""]
    if report["scale"] == "smoke":
        lines += [f"**SMOKE SCALE**: {', '.join(report['models'])}, {report['seconds_per_measurement']} s per measurement, "
                  f"{report['rounds']} rounds, on a shared 2-core machine that was also running a pretraining job "
                  f"(load average {report['load_average'][0]:.1f} at the start). It proves the script works; the "
                  f"figures are not the product's performance and the verdicts below are not the issue's verdicts. "
                  f"Full run: `{FULL_COMMAND}`.", ""]
    cpu_model = hw.get("int8_instructions", {}).get("model", "CPU model not recorded")
    lines += [f"Hardware: {cpu_model} ({hw['cpu']}), {report['threads']} threads (torch and onnxruntime alike). fp32 matmul "
              f"{hw['matmul']['n']}x{hw['matmul']['n']}: **{hw['matmul']['gflops_best']:.1f} GFLOP/s** (best of "
              f"{hw['matmul']['repeats']}; median {hw['matmul']['gflops_median']:.1f}).", ""]
    lines += ["| model | path | " + " | ".join(f"batch {b} img/s" for b in batches) + " |",
              "|---|---|" + "---|" * len(batches)]
    for res in report["results"]:
        for p in PATHS:
            lines.append(f"| {res['model']} | {p} | " + " | ".join(f"{res['images_per_s'][p][str(b)]:.1f}" for b in batches) + " |")
    lines += ["", "## Against the hardware limit", "",
              "| model | GFLOP / image (counted) | img/s at the fp32 matmul rate | best fp32 img/s (path, batch) | "
              "fraction | best int8 img/s (batch) |", "|---|---|---|---|---|---|"]
    for res in report["results"]:
        roof = res["roofline"]
        lines.append(f"| {res['model']} ({res['image_size']} px) | {res['image_gflop_per_image']:.3f} | {roof['images_per_s']:.1f} | "
                     f"{roof['best_measured']:.1f} ({roof['best_path']}, {roof['best_batch']}) | {roof['fraction']:.1%} | "
                     f"{roof.get('int8_best', '-')} ({roof.get('int8_batch', '-')}) |")
    int8 = hw.get("int8_instructions")
    lines += ["", "int8 is not bound by the fp32 matmul rate: its peak depends on the CPU's int8 instructions ("
              + (f"this run's CPU, {int8['model']}: {int8['int8_dot']}" if int8 else "not recorded for this run")
              + "); bench/int8_headroom.md measures int8 against fp32 matrix multiplies on one CPU."]
    if "vit_b32_at_8.8_gflop" in hw:
        lines += ["", f"ViT-B-32 at the issue's 8.8 GFLOP per 224 px image: **{hw['vit_b32_at_8.8_gflop']:.1f} img/s** at "
                  f"{hw['matmul']['gflops_best']:.1f} GFLOP/s"
                  + (f"; measured (best fp32 path): {hw['vit_b32_measured_best']:.1f} img/s." if "vit_b32_measured_best" in hw
                     else " (ViT-B-32 not measured in this run).")]
    lines += ["", "## Ratios", "", "| model | ratio | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "|---|---|" + "---|" * len(batches)]
    for res in report["results"]:
        for key, row in res["ratios"].items():
            lines.append(f"| {res['model']} | {key} | " + " | ".join(f"{row[str(b)]:.3f}" for b in batches) + " |")
    layouts = [res for res in report["results"] if res.get("service_layout")]
    if layouts:
        lay = layouts[0]["service_layout"]
        lines += ["", f"## onnxruntime fp32 and int8 in the service's layout ({lay['workers']} workers x "
                  f"{lay['threads']} threads)", "",
                  "Each worker a process with its own sessions, all running the same batch at once (the service's "
                  "default on this CPU); images/s of all workers together, median of paired rounds.", "",
                  "| model | variant | " + " | ".join(f"batch {b} img/s" for b in batches) + " |",
                  "|---|---|" + "---|" * len(batches)]
        for res in layouts:
            lay = res["service_layout"]
            for v in ("fp32", "int8"):
                lines.append(f"| {res['model']} | {v} | " + " | ".join(f"{lay['images_per_s'][v][str(b)]:.1f}" for b in batches) + " |")
            lines.append(f"| {res['model']} | int8 / fp32 | " + " | ".join(f"{lay['int8_over_fp32'][str(b)]:.3f}" for b in batches) + " |")
    lines += ["", "## int8 fidelity on real photos", "", *fidelity_table(report["results"])]
    lines += ["", "## Targets" + (" (smoke scale: indicative only)" if report["scale"] == "smoke" else ""), "",
              "| model | target | batch | value | verdict |", "|---|---|---|---|---|"]
    for v in report["verdicts"]:
        lines.append(f"| {v['model']} | {v['target']} | {v.get('batch', '-')} | {v['value']} | "
                     f"{'PASS' if v['pass'] else 'FAIL'}{' (' + v['note'] + ')' if v.get('note') else ''} |")
    lines += ["", "Notes:", "- Paths: " + "; ".join(f"`{p}`" for p in PATHS) + ". Adapters: OrthogonalConfig() (both FFN "
              "linears, 4 blocks) + LoRAConfig() (q/k/v), parameters perturbed with N(0, "
              f"{report['results'][0]['perturb_std'] if report['results'] else ''}^2). Folded = after "
              "export folded the adapted model; the ONNX graphs are that folded model, verified by the export against the "
              "unfolded one (parity in the JSON).",
              "- Each figure: median over rounds of images/s, paths interleaved and rotated per round, "
              "images from hymenoptera-val preprocessed once with orthserve.preprocess (preprocessing is not timed "
              "here; see preprocess_cost.md). Each ratio: median over rounds of the two paths' rates in the same "
              "round (paired), not the ratio of the two medians.",
              "- Random weights where `pretrained` is none: speed does not depend on the weights; the int8 agreement "
              "figures of a random image tower measure quantization fidelity, not accuracy.",
              f"- {report['created']}; {report['machine']}."]
    path.write_text("\n".join(lines) + "\n")


def write_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    batches = report["batches"]
    width = 0.8 / len(PATHS)
    for ax, res in zip(axes[0], results):
        x = np.arange(len(batches))
        for i, p in enumerate(PATHS):
            ax.bar(x + (i - len(PATHS) / 2 + 0.5) * width, [res["images_per_s"][p][str(b)] for b in batches], width, label=p)
        ax.axhline(res["roofline"]["images_per_s"], color="k", ls="--", lw=1, label="fp32 matmul-rate limit")
        ax.set_xticks(x, [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set(ylabel="images / s", title=f"{res['model']} ({res['image_size']} px)")
        ax.legend(fontsize=7)
    if report["scale"] == "smoke":
        fig.suptitle("SMOKE SCALE (shared busy 2-core machine; not the product's performance)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="default: ViT-B-32 orthserve-mini (--smoke: orthserve-tiny orthserve-mini)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=None, help="per path, batch and round (default 2, --smoke 0.3)")
    parser.add_argument("--rounds", type=int, default=None, help="default 7 (--smoke 2)")
    parser.add_argument("--min-iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime intra-op threads (default: all CPUs)")
    parser.add_argument("--matmul-n", type=int, default=4096)
    parser.add_argument("--matmul-repeats", type=int, default=None, help="default 5 (--smoke 2)")
    parser.add_argument("--accuracy-images", type=int, default=None, help="photos for int8 fidelity (default: all)")
    parser.add_argument("--tiny-per-class", type=int, default=None,
                        help="Tiny-ImageNet val photos per class for int8 fidelity (default: all 25; 0: none)")
    parser.add_argument("--perturb", type=float, default=0.01, help="std of the noise added to adapter parameters")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="export verification tolerance (max abs diff)")
    parser.add_argument("--smoke", action="store_true", help="small models, short timings; results labelled smoke-scale")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    args.models = args.models or (["orthserve-tiny", "orthserve-mini"] if args.smoke else ["ViT-B-32", "orthserve-mini"])
    args.seconds = args.seconds if args.seconds is not None else (0.3 if args.smoke else 2.0)
    args.rounds = args.rounds or (2 if args.smoke else 7)  # paired per round: more short rounds beat fewer long ones here
    args.matmul_repeats = args.matmul_repeats or (2 if args.smoke else 5)
    threads = args.threads or threads_available()
    if threads != torch.get_num_threads():
        # only when it changes anything: on this torch/MKL build, calling torch.set_num_threads (even with the
        # current count) makes the batched torch.linalg.solve of the Cayley transform fail in MKL's SLASWP and hang
        torch.set_num_threads(threads)
    photos = photo_paths()
    if len(photos) < max(args.batches):
        photos = (photos * (max(args.batches) // len(photos) + 1))
    args.accuracy_images = args.accuracy_images or len(photo_paths())
    load0 = os.getloadavg()
    print(f"matmul {args.matmul_n}x{args.matmul_n} fp32 ({threads} threads) ...", flush=True)
    mm = matmul_rate(args.matmul_n, args.matmul_repeats)
    print(f"  {mm['gflops_best']:.1f} GFLOP/s", flush=True)
    results, verdicts = [], []
    with tempfile.TemporaryDirectory(prefix="orthserve-bench-") as tmp:
        for name in args.models:
            print(f"{name}: building, exporting, timing ...", flush=True)
            res = bench_model(name, args, threads, photos, Path(tmp))
            res["ratios"], v = ratios_and_verdicts(res, args.batches)
            res["roofline"] = roofline(res, mm["gflops_best"], args.batches)
            results.append(res)
            verdicts += v
    hardware = {"cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "matmul": mm,
                "int8_instructions": cpu_int8_instructions(),
                "vit_b32_at_8.8_gflop": round(mm["gflops_best"] / VIT_B32_GFLOP, 2)}
    for res in results:
        if res["model"] == "ViT-B-32":
            hardware["vit_b32_measured_best"] = res["roofline"]["best_measured"]
    report = {"scale": "smoke" if args.smoke else "full", "models": args.models, "batches": args.batches,
              "seconds_per_measurement": args.seconds, "rounds": args.rounds, "threads": threads,
              "hardware": hardware, "results": results, "verdicts": verdicts, "targets": TARGETS,
              "load_average": load0, "load_average_end": os.getloadavg(), **run_record()}
    save_results(args.out, "inference", report, write_markdown, write_chart)
    print(f"\nimages/s (median of {args.rounds} rounds){' [SMOKE SCALE]' if args.smoke else ''}:")
    for res in results:
        for p in PATHS:
            print(f"  {res['model']:16s} {p:17s} " + "  ".join(f"b{b}: {res['images_per_s'][p][str(b)]:8.1f}" for b in args.batches))
    print(f"matmul {mm['gflops_best']:.1f} GFLOP/s -> ViT-B-32 limit {hardware['vit_b32_at_8.8_gflop']:.1f} img/s at 8.8 GFLOP"
          + (f"; measured best {hardware['vit_b32_measured_best']:.1f}" if "vit_b32_measured_best" in hardware else ""))
    for v in verdicts:
        print(f"{'PASS' if v['pass'] else 'FAIL'}: {v['model']} {v['target']}"
              + (f" at batch {v['batch']}" if "batch" in v else "") + f": {v['value']}")


if __name__ == "__main__":
    main()
