"""How much faster int8 can make the image tower on this CPU, and where the time goes.

    nice -n 5 .venv/bin/python bench/int8_headroom.py artifacts/default     # after `make artifact`
    nice -n 5 .venv/bin/python bench/int8_headroom.py ARTIFACT --smoke      # short timings

Issue 7 asks for int8 >= 1.8x fp32 (orthserve-mini).  This script measures the parts of that ratio, one thread
(the service's CPU layout: one worker process per CPU, one thread each), on real photos:

1. CPU: the int8 instructions it has (/proc/cpuinfo).  With AMX or VNNI an int8 multiply-accumulate is one
   instruction; with AVX2 alone it is two (vpmaddubsw, then vpmaddwd), so int8's peak is about twice fp32's.
2. Matrix multiplies alone: onnxruntime's fp32 ``MatMul`` against ``DynamicQuantizeMatMul`` (what
   ``export.towers.to_int8`` emits: int8 weights per channel, activations quantized on the fly) at n x n and at
   each transformer block's shapes (query/key/value, attention out, MLP in, MLP out; rows = batch x tokens), for
   orthserve-mini and ViT-B-32.  Weights are random: speed does not depend on them.
3. The artifact's image tower, fp32 and int8: images/s (no profiler), and onnxruntime's per-node profile split
   into matrix multiplies (MatMul, Attention and their int8 forms, with the activations' quantization) and the rest.
4. Headroom: the int8/fp32 ratio expected if every fp32 matrix multiply ran at step 2's int8 speed-up and the
   rest cost what it costs in the int8 graph, fp32 / (fp32 matmul / speed-up + int8 rest); and the matmul
   speed-up the target needs, fp32 matmul / (fp32 / target - int8 rest).

Paths run interleaved in rounds (``inference.timed_rounds``); figures are medians.
Results: bench/results/int8_headroom.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import inference  # bench/ is sys.path[0]; sets up the repository's imports
from orthserve.artifact import ArtifactError, load_artifact, ort_session
from orthserve.preprocess import load_pixels
from server import photo_paths

MATMUL_OPS = {"MatMul", "Gemm", "FusedMatMul", "Attention", "QAttention", "MultiHeadAttention",
              "DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeLinear"}
TARGET = inference.TARGETS["int8_over_fp32"]


def block_shapes(name: str) -> tuple[int, list[tuple[str, int, int]]]:
    """(tokens per image, [(matrix multiply, K, N)]) of one transformer block of ``name``'s image tower."""
    import open_clip

    import orthserve.models  # noqa: F401  (registers our configs, e.g. orthserve-tiny)
    from orthserve import mini

    cfg = mini.IMAGE_TOWER if name == mini.MODEL_NAME else open_clip.get_model_config(name)["vision_cfg"]
    tokens = (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
    width, hidden = cfg["width"], int(cfg["width"] * cfg.get("mlp_ratio", 4.0))
    return tokens, [("query/key/value", width, 3 * width), ("attention out", width, width),
                    ("MLP in", width, hidden), ("MLP out", hidden, width)]


def gemm_model(path: Path, k: int, n: int, int8: bool, seed: int = 0) -> Path:
    """A one-node onnx model y = x @ W (W: k x n, random): fp32 MatMul, or DynamicQuantizeMatMul with W in int8
    per output channel, 7-bit, as export.towers.to_int8 writes it."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    if int8:
        scale = (np.abs(w).max(axis=0) / 63).astype(np.float32)
        inits = [numpy_helper.from_array(np.round(w / scale).astype(np.int8), "w"),
                 numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(np.zeros(n, np.int8), "zero")]
        node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "scale", "zero"], ["y"], domain="com.microsoft")
    else:
        inits, node = [numpy_helper.from_array(w, "w")], helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return path


def gemm_runner(path: Path, variant: str, rows_per_image: int):
    """Run on 'images' of ``rows_per_image`` rows each, so timed_rounds' images/s is per image of the model."""
    session = ort_session(path, variant, threads=1)
    return lambda x: session.run(None, {"x": x.reshape(-1, x.shape[-1])})[0]


def measure_gemms(models: list[str], batches: list[int], n_square: int, args, tmp: Path) -> dict:
    """Step 2: ms per call of fp32 and int8 at n x n and at each block shape (rows = batch x tokens)."""
    rng = np.random.default_rng(1)
    out: dict = {"square": {}, "blocks": {}}
    square = rng.standard_normal((1, n_square, n_square)).astype(np.float32)
    runners = {v: gemm_runner(gemm_model(tmp / f"sq-{v}.onnx", n_square, n_square, v == "int8"), v, n_square)
               for v in ("fp32", "int8")}
    rates = inference.timed_rounds(runners, square, [1], args.rounds, args.seconds, args.min_iters, f"{n_square}^2 matmul")
    for v, r in rates.items():
        out["square"][v] = {"n": n_square, "gop_per_s": round(2 * n_square ** 3 * statistics.median(r[1]) / 1e9, 1)}
    out["square"]["int8_over_fp32"] = round(out["square"]["int8"]["gop_per_s"] / out["square"]["fp32"]["gop_per_s"], 3)
    for name in models:
        tokens, shapes = block_shapes(name)
        runners = {}
        for label, k, n in shapes:
            for v in ("fp32", "int8"):
                runners[(label, v)] = gemm_runner(gemm_model(tmp / f"{name}-{k}x{n}-{v}.onnx".replace("/", "_"), k, n,
                                                             v == "int8"), v, tokens)
        xs = {k: rng.standard_normal((max(batches), tokens, k)).astype(np.float32) for _, k, _ in shapes}
        ms = defaultdict(dict)
        for label, k, n in shapes:
            pair = {v: runners[(label, v)] for v in ("fp32", "int8")}
            rates = inference.timed_rounds(pair, xs[k], batches, args.rounds, args.seconds, args.min_iters,
                                           f"{name} {label} ({k}x{n})")
            for v, by_batch in rates.items():
                ms[label][v] = {str(b): round(b / statistics.median(r) * 1e3, 4) for b, r in by_batch.items()}
        block = {}
        for b in map(str, batches):
            fp32, int8 = (sum(ms[label][v][b] for label, _, _ in shapes) for v in ("fp32", "int8"))
            block[b] = {"fp32_ms": round(fp32, 4), "int8_ms": round(int8, 4), "int8_over_fp32": round(fp32 / int8, 3)}
        out["blocks"][name] = {"tokens": tokens, "shapes": [list(s) for s in shapes], "ms_per_call": ms, "block": block}
    return out


def profile_split(path: Path, variant: str, pixels: np.ndarray, runs: int, warmup: int, tmp: Path) -> dict:
    """Step 3: median ms per run of the matrix multiplies and of the rest (onnxruntime's profiler, one thread)."""
    session = ort_session(path, variant, threads=1, profile_prefix=str(tmp / f"profile-{variant}"))
    name = session.get_inputs()[0].name
    for _ in range(warmup + runs):
        session.run(None, {name: pixels})
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    run_spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[warmup:]
    per_run = [defaultdict(float) for _ in run_spans]
    starts = [s for s, _ in run_spans]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if 0 <= i < len(run_spans) and e["ts"] <= run_spans[i][1]:
            per_run[i][e["args"]["op_name"]] += e["dur"] / 1e3
    matmul = [sum(v for op, v in r.items() if op in MATMUL_OPS) for r in per_run]
    rest = [sum(v for op, v in r.items() if op not in MATMUL_OPS) for r in per_run]
    ops = {op: round(statistics.median(r.get(op, 0.0) for r in per_run), 3) for op in set().union(*per_run)}
    return {"matmul_ms": round(statistics.median(matmul), 3), "rest_ms": round(statistics.median(rest), 3),
            "run_ms": round(statistics.median(e - s for s, e in run_spans) / 1e3, 3),
            "ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def measure_tower(artifact: Path, batches: list[int], args, tmp: Path) -> dict:
    """Step 3 and 4 for the artifact's image tower."""
    try:
        art = load_artifact(artifact)
    except ArtifactError as err:
        raise SystemExit(f"error: {err}") from None
    if "int8" not in art.variants("image"):
        raise SystemExit(f"error: {artifact} has no int8 image tower (export it with --int8, or run `make artifact`)")
    photos = photo_paths()
    photos = (photos * (max(batches) // len(photos) + 1))[:max(batches)]
    pixels = load_pixels([str(p) for p in photos], art.preprocess)
    paths = {v: art.onnx_path("image", v) for v in ("fp32", "int8")}
    runners = {v: inference.ort_runner(p, v, 1) for v, p in paths.items()}
    rates = inference.timed_rounds(runners, pixels, batches, args.rounds, args.seconds, args.min_iters, "image tower")
    ips = {v: {str(b): round(statistics.median(r), 2) for b, r in d.items()} for v, d in rates.items()}
    ratio = {str(b): round(inference.paired_ratio({v: {str(k): r for k, r in d.items()} for v, d in rates.items()},
                                                  "int8", "fp32", str(b)), 3) for b in batches}
    profiles = {v: {str(b): profile_split(p, v, pixels[:b], max(3, args.profile_runs // b), 2, tmp) for b in batches}
                for v, p in paths.items()}
    return {"artifact": str(artifact), "model": art.manifest["model"], "images_per_s": ips, "int8_over_fp32": ratio,
            "profile": profiles}


def headroom(tower: dict, gemms: dict) -> dict:
    """Step 4, per batch: the int8/fp32 ratio expected at step 2's matmul speed-up; the matmul speed-up the
    target needs (with the int8 graph's other work as it is); the ratio with matmuls for free."""
    block = gemms["blocks"].get(tower["model"], {}).get("block")
    out = {}
    for b, fp32 in tower["profile"]["fp32"].items():
        int8 = tower["profile"]["int8"][b]
        total = fp32["matmul_ms"] + fp32["rest_ms"]
        row = {"fp32_matmul_share": round(fp32["matmul_ms"] / total, 3),
               "free_matmuls": round(total / int8["rest_ms"], 3)}
        needed = total / TARGET - int8["rest_ms"]  # ms left for the matmuls at the target
        row["matmul_speedup_for_target"] = round(fp32["matmul_ms"] / needed, 3) if needed > 0 else None
        if block:
            speedup = block[b]["int8_over_fp32"]
            row |= {"matmul_speedup": speedup,
                    "at_matmul_speedup": round(total / (fp32["matmul_ms"] / speedup + int8["rest_ms"]), 3)}
        out[b] = row
    return out


def write_markdown(report: dict, path: Path) -> None:
    cpu, gemms, tower, batches = report["cpu"], report["gemms"], report["tower"], [str(b) for b in report["batches"]]
    sq = gemms["square"]
    lines = ["# int8 headroom of the image tower on this CPU", "",
             f"Reproduce: `nice -n 5 .venv/bin/python bench/int8_headroom.py {tower['artifact']}`. One thread "
             "everywhere (the service's CPU layout runs one single-threaded worker per CPU). Target (issue 7): "
             f"int8 >= {TARGET}x fp32 for orthserve-mini.", ""]
    if report["scale"] == "smoke":
        lines += ["**SMOKE SCALE**: short timings; the figures prove the script works, nothing more.", ""]
    lines += [f"CPU: {cpu['model']}; int8 dot products: **{cpu['int8_dot']}**.", "",
              "## Matrix multiplies alone (onnxruntime, fp32 MatMul against int8 DynamicQuantizeMatMul)", "",
              f"{sq['fp32']['n']} x {sq['fp32']['n']}: fp32 {sq['fp32']['gop_per_s']} GFLOP/s, int8 "
              f"{sq['int8']['gop_per_s']} GOP/s: **{sq['int8_over_fp32']}x**.", "",
              "| model (tokens) | matrix multiply (K x N) | " + " | ".join(f"batch {b}: fp32 / int8 ms, speed-up" for b in batches)
              + " |", "|---|---|" + "---|" * len(batches)]
    for name, blk in gemms["blocks"].items():
        for label, k, n in blk["shapes"]:
            ms = blk["ms_per_call"][label]
            lines.append(f"| {name} ({blk['tokens']}) | {label} ({k} x {n}) | " + " | ".join(
                f"{ms['fp32'][b]:.3f} / {ms['int8'][b]:.3f}, {ms['fp32'][b] / ms['int8'][b]:.2f}x" for b in batches) + " |")
        lines.append(f"| {name} | **one block** | " + " | ".join(
            f"{blk['block'][b]['fp32_ms']:.3f} / {blk['block'][b]['int8_ms']:.3f}, **{blk['block'][b]['int8_over_fp32']:.2f}x**"
            for b in batches) + " |")
    lines += ["", f"## The artifact's image tower ({tower['model']}), fp32 against int8", "",
              "| | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for v in ("fp32", "int8"):
        lines.append(f"| {v} img/s (no profiler) | " + " | ".join(f"{tower['images_per_s'][v][b]:.1f}" for b in batches) + " |")
    lines.append("| **int8 / fp32 measured** | " + " | ".join(f"**{tower['int8_over_fp32'][b]:.3f}**" for b in batches) + " |")
    for v in ("fp32", "int8"):
        p = tower["profile"][v]
        lines.append(f"| {v} profile ms/run: matmuls + rest | " + " | ".join(
            f"{p[b]['matmul_ms']:.2f} + {p[b]['rest_ms']:.2f}" for b in batches) + " |")
    c = report["headroom"]
    lines.append("| fp32 time in matmuls | " + " | ".join(f"{c[b]['fp32_matmul_share']:.0%}" for b in batches) + " |")
    if "at_matmul_speedup" in c[batches[0]]:
        lines.append("| int8 / fp32 expected at the block's matmul speed-up | " + " | ".join(
            f"{c[b]['at_matmul_speedup']:.3f} ({c[b]['matmul_speedup']:.2f}x matmuls)" for b in batches) + " |")
    lines.append(f"| **matmul speed-up that {TARGET}x needs** | " + " | ".join(
        f"**{c[b]['matmul_speedup_for_target']:.2f}x**" if c[b]["matmul_speedup_for_target"] else "unreachable"
        for b in batches) + " |")
    lines.append("| int8 / fp32 with matmuls for free | " + " | ".join(f"{c[b]['free_matmuls']:.2f}" for b in batches) + " |")
    lines += ["", "Matmuls = " + ", ".join(sorted(MATMUL_OPS)) + " (the fp32 graph's Attention includes its softmax). "
              "Rest = layer norms, GELU, adds, the patch convolution (fp32 in both), reshapes. The expected ratio "
              "is an estimate, not a bound: it scales the fp32 graph's matmul time (fused attention included) by the "
              "bare block's speed-up, while the int8 graph keeps the first block's attention and the final projection "
              "in fp32 (export.towers.int8_sensitive_nodes) and fuses differently. The needed speed-up is what the "
              "fp32 graph's matmul time must shrink by, with the int8 graph's other work as measured, to reach "
              f"{TARGET}x.", "",
              "Top ops per run at the largest batch (ms):", "", "| variant | ops |", "|---|---|"]
    for v in ("fp32", "int8"):
        top = list(tower["profile"][v][batches[-1]]["ops_ms"].items())[:8]
        lines.append(f"| {v} | " + ", ".join(f"{op} {ms:.2f}" for op, ms in top) + " |")
    lines += ["", f"{report['created']}; {report['machine']}."]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [str(b) for b in report["batches"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    blocks = report["gemms"]["blocks"]
    width = 0.8 / max(1, len(blocks))
    x = np.arange(len(batches))
    for i, (name, blk) in enumerate(blocks.items()):
        left.bar(x + (i - len(blocks) / 2 + 0.5) * width, [blk["block"][b]["int8_over_fp32"] for b in batches], width,
                 label=f"{name}: one block's matmuls")
    left.plot(x, [report["tower"]["int8_over_fp32"][b] for b in batches], "ko-", label=f"{report['tower']['model']} tower, measured")
    left.axhline(TARGET, color="r", ls="--", lw=1, label=f"target {TARGET}x")
    left.axhline(report["gemms"]["square"]["int8_over_fp32"], color="gray", ls=":", lw=1,
                 label=f"{report['gemms']['square']['fp32']['n']}^2 matmul")
    left.set_xticks(x, [f"batch {b}" for b in batches])
    left.set(ylabel="int8 speed-up over fp32", title="int8 / fp32, one thread")
    left.legend(fontsize=7)
    prof = report["tower"]["profile"]
    for j, v in enumerate(("fp32", "int8")):
        per_image = [(prof[v][b]["matmul_ms"] / int(b), prof[v][b]["rest_ms"] / int(b)) for b in batches]
        xs = x + (j - 0.5) * 0.38
        right.bar(xs, [m for m, _ in per_image], 0.36, color=f"C{j}", label=f"{v} matmuls")
        right.bar(xs, [r for _, r in per_image], 0.36, bottom=[m for m, _ in per_image], color=f"C{j}", alpha=0.45,
                  label=f"{v} rest")
    right.set_xticks(x, [f"batch {b}" for b in batches])
    right.set(ylabel="ms per image (profiler)", title=f"{report['tower']['model']} image tower: where the time goes")
    right.legend(fontsize=7)
    if report["scale"] == "smoke":
        fig.suptitle("SMOKE SCALE", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="an exported artifact with an int8 image tower (make artifact)")
    parser.add_argument("--models", nargs="+", default=None, help="block shapes to time (default: orthserve-mini ViT-B-32)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--square", type=int, default=None, help="n of the n x n matmul (default 2048, --smoke 256)")
    parser.add_argument("--seconds", type=float, default=None, help="per path, size and round (default 1, --smoke 0.05)")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (--smoke 2)")
    parser.add_argument("--min-iters", type=int, default=2)
    parser.add_argument("--profile-runs", type=int, default=None, help="profiled images per batch size (default 320)")
    parser.add_argument("--smoke", action="store_true", help="short timings; results labelled smoke-scale")
    parser.add_argument("--out", type=Path, default=inference.REPO / "bench" / "results")
    args = parser.parse_args()
    args.models = args.models or ["orthserve-mini", "ViT-B-32"]
    args.square = args.square or (256 if args.smoke else 2048)
    args.seconds = args.seconds if args.seconds is not None else (0.05 if args.smoke else 1.0)
    args.rounds = args.rounds or (2 if args.smoke else 5)
    args.profile_runs = args.profile_runs or (16 if args.smoke else 320)
    if not (args.artifact / "manifest.json").is_file():
        raise SystemExit(f"error: {args.artifact}: no artifact there (manifest.json missing); `make artifact` exports "
                         "the default one to artifacts/default")
    with tempfile.TemporaryDirectory(prefix="orthserve-int8-") as tmp:
        tower = measure_tower(args.artifact, args.batches, args, Path(tmp))
        gemms = measure_gemms(args.models, args.batches, args.square, args, Path(tmp))
    report = {"scale": "smoke" if args.smoke else "full", "batches": args.batches, "cpu": inference.cpu_int8_instructions(),
              "gemms": gemms, "tower": tower, "rounds": args.rounds, "seconds_per_measurement": args.seconds,
              **inference.run_record()}
    report["headroom"] = headroom(tower, gemms)
    inference.save_results(args.out, "int8_headroom", report, write_markdown, write_chart)


if __name__ == "__main__":
    main()
