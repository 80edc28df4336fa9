"""Which matrix multiplies int8 hurts most: top-1 agreement with fp32 when one of them stays fp32.

    nice -n 5 .venv/bin/python bench/int8_sensitivity.py artifacts/default     # after `make artifact`

For the artifact's fp32 image tower (no timing, so a busy machine does not matter):
  1. every weight matrix multiply quantized (export.towers.to_int8 with nothing kept in fp32), then each alone
     kept in fp32 (an Attention node's packed query/key/value projection counts as one): top-1 agreement
     with the fp32 tower on Tiny-ImageNet's val photos with its 202 class names, batch 32;
  2. the export's choice (export.towers.int8_sensitive_nodes) and a few groups, on the val photos and on
     held-out Tiny-ImageNet train photos (the last ones of each class), at batch 1, 8 and 32: dynamic int8
     scales each batch's activations as a whole, so agreement moves with the batch.
Why: a single flip is 0.02% of 5,000 photos, so only a layer that moves agreement well beyond a few flips
is worth its fp32 cost.  Results: bench/results/int8_sensitivity.json, .md and .png.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from inference import cpu_int8_instructions  # noqa: E402
from int8_fidelity import DATA, class_embeddings, tiny_imagenet_names, tiny_imagenet_photos  # noqa: E402
from timing import ort_runner, run_record, save_results  # noqa: E402

from export.towers import ATTENTION_OPS, int8_sensitive_nodes, to_int8  # noqa: E402
from orthserve.artifact import load_artifact  # noqa: E402
from orthserve.preprocess import load_pixels  # noqa: E402

TARGET = 0.99


def weight_roles(graph: onnx.GraphProto) -> dict[str, str]:
    """Name of each node with a weight matrix (MatMul, Gemm, Attention) -> its role in the transformer
    ("block 0 query/key/value", "block 0 attention out", "block 0 MLP in", ..., "projection"), in graph order.
    An ``Attention`` node holds a block's query, key and value projections as one packed matrix multiply."""
    producers = {out: node.name for node in graph.node for out in node.output}
    roles: dict[str, str] = {}
    attentions = [n for n in graph.node if n.op_type in ATTENTION_OPS]
    for i, attention in enumerate(attentions):
        if attention.op_type == "Attention":
            roles[attention.name] = f"block {i} query/key/value"
        for name, role in zip(attention.input[:3], ("query", "key", "value")):
            if attention.op_type == "MultiHeadAttention" and name in producers:
                roles[producers[name]] = f"block {i} {role}"
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    block, mlp_seen = -1, 0
    for node in graph.node:
        if node.op_type in ATTENTION_OPS:
            block, mlp_seen = block + 1, 0
        elif node.op_type in ("MatMul", "Gemm") and node.name not in roles:
            if attentions and block >= 0 and attentions[block].output[0] in node.input:
                roles[node.name] = f"block {block} attention out"
            elif node.name == matmuls[-1].name:
                roles[node.name] = "projection"
            else:
                roles[node.name] = f"block {block} MLP {('in', 'out')[min(mlp_seen, 1)]}"
                mlp_seen += 1
    return {n.name: roles[n.name] for n in graph.node if n.name in roles}


class Agreement:
    """Top-1 agreement of an int8 image tower with the artifact's fp32 one on fixed photos and class names."""

    def __init__(self, art, pixels: np.ndarray, classes: np.ndarray, threads: int) -> None:
        self.pixels, self.classes, self.threads = pixels, classes, threads
        self.reference = self.top1(art.onnx_path("image", "fp32"), "fp32", 32)  # fp32 does not depend on the batch

    def top1(self, path: Path, variant: str, batch: int) -> np.ndarray:
        run = ort_runner(path, variant, self.threads)
        emb = np.concatenate([run(self.pixels[i:i + batch]) for i in range(0, len(self.pixels), batch)])
        return (emb @ self.classes.T).argmax(1)

    def __call__(self, path: Path, batch: int) -> float:
        return float(np.mean(self.top1(path, "int8", batch) == self.reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="an exported artifact directory (e.g. artifacts/default)")
    parser.add_argument("--val-per-class", type=int, default=None, help="Tiny-ImageNet val photos per class (default: all 25)")
    parser.add_argument("--heldout-per-class", type=int, default=15, help="held-out train photos per class")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    start = time.perf_counter()
    art = load_artifact(args.artifact)
    names = tiny_imagenet_names()
    if not names:
        sys.exit(f"error: no Tiny-ImageNet class names under {DATA / 'tiny-imagenet'}")
    classes = class_embeddings(ort_runner(art.onnx_path("text", "fp32"), "fp32", args.threads), art, names)
    photo_sets = {"tiny-imagenet val": tiny_imagenet_photos("val", args.val_per_class),
                  # the last train photos of each class, never used to choose the layers
                  "tiny-imagenet train, held out": tiny_imagenet_photos("train", args.heldout_per_class, last=True)}
    print("preprocessing photos ...", flush=True)
    scorers = {name: Agreement(art, load_pixels([str(p) for p in paths], art.preprocess), classes, args.threads)
               for name, paths in photo_sets.items()}
    graph = onnx.load(str(art.onnx_path("image", "fp32"))).graph
    roles = weight_roles(graph)
    chosen = int8_sensitive_nodes(graph)
    first_block = [n for n, r in roles.items() if r.startswith("block 0 ")]
    groups = {"none (every weight int8)": [], "export's choice: " + ", ".join(roles[n] for n in chosen): chosen,
              "projection only": [n for n, r in roles.items() if r == "projection"],
              "block 0 (every weight) + projection": first_block + [n for n, r in roles.items() if r == "projection"]}
    val = scorers["tiny-imagenet val"]
    with tempfile.TemporaryDirectory(prefix="orthserve-int8-") as tmp:
        graph_path = Path(tmp) / "image.int8.onnx"
        print(f"one weight matrix multiply in fp32 at a time ({len(roles)}) ...", flush=True)
        single = {"none": val(to_int8(art.onnx_path("image", "fp32"), graph_path, keep_fp32=[]), 32)}
        for node, role in roles.items():
            single[role] = val(to_int8(art.onnx_path("image", "fp32"), graph_path, keep_fp32=[node]), 32)
            print(f"  {role:28s} {single[role]:.4f}", flush=True)
        print("groups at batch 1, 8, 32 ...", flush=True)
        group_rows = {}
        for label, nodes in groups.items():
            to_int8(art.onnx_path("image", "fp32"), graph_path, keep_fp32=nodes)
            group_rows[label] = {name: {str(b): scorer(graph_path, b) for b in (1, 8, 32)} for name, scorer in scorers.items()}
            print(f"  {label}: {group_rows[label]}", flush=True)
    report = {"artifact": str(args.artifact), "model": art.manifest.get("model"), "classes": len(names),
              "photos": {name: len(paths) for name, paths in photo_sets.items()}, "target": TARGET,
              "single_layer_fp32_batch32_val": single, "groups": group_rows, "export_choice": [roles[n] for n in chosen],
              "seconds": round(time.perf_counter() - start, 1), "cpu": cpu_int8_instructions(), **run_record()}
    save_results(args.out, "int8_sensitivity", report, write_markdown, write_chart)


def write_markdown(report: dict, path: Path) -> None:
    photos = report["photos"]
    lines = [f"# int8 sensitivity of `{report['artifact']}` ({report['model']}) per matrix multiply", "",
             "Reproduce: `nice -n 5 .venv/bin/python bench/int8_sensitivity.py " + report["artifact"] + "`", "",
             f"Top-1 agreement of the int8 image tower with the fp32 one, {report['classes']} Tiny-ImageNet class names "
             "(fp32 text tower). int8 = onnxruntime dynamic quantization (per-channel 7-bit int8 weights, per-batch activation "
             "scales), the export's `to_int8`. One flip = "
             f"{1 / photos['tiny-imagenet val']:.2%} of the {photos['tiny-imagenet val']} val photos.", "",
             "## Groups kept in fp32", "", "| kept in fp32 | photos | batch 1 | batch 8 | batch 32 |", "|---|---|---|---|---|"]
    for label, rows in report["groups"].items():
        for name, row in rows.items():
            lines.append(f"| {label} | {name} ({photos[name]}) | " + " | ".join(f"{row[b]:.2%}" for b in ("1", "8", "32")) + " |")
    lines += ["", f"## One matrix multiply kept in fp32 (val photos, batch 32)", "", "| kept in fp32 | top-1 agreement |",
              "|---|---|"]
    lines += [f"| {role} | {value:.2%} |" for role, value in report["single_layer_fp32_batch32_val"].items()]
    cpu = report.get("cpu")
    lines += ["", (f"CPU: {cpu['model']}, int8 dot products: {cpu['int8_dot']}. " if cpu else "")
              + f"{report['created']}; {report['machine']}; {report['seconds']} s."]
    path.write_text("\n".join(lines) + "\n")


def write_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = dict(report["single_layer_fp32_batch32_val"])
    none = single.pop("none")
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(single)), 4))
    ax.bar(range(len(single)), [100 * v for v in single.values()], color="tab:blue")
    ax.axhline(100 * none, color="gray", linestyle="--", label=f"every weight int8 ({none:.2%})")
    ax.axhline(100 * report["target"], color="tab:red", label=f"target {report['target']:.0%}")
    ax.set_xticks(range(len(single)), list(single), rotation=90, fontsize=7)
    low = min([none, report["target"], *single.values()])
    ax.set_ylim(100 * low - 0.3, 100 * max([report["target"], *single.values()]) + 0.3)
    ax.set_ylabel("top-1 agreement with fp32 (%)")
    ax.set_title("int8 image tower: one matrix multiply kept in fp32 (Tiny-ImageNet val, batch 32)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
