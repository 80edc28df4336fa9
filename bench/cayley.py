"""Exact Cayley transform candidates side by side: time, operator count, orthogonality, agreement with a solve.

    python bench/cayley.py                      # ViT-B-16's rotation groups (4 blocks), on CPU and on CUDA if any
    python bench/cayley.py --block-size 32      # PEFT's default block size instead
    python bench/cayley.py --smoke              # tiny shapes (the tests run this)

One "step" of a candidate computes the rotation blocks of every adapted layer of both towers (the FFN linears,
grouped by block size as ``orthserve.fast_rotations`` groups them) and back-propagates a random upstream
gradient through them: the Cayley work of one training step. Candidates:

  solve-per-layer    torch.linalg.solve(I - Q, I + Q), one call per layer (the code before the batched kernels)
  lu-batched         torch.linalg.inv_ex, one call per block size; backward two matmuls (orthserve "lu")
  cholesky-batched   (I - Q)^-1 = (I - Q^2)^-1 (I + Q), I - Q^2 symmetric positive definite: cholesky_ex + solve
  newton-fp32        Newton-Schulz iterations, all fp32 (orthserve "newton" on CPU)
  newton-bf16        the same with the first iterations in bf16, the last two fp32 (orthserve "newton" on GPU)
  neumann-5          the 5-term Neumann series (PEFT's default; only approximately orthogonal)

Figures: median seconds per step over interleaved rounds, profiler operator calls per step (CPU ops; on CUDA
also GPU kernels), max |R^T R - I| and max |R - R_solve|. Generators are random with the given spectral norm
|Q|_2 (``--spectral``). Results: cayley_<device>.{json,md} in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from timing import synchronize  # noqa: E402
from orthserve.adapters.cayley import cayley, newton_inverse, orthogonality_error, skew  # noqa: E402

# (in_features, layers) of the orthogonally adapted linears of ViT-B-16: image c_fc, c_proj; text c_fc, c_proj
VIT_B16 = [(768, 12), (3072, 12), (512, 12), (2048, 12)]
SMOKE = [(64, 2), (256, 2)]


def _eye(q: torch.Tensor) -> torch.Tensor:
    return torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)


def cholesky_cayley(q: torch.Tensor) -> torch.Tensor:
    eye = _eye(q)
    factor = torch.linalg.cholesky_ex(eye - q @ q)[0]
    return 2 * torch.cholesky_solve(eye + q, factor) - eye


def newton_cayley(low: torch.dtype | None):
    return lambda q: 2 * newton_inverse(q, low_dtype=low) - _eye(q)


CANDIDATES = {
    "solve-per-layer": None,  # per layer; handled in run_step
    "lu-batched": lambda q: cayley(q, "exact", kernel="lu"),
    "cholesky-batched": cholesky_cayley,
    "newton-fp32": newton_cayley(None),
    "newton-bf16": newton_cayley(torch.bfloat16),
    "neumann-5": lambda q: cayley(q, "neumann", 5),
}


def make_groups(layers: list[tuple[int, int]], blocks: int | None, block_size: int | None, spectral: float,
                device: torch.device) -> dict[int, list[torch.Tensor]]:
    """Per block size, one generator ``[n, b, b]`` per adapted layer, scaled to the spectral norm asked for."""
    groups: dict[int, list[torch.Tensor]] = {}
    seed = 0
    for in_features, count in layers:
        b = block_size or in_features // blocks
        n = in_features // b
        for _ in range(count):
            seed += 1
            a = torch.randn(n, b, b, generator=torch.Generator().manual_seed(seed))
            a = a * (spectral / torch.linalg.matrix_norm(skew(a), ord=2).max())
            groups.setdefault(b, []).append(a.to(device).requires_grad_(True))
    return groups


def run_step(name: str, groups: dict[int, list[torch.Tensor]], upstream: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """One candidate's forward and backward over every group; returns the rotation blocks per group."""
    out = []
    for b, generators in groups.items():
        if name == "solve-per-layer":
            eye = torch.eye(b, device=generators[0].device)
            blocks = torch.cat([torch.linalg.solve(eye - skew(g), eye + skew(g)) for g in generators])
        else:
            blocks = CANDIDATES[name](skew(torch.cat(generators)))
        (blocks * upstream[b]).sum().backward()
        out.append(blocks.detach())
    return out


def measure(device: torch.device, layers, blocks, block_size, spectral: float, rounds: int,
            candidates: list[str]) -> dict:
    groups = make_groups(layers, blocks, block_size, spectral, device)
    upstream = {b: torch.randn(sum(g.shape[0] for g in gs), b, b, generator=torch.Generator().manual_seed(b)).to(device)
                for b, gs in groups.items()}
    reference = [blocks.double() for blocks in run_step("solve-per-layer", groups, upstream)]
    rows = {}
    for name in candidates:
        result = run_step(name, groups, upstream)  # warm-up, and the accuracy figures
        rows[name] = {"orthogonality_error": max(float(orthogonality_error(r)) for r in result),
                      "max_diff_from_solve": max(float((r.double() - ref).abs().max()) for r, ref in zip(result, reference)),
                      "seconds": []}
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            run_step(name, groups, upstream)
            synchronize(device)
        events = prof.events()
        rows[name]["cpu_ops"] = sum(1 for e in events if e.name.startswith("aten::"))
        rows[name]["gpu_kernels"] = (sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
                                     if device.type == "cuda" else None)
    for r in range(rounds):
        for name in (candidates if r % 2 == 0 else candidates[::-1]):
            synchronize(device)
            start = time.perf_counter()
            run_step(name, groups, upstream)
            synchronize(device)
            rows[name]["seconds"].append(time.perf_counter() - start)
    for row in rows.values():
        row["median_s"] = statistics.median(row["seconds"])
    base = rows["solve-per-layer"]["median_s"]
    for row in rows.values():
        row["x_solve_per_layer"] = row["median_s"] / base
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "spectral_norm": spectral, "rounds": rounds,
            "groups": {str(b): [tuple(g.shape) for g in gs][:1] + [len(gs)] for b, gs in groups.items()},
            "candidates": rows}


def markdown(report: dict) -> str:
    lines = [f"# Exact Cayley transform candidates ({report['shape']})", "",
             f"Generated by `{report['command']}` on {report['created']}; torch {report['torch']}. One step: the "
             "rotation blocks of every adapted layer, forward and backward. Medians of interleaved rounds.", ""]
    for run in report["runs"]:
        lines += [f"## {run['device_name']} ({run['device']}, {run['threads']} threads), |Q|_2 = {run['spectral_norm']}",
                  "", "| candidate | s / step | x solve per layer | CPU ops | GPU kernels | max abs(R^T R - I) | "
                  "max abs(R - R_solve) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, row in run["candidates"].items():
            kernels = "-" if row["gpu_kernels"] is None else f"{row['gpu_kernels']:,}"
            lines.append(f"| {name} | {row['median_s']:.4f} | {row['x_solve_per_layer']:.2f} | {row['cpu_ops']:,} | "
                         f"{kernels} | {row['orthogonality_error']:.1e} | {row['max_diff_from_solve']:.1e} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda where there is one")
    p.add_argument("--blocks", type=int, default=4, help="blocks per rotation (the paper's 4)")
    p.add_argument("--block-size", type=int, default=None, help="a fixed block side instead of --blocks")
    p.add_argument("--spectral", type=float, nargs="+", default=[1.0], help="|Q|_2 of the generators")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--candidates", nargs="+", default=None, choices=list(CANDIDATES),
                   help="default: all; on a CPU without bf16 matmul units newton-bf16 is slow and not the CPU's kernel")
    p.add_argument("--smoke", action="store_true", help="orthserve-tiny's shapes, 2 rounds")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    layers, rounds = (SMOKE, 2) if args.smoke else (VIT_B16, args.rounds)
    shape = f"{'smoke: tiny shapes' if args.smoke else 'ViT-B-16 FFN linears, both towers'}, " + (
        f"block size {args.block_size}" if args.block_size else f"{args.blocks} blocks")
    runs = []
    for device in devices:
        for spectral in args.spectral:
            runs.append(measure(torch.device(device), layers, None if args.block_size else args.blocks,
                                args.block_size, spectral, rounds, args.candidates or list(CANDIDATES)))
            print(markdown({"shape": shape, "command": "", "created": "", "torch": torch.__version__,
                            "runs": runs[-1:]}), flush=True)
    report = {"shape": shape, "command": "python bench/cayley.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "cayley_smoke" if args.smoke else f"cayley_{'_'.join(devices)}" + (f"_bs{args.block_size}" if args.block_size else "")
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{name}.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
