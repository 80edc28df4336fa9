"""Preprocessing cost per image on the real photos of ../shared/data/hymenoptera-val (orthserve.preprocess).

    nice -n 5 .venv/bin/python bench/preprocess_cost.py              # all photos, 224 and 64 px, 3 passes
    nice -n 5 .venv/bin/python bench/preprocess_cost.py --smoke      # 40 photos, 1 pass

Per image, single thread, bytes already in memory:
  decode     orthserve.preprocess.decode_image (Pillow decode, EXIF transpose, RGB)
  resize     resize_shorter_side + center_crop (Pillow bicubic), the first half of preprocess()
  normalize  the rest of preprocess(): to float32, scale, mean/std, HWC -> CHW  (= preprocess() - resize)
  total      decode_image + preprocess, what the service runs per upload
Median over passes per image, then mean / median / p90 over images.  Results: bench/results/preprocess_cost.json,
.md and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from server import machine_description, photo_paths  # noqa: E402  (bench/ is sys.path[0])

from orthserve.preprocess import (PreprocessSpec, center_crop, decode_image, preprocess,  # noqa: E402
                                  resize_shorter_side)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def measure(datas: list[bytes], spec: PreprocessSpec, passes: int) -> dict:
    per_image = {"decode": [], "resize": [], "preprocess": [], "total": []}
    for data in datas:
        runs = {k: [] for k in per_image}
        for _ in range(passes):
            t0 = time.perf_counter()
            image = decode_image(data)
            t1 = time.perf_counter()
            center_crop(resize_shorter_side(image, spec.image_size, spec.interpolation), spec.image_size)
            t2 = time.perf_counter()
            preprocess(image, spec)
            t3 = time.perf_counter()
            runs["decode"].append(t1 - t0)
            runs["resize"].append(t2 - t1)
            runs["preprocess"].append(t3 - t2)
            runs["total"].append((t1 - t0) + (t3 - t2))
        for k, v in runs.items():
            per_image[k].append(statistics.median(v))
    per_image["normalize"] = [max(p - r, 0.0) for p, r in zip(per_image["preprocess"], per_image["resize"])]

    def stats(v: list[float]) -> dict:
        ms = np.asarray(v) * 1000
        return {"mean_ms": round(float(ms.mean()), 3), "median_ms": round(float(np.median(ms)), 3),
                "p90_ms": round(float(np.percentile(ms, 90)), 3), "max_ms": round(float(ms.max()), 3)}

    out = {k: stats(per_image[k]) for k in ("decode", "resize", "normalize", "total")}
    out["images_per_s_one_thread"] = round(1.0 / statistics.mean(per_image["total"]), 1)
    out["per_image_total_ms"] = [round(x * 1000, 3) for x in per_image["total"]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64], help="image_size (224: ViT-B, 64: orthserve-mini/tiny)")
    parser.add_argument("--passes", type=int, default=None, help="timed passes per image (default 3, --smoke 1)")
    parser.add_argument("--images", type=int, default=None, help="photos (default all, --smoke 40)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    passes = args.passes or (1 if args.smoke else 3)
    paths = photo_paths(args.images or (40 if args.smoke else None))
    datas = [p.read_bytes() for p in paths]
    from PIL import Image

    dims = [Image.open(p).size for p in paths]
    pixels = np.asarray([w * h for w, h in dims])
    for data in datas[:3]:  # warm-up (imports, first decode)
        decode_image(data)
    results = {}
    for size in args.sizes:
        spec = PreprocessSpec(size, CLIP_MEAN, CLIP_STD)
        results[str(size)] = measure(datas, spec, passes)
        print(f"{size} px: total {results[str(size)]['total']['mean_ms']:.2f} ms/image mean "
              f"(decode {results[str(size)]['decode']['mean_ms']:.2f}, resize {results[str(size)]['resize']['mean_ms']:.2f}, "
              f"normalize {results[str(size)]['normalize']['mean_ms']:.2f}); "
              f"{results[str(size)]['images_per_s_one_thread']} img/s on one thread", flush=True)
    report = {"scale": "smoke" if args.smoke else "full", "images": len(paths), "passes": passes,
              "photo_megapixels": {"mean": round(float(pixels.mean()) / 1e6, 3), "max": round(float(pixels.max()) / 1e6, 3)},
              "photo_bytes_mean": int(np.mean([len(d) for d in datas])), "results": results,
              "load_average": os.getloadavg(), "machine": machine_description(),
              "command": " ".join(sys.argv), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preprocess_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Preprocessing cost per image (orthserve.preprocess, one thread)", ""]
    if args.smoke:
        lines += [f"**SMOKE SCALE**: {len(paths)} photos, {passes} pass, shared busy 2-core machine (load average "
                  f"{report['load_average'][0]:.1f}). Full run: `nice -n 5 .venv/bin/python bench/preprocess_cost.py`.", ""]
    lines += [f"{len(paths)} photos from hymenoptera-val, {report['photo_megapixels']['mean']} MP on average "
              f"(max {report['photo_megapixels']['max']}), {report['photo_bytes_mean'] // 1024} KiB JPEG on average; "
              f"median of {passes} pass(es) per image.", "",
              "| image_size | step | mean ms | median ms | p90 ms | max ms |", "|---|---|---|---|---|---|"]
    for size, r in results.items():
        for step in ("decode", "resize", "normalize", "total"):
            s = r[step]
            lines.append(f"| {size} | {step} | {s['mean_ms']} | {s['median_ms']} | {s['p90_ms']} | {s['max_ms']} |")
    lines += ["", "| image_size | images/s on one thread (decode + preprocess) |", "|---|---|"]
    lines += [f"| {size} | {r['images_per_s_one_thread']} |" for size, r in results.items()]
    lines += ["", "decode = decode_image; resize = resize_shorter_side + center_crop; normalize = preprocess() minus "
              "resize (float conversion, mean/std, transpose); total = decode_image + preprocess.",
              f"{report['created']}; {report['machine']}."]
    (args.out / "preprocess_cost.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = ("decode", "resize", "normalize")
    bottom = np.zeros(len(results))
    for step in steps:
        vals = np.asarray([r[step]["mean_ms"] for r in results.values()])
        ax.bar([f"{s} px" for s in results], vals, bottom=bottom, label=step)
        bottom += vals
    ax.set(ylabel="ms per image (mean)", title="decode + preprocess per photo" + (" (SMOKE SCALE)" if args.smoke else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "preprocess_cost.png", dpi=100)
    plt.close(fig)
    print(f"wrote {args.out / 'preprocess_cost.json'}, .md, .png")


if __name__ == "__main__":
    main()
