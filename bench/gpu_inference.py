"""The image tower on a GPU, against the GPU's fp16 matrix-multiply roofline (issue 7's GPU part).

    python bench/gpu_inference.py                            # a CUDA machine: ViT-B-32 at batch 32 and 256
    python bench/gpu_inference.py --device cpu --smoke       # the plumbing on any machine (the tests run this)

The model is built as bench/inference.py builds it (seeded; Orthogonal + LoRA adapters, perturbed so they are not
the identity) and folded with ``orthserve.fold``, as the export folds it.  Paths, interleaved in rounds, each
figure the median over rounds:
  torch-fp32           the folded model in fp32 (TF32 off): the reference every other path is checked against
  torch-fp16/-bf16     the folded model cast to half precision, eager
  torch-fp16-compiled  torch.compile of torch-fp16 (``--no-compile`` skips it)
  ort-cuda-fp16        the export's image.fp16.onnx on onnxruntime's CUDA provider, device tensors bound in place
  ort-tensorrt-fp16    the same on the TensorRT provider
  service-runtime      the service's own runtime (service.runtime.ImageModel, as /classify calls it: host numpy
                       uint8 pixels in, numpy embeddings out, provider and variant chosen as the service chooses
                       them, IO binding with pinned host buffers)
  service-runtime-cudagraphs  the same with ORTHSERVE_CUDA_GRAPHS=1 (a CUDA graph per batch-size bucket)
The onnxruntime paths run only where this machine's onnxruntime has the provider; otherwise the report says
which providers it has.  Roofline: torch's fp16 n x n matrix multiply on the same device; images/s at that rate
from the image tower's FLOPs (bench/inference.py ``image_gflop``: ViT-B-32 8.8 GFLOP per 224 px image).
Target: the best path at the largest batch at least 30% of it.  Pixels: real photos (``--photos``) preprocessed
with orthserve.preprocess and repeated to the batch size, or synthetic ones where none are found (speed does
not depend on the pixels; the report says which).  Results: gpu_inference.{json,md,png} in ``--out``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from inference import build, pretrained_for  # noqa: E402
from timing import image_gflop, matmul_rate, run_record, save_results, timed_rounds  # noqa: E402
from server import PHOTOS  # noqa: E402

TARGET_FRACTION = 0.30
ORT_PROVIDERS = {"ort-cuda-fp16": "CUDAExecutionProvider", "ort-tensorrt-fp16": "TensorrtExecutionProvider"}


def torch_path(model: torch.nn.Module, spec, dtype: torch.dtype, compile_it: bool = False):
    """``uint8 pixels (on the device) -> L2-normalized embeddings`` through the exported wrapper (normalization
    in ``dtype`` on the device, as the fp16 graph does it); the cast to ``dtype`` is part of the path."""
    from export.towers import ImageTower

    tower = ImageTower(model, spec).to(dtype=dtype).eval()
    # static shapes: one graph per batch size, as a server with fixed batch buckets would compile them
    encode = torch.compile(tower, dynamic=False) if compile_it else tower

    def run(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return encode(pixels).float()
    return run


def ort_path(onnx_path: Path, provider: str, device: torch.device, embed_dim: int):
    """onnxruntime on ``provider`` with input and output bound to device memory (no host copies per batch)."""
    from orthserve.artifact import ort_session

    options = {"TensorrtExecutionProvider": {"trt_fp16_enable": True}}.get(provider, {})
    session = ort_session(onnx_path, "fp16", [(provider, options), "CPUExecutionProvider"])
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"{provider} did not load (session providers: {session.get_providers()})")
    name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    def run(pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.contiguous()
        out = torch.empty((pixels.shape[0], embed_dim), dtype=torch.float32, device=device)
        binding = session.io_binding()
        binding.bind_input(name, "cuda", device.index or 0, np.uint8, tuple(pixels.shape), pixels.data_ptr())
        binding.bind_output(out_name, "cuda", device.index or 0, np.float32, tuple(out.shape), out.data_ptr())
        session.run_with_iobinding(binding)
        return out
    return run


def service_path(artifact: Path, device: torch.device, cuda_graphs: bool = False):
    """``service.runtime.ImageModel`` on the artifact: the served path, host uint8 pixels in, numpy out (IO
    binding with pinned buffers; with ``cuda_graphs``, ``ORTHSERVE_CUDA_GRAPHS=1``).

    The host copy of each batch is made once, outside the timing: the service receives host pixels."""
    from service.runtime import ImageModel, open_artifact

    os.environ["ORTHSERVE_CUDA_GRAPHS"] = "1" if cuda_graphs else ""
    try:
        model = ImageModel(open_artifact(str(artifact)))
    finally:
        os.environ.pop("ORTHSERVE_CUDA_GRAPHS")
    host: dict[int, np.ndarray] = {}

    def run(pixels: torch.Tensor) -> torch.Tensor:
        if len(pixels) not in host:
            host[len(pixels)] = pixels.cpu().numpy()
        return torch.from_numpy(model.encode(host[len(pixels)])).to(device)
    bound = model.encoder.bound
    run.variant = (f"{model.encoder.variant} on {model.encoder.providers}, max batch {model.max_batch}, "  # type: ignore[attr-defined]
                   f"pinned {bound.pinned if bound else None}, CUDA graphs {sorted(bound.graphs) if bound else None}")
    return run


def load_pixels(photos: Path, spec, count: int) -> tuple[np.ndarray, str]:
    from orthserve.preprocess import load_pixels

    paths = sorted(photos.rglob("*.jpg"))[:count] if photos.is_dir() else []
    if not paths:
        return np.random.default_rng(0).integers(0, 256, (count, 3, spec.image_size, spec.image_size), np.uint8), \
            f"synthetic (no photos under {photos})"
    pixels = load_pixels([str(p) for p in paths], spec)
    return np.concatenate([pixels] * (count // len(pixels) + 1))[:count], f"{len(paths)} photos from {photos}, repeated"


def ort_status(device: torch.device) -> tuple[list[str], str]:
    """The onnxruntime paths this machine can run, and a line saying what its onnxruntime has."""
    try:
        import onnxruntime as ort
    except ImportError:
        return [], "onnxruntime is not installed"
    available = ort.get_available_providers()
    line = f"onnxruntime {ort.__version__}, providers {', '.join(available)}"
    if device.type != "cuda":
        return [], line + " (not a CUDA device: no onnxruntime GPU path)"
    return [p for p, provider in ORT_PROVIDERS.items() if provider in available], line


def device_line(device: torch.device) -> str:
    if device.type != "cuda":
        return f"CPU ({os.cpu_count()} CPUs; a smoke run of the script, not a GPU figure)"
    props = torch.cuda.get_device_properties(device)
    return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
            f"CUDA {torch.version.cuda}, torch {torch.__version__}")


def bench(args, device: torch.device, workdir: Path) -> dict:
    from orthserve.preprocess import PreprocessSpec

    name, pretrained = args.model, pretrained_for(args.model)
    model, tokenizer, configs = build(name, pretrained, adapted=True, perturb=args.perturb)
    spec = PreprocessSpec.from_model(model)
    gflop = image_gflop(model, spec.image_size)  # on the CPU, before anything moves
    ort_paths, ort_line = ort_status(device)
    if ort_paths:  # the export folds its source in place and verifies the graphs against the unfolded model
        import export

        source = export.Source(model=model, tokenizer=tokenizer, classifier=None, name=name, pretrained=pretrained,
                               method="bench:orthcr+lora", adapters=[c.to_dict() for c in configs], preprocess=spec)
        export.export_artifact(source, workdir / "artifact", ["fp16"], tolerance=args.tolerance)
    else:
        import orthserve

        orthserve.fold(model)
    folded = model.to(device)
    with torch.inference_mode():
        embed_dim = int(folded.encode_image(torch.zeros(1, 3, spec.image_size, spec.image_size, device=device)).shape[-1])
    runners = {"torch-fp32": torch_path(folded, spec, torch.float32)}
    for dtype in args.dtypes:
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        runners[f"torch-{dtype}"] = torch_path(_copy_as(folded, half), spec, half)
    if args.compile and "fp16" in args.dtypes and device.type == "cuda":
        runners["torch-fp16-compiled"] = torch_path(_copy_as(folded, torch.float16), spec, torch.float16,
                                                    compile_it=True)
    skipped = {}
    for path in ort_paths:
        try:
            runners[path] = ort_path(workdir / "artifact" / "image.fp16.onnx", ORT_PROVIDERS[path], device, embed_dim)
        except Exception as err:  # noqa: BLE001 - a provider that fails to load is recorded, not fatal
            skipped[path] = f"{type(err).__name__}: {err}"[:300]
    if "ort-cuda-fp16" in runners:
        try:
            runners["service-runtime"] = service_path(workdir / "artifact", device)
        except Exception as err:  # noqa: BLE001 - recorded, not fatal
            skipped["service-runtime"] = f"{type(err).__name__}: {err}"[:300]
        try:
            runners["service-runtime-cudagraphs"] = service_path(workdir / "artifact", device, cuda_graphs=True)
        except Exception as err:  # noqa: BLE001 - recorded, not fatal
            skipped["service-runtime-cudagraphs"] = f"{type(err).__name__}: {err}"[:300]
    pixels_np, pixels_from = load_pixels(args.photos, spec, max(args.batches))
    pixels = torch.from_numpy(pixels_np).to(device)

    probe = pixels[:min(args.batches)]  # a batch size that is timed anyway: no extra compile
    ref = runners["torch-fp32"](probe)
    check = {}
    for path, run in list(runners.items()):  # also the warm-up (and the compile) of every path
        try:
            out = run(probe)
            for b in args.batches:
                run(pixels[:b])
        except Exception as err:  # noqa: BLE001 - an onnxruntime provider that fails at run time is recorded
            if not path.startswith(("ort-", "service-")):
                raise
            skipped[path] = f"{type(err).__name__}: {err}"[:300]
            del runners[path]
            continue
        check[path] = {"images": len(probe), "max_abs_diff": float((out - ref).abs().max()),
                       "cosine_min": float(F.cosine_similarity(out, ref, dim=-1).min())}
    paths = list(runners)
    rates = timed_rounds(runners, pixels, args.batches, args.rounds, args.seconds, args.min_iters, name, device)
    ips = {p: {str(b): round(statistics.median(v), 1) for b, v in d.items()} for p, d in rates.items()}
    return {"model": name, "pretrained": pretrained, "image_size": spec.image_size, "image_gflop_per_image": round(gflop, 4),
            "adapters": [c.to_dict() for c in configs], "pixels": pixels_from, "paths": paths, "skipped": skipped,
            "onnxruntime": ort_line, "check_against_torch_fp32": check, "images_per_s": ips,
            "path_details": {p: run.variant for p, run in runners.items() if hasattr(run, "variant")},
            "images_per_s_all_rounds": {p: {str(b): [round(x, 1) for x in v] for b, v in d.items()}
                                        for p, d in rates.items()}}


def _copy_as(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


def roofline(result: dict, matmul: dict, batch: int) -> dict:
    limit = matmul["gflops_best"] / result["image_gflop_per_image"]
    best_path = max(result["paths"], key=lambda p: result["images_per_s"][p][str(batch)])
    best = result["images_per_s"][best_path][str(batch)]
    return {"images_per_s": round(limit, 1), "batch": batch, "best_path": best_path, "best_measured": best,
            "fraction": round(best / limit, 4), "target": TARGET_FRACTION, "pass": best / limit >= TARGET_FRACTION}


def write_markdown(report: dict, path: Path) -> None:
    res, mm, roof = report["result"], report["matmul"], report["roofline"]
    batches = report["batches"]
    lines = [f"# {res['model']} image tower on {'a GPU' if report['device_type'] == 'cuda' else 'the CPU (smoke)'}", ""]
    if report["scale"] == "smoke":
        lines += ["**SMOKE SCALE**: a small model and short timings on the CPU, to check the script; these are not "
                  "GPU figures and the verdict is not the issue's. Full run on a CUDA machine: "
                  "`python bench/gpu_inference.py`.", ""]
    lines += [f"Device: {report['device']}. {res['onnxruntime']}.", f"Pixels: {res['pixels']}.", "",
              f"{mm['dtype']} matmul {mm['n']}x{mm['n']}: **{mm['gflops_best'] / 1e3:.1f} TFLOP/s** (best of "
              f"{mm['repeats']}; median {mm['gflops_median'] / 1e3:.1f}). {res['model']}: {res['image_gflop_per_image']:.3f} GFLOP per "
              f"{res['image_size']} px image -> **{roof['images_per_s']:.0f} img/s** at that rate.", "",
              "| path | " + " | ".join(f"batch {b} img/s" for b in batches) + " | max abs diff / min cosine vs torch-fp32 |",
              "|---|" + "---|" * (len(batches) + 1)]
    for p in res["paths"]:
        check = res["check_against_torch_fp32"][p]
        lines.append(f"| {p} | " + " | ".join(f"{res['images_per_s'][p][str(b)]:.1f}" for b in batches)
                     + f" | {check['max_abs_diff']:.2e} / {check['cosine_min']:.5f} |")
    lines += [""] + [f"- {p}: {detail}" for p, detail in res.get("path_details", {}).items()]
    lines += [""] + [f"- not run: {p}: {why}" for p, why in res["skipped"].items()]
    lines += [""] + service_target_lines(res, batches)
    lines += ["", "| target | batch | best path | img/s | roofline img/s | fraction | verdict |", "|---|---|---|---|---|---|---|",
              f"| best path >= {TARGET_FRACTION:.0%} of the {mm['dtype']} matmul roofline | {roof['batch']} | "
              f"{roof['best_path']} | {roof['best_measured']:.1f} | {roof['images_per_s']:.0f} | {roof['fraction']:.1%} | "
              f"{'PASS' if roof['pass'] else 'FAIL'} |", "", f"![chart](gpu_inference.png)", "",
              f"Each figure: median of {report['rounds']} rounds of {report['seconds_per_measurement']} s, paths "
              f"interleaved and rotated per round, pixels already on the device (the cast to half precision is timed).",
              f"{report['created']}; {report['machine']}; command `{report['command']}`."]
    path.write_text("\n".join(lines) + "\n")


def service_target_lines(res: dict, batches: list[int]) -> list[str]:
    """Issue 23: the served path (host uint8 pixels) at the largest batch against torch bf16 with the pixels on
    the device, and the served path's latency at batch 1."""
    ips, big = res["images_per_s"], str(max(batches))
    if "torch-bf16" not in ips:
        return []
    lines = ["| served path | batch | img/s | torch-bf16 img/s | fraction (target >= 60%) | batch-1 latency ms |",
             "|---|---|---|---|---|---|"]
    for p in (p for p in res["paths"] if p.startswith("service-runtime")):
        one = ips[p].get("1")
        fraction = ips[p][big] / ips["torch-bf16"][big]
        lines.append(f"| {p} | {big} | {ips[p][big]:.1f} | {ips['torch-bf16'][big]:.1f} | {fraction:.1%} "
                     f"{'PASS' if fraction >= 0.6 else 'FAIL'} | {1000 / one if one else float('nan'):.2f} |")
    return lines if len(lines) > 2 else []


def write_chart(report: dict, path: Path) -> None:
    from common import finish_chart, pyplot

    plt = pyplot()
    res, batches = report["result"], report["batches"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x, width = np.arange(len(batches)), 0.8 / len(res["paths"])
    for i, p in enumerate(res["paths"]):
        ax.bar(x + (i - len(res["paths"]) / 2 + 0.5) * width, [res["images_per_s"][p][str(b)] for b in batches], width, label=p)
    roof = report["roofline"]
    ax.axhline(roof["images_per_s"], color="k", ls="--", lw=1, label=f"{report['matmul']['dtype']} matmul roofline")
    ax.axhline(roof["images_per_s"] * TARGET_FRACTION, color="r", ls=":", lw=1, label=f"target ({TARGET_FRACTION:.0%})")
    ax.set_xticks(x, [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    where = report["device"].split(",")[0] if report["device_type"] == "cuda" else "CPU (smoke run)"
    ax.set(ylabel="images / s", title=f"{res['model']} image tower, {where}")
    finish_chart(fig, ax, path, grid_axis="y")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default ViT-B-32 (--smoke: orthserve-tiny)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (only for a smoke run)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 32 256 (--smoke 1 4)")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch-fp16-compiled (never run on a CPU)")
    parser.add_argument("--seconds", type=float, default=None, help="per path, batch and round (default 1, --smoke 0.05)")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (--smoke 2)")
    parser.add_argument("--min-iters", type=int, default=3)
    parser.add_argument("--matmul-n", type=int, default=None, help="default 8192 (--smoke 256)")
    parser.add_argument("--photos", type=Path, default=PHOTOS, help="real photos (*.jpg, any depth)")
    parser.add_argument("--perturb", type=float, default=0.01, help="std of the noise added to adapter parameters")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="export verification tolerance (max abs diff)")
    parser.add_argument("--smoke", action="store_true", help="small model, short timings; labelled smoke-scale")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here (torch.cuda.is_available() is False); this benchmark is for a "
                         "GPU machine. `--device cpu --smoke` checks the script itself.")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit(f"error: --device {args.device} without --smoke: CPU figures are bench/inference.py's job")
    args.model = args.model or ("orthserve-tiny" if args.smoke else "ViT-B-32")
    args.batches = args.batches or ([1, 4] if args.smoke else [1, 32, 256])
    args.seconds = args.seconds if args.seconds is not None else (0.05 if args.smoke else 1.0)
    args.rounds = args.rounds or (2 if args.smoke else 5)
    torch.backends.cuda.matmul.allow_tf32 = False  # torch-fp32 is the fp32 reference, not TF32
    torch.backends.cudnn.allow_tf32 = False
    matmul_dtype = torch.float16 if device.type == "cuda" else torch.float32  # CPUs have no fast fp16 matmul
    print(f"matmul {matmul_dtype} on {device} ...", flush=True)
    matmul = matmul_rate(args.matmul_n or (256 if args.smoke else 8192), 2 if args.smoke else 10, device, matmul_dtype)
    print(f"  {matmul['gflops_best'] / 1e3:.1f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="orthserve-gpu-bench-") as tmp:
        result = bench(args, device, Path(tmp))
    report = {"scale": "smoke" if args.smoke else "full", "device_type": device.type, "device": device_line(device),
              "batches": args.batches, "rounds": args.rounds, "seconds_per_measurement": args.seconds,
              "matmul": matmul, "result": result, "roofline": roofline(result, matmul, max(args.batches)),
              **run_record()}
    save_results(args.out, "gpu_inference", report, write_markdown, write_chart)
    print((args.out / "gpu_inference.md").read_text())


if __name__ == "__main__":
    from common import entry_point

    entry_point(main)
