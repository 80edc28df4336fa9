"""Does the int8 model answer like fp32?  Image-embedding cosine and top-1 agreement of an artifact's int8 towers
against its fp32 towers on real photos (hymenoptera-val, Tiny-ImageNet val), with the fp32 margins of the images
that flip.  No timing, so a busy machine does not matter.

    python bench/int8_fidelity.py artifacts/default        # after make serve; writes bench/results/int8_fidelity.{json,md}

bench/inference.py reports the same figures for the models it builds, beside its timings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from server import photo_paths  # noqa: E402  (bench/ is sys.path[0])
from timing import ort_runner, run_record, threads_available  # noqa: E402

DATA = REPO.parent / "shared" / "data"
TARGETS = {"int8_cosine": 0.99, "int8_top1_agreement": 0.99}
FULL_COMMAND = "python bench/int8_fidelity.py"


def class_embeddings(text_run, art, labels: list[str], template: str = "a photo of {}.") -> np.ndarray:
    from orthserve import prompts

    emb = np.concatenate([text_run(art.tokenize(prompts.prompts(labels[i:i + 64], [template])))
                          for i in range(0, len(labels), 64)])
    return prompts.class_embeddings(emb, len(labels), 1)


def tiny_imagenet_names() -> list[str]:
    path = DATA / "tiny-imagenet" / "classnames.txt"
    if not path.is_file():
        return []
    names = [line.split(" ", 1)[1].strip() for line in path.read_text().splitlines() if " " in line]
    return list(dict.fromkeys(names))


def tiny_imagenet_photos(split: str = "val", per_class: int | None = None, last: bool = False) -> list[Path]:
    """Tiny-ImageNet's real photos of ``split`` (64 px; val has 25 per class here): ``per_class`` of each class in
    sorted order, the first ones or with ``last`` the last ones."""
    root = DATA / "tiny-imagenet" / split
    if not root.is_dir():
        return []
    photos = [sorted(f for f in c.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
              for c in sorted(d for d in root.iterdir() if d.is_dir())]
    return [p for ps in photos for p in (ps[-per_class:] if last and per_class else ps[:per_class])]


def fidelity_image_sets(photos: list[Path], tiny_per_class: int | None) -> dict[str, tuple[list[Path], list[str]]]:
    """Image set -> (real photos, label sets to score them with).  The 153 hymenoptera photos are few
    (one flip = 0.65 points of agreement), so Tiny-ImageNet's val photos are scored as well."""
    sets = {"hymenoptera-val": (photos, ["ants/bees", "tiny-imagenet 202 names"])}
    tiny = tiny_imagenet_photos("val", tiny_per_class) if tiny_per_class != 0 else []
    if tiny:
        sets["tiny-imagenet val"] = (tiny, ["tiny-imagenet 202 names"])
    return sets


def top_two_margins(scores: np.ndarray) -> np.ndarray:
    """Per row, best score minus second best (cosines): how near a tie the fp32 answer is.  An image flips
    only if int8 moves its unit embedding by more than its margin along the two classes' difference; at
    embedding cosine c the move is sqrt(2 (1 - c)) long (0.0063 at 0.99998), so flips should be near-ties."""
    best_two = np.sort(scores, axis=1)[:, -2:]
    return best_two[:, 1] - best_two[:, 0]


def int8_fidelity(art, threads: int, image_sets: dict[str, tuple[list[Path], list[str]]]) -> dict:
    """int8 against fp32 on real photos, per image set: image-embedding cosine; top-1 agreement with each
    label set, end to end (int8 image and text towers) and with the int8 image tower only (what
    ``ORTHSERVE_INT8=1`` serves)."""
    from orthserve.preprocess import load_pixels

    labels = {"ants/bees": ["ants", "bees"], "tiny-imagenet 202 names": tiny_imagenet_names()}
    image = {v: ort_runner(art.onnx_path("image", v), v, threads) for v in ("fp32", "int8")}
    text = {v: ort_runner(art.onnx_path("text", v), v, threads) for v in ("fp32", "int8")}
    classes = {name: {v: class_embeddings(text[v], art, names) for v in ("fp32", "int8")}
               for name, names in labels.items() if names}
    out = {}
    for set_name, (paths, label_sets) in image_sets.items():
        pixels = load_pixels([str(p) for p in paths], art.preprocess)
        img = {v: np.concatenate([image[v](pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
               for v in ("fp32", "int8")}
        cos = (img["fp32"] * img["int8"]).sum(1) / (np.linalg.norm(img["fp32"], axis=1)
                                                    * np.linalg.norm(img["int8"], axis=1))
        row = {"images": len(paths), "image_cosine_mean": float(cos.mean()), "image_cosine_min": float(cos.min()),
               "label_sets": {}}
        for label_set in (n for n in label_sets if n in classes):
            cls = classes[label_set]
            scores_fp32 = img["fp32"] @ cls["fp32"].T
            top_fp32 = scores_fp32.argmax(1)
            image_only_flips = (img["int8"] @ cls["fp32"].T).argmax(1) != top_fp32
            margins = top_two_margins(scores_fp32 / np.linalg.norm(img["fp32"], axis=1, keepdims=True))
            row["label_sets"][label_set] = {
                "classes": len(labels[label_set]),
                "top1_agreement_end_to_end": float(np.mean((img["int8"] @ cls["int8"].T).argmax(1) == top_fp32)),
                "top1_agreement_image_only": float(np.mean(~image_only_flips)),
                "class_embedding_cosine_min": float((cls["fp32"] * cls["int8"]).sum(1).min()),
                "fp32_margin_median": float(np.median(margins)),
                "fp32_margins_of_flips": sorted(float(m) for m in margins[image_only_flips]),
            }
        out[set_name] = row
    return out


def fidelity_verdicts(model: str, fidelity: dict) -> list[dict]:
    """The issue's int8 fidelity targets, per image set.  The service's int8 option quantizes the image
    tower only, so agreement is judged on that column (end to end is reported beside it)."""
    verdicts = []
    for set_name, fid in fidelity.items():
        verdicts.append({"model": model, "target": f"int8 image cosine (mean) >= {TARGETS['int8_cosine']} ({set_name})",
                         "value": round(fid["image_cosine_mean"], 5), "pass": fid["image_cosine_mean"] >= TARGETS["int8_cosine"],
                         "note": f"min over {fid['images']} images {fid['image_cosine_min']:.5f}"})
        for label_set, figures in fid["label_sets"].items():
            value = figures["top1_agreement_image_only"]
            verdicts.append({"model": model, "target": f"int8 image tower top-1 agreement >= "
                             f"{TARGETS['int8_top1_agreement']:.0%} ({set_name}, {label_set})", "value": round(value, 4),
                             "pass": value >= TARGETS["int8_top1_agreement"],
                             "note": f"{fid['images']} images; both towers int8: {figures['top1_agreement_end_to_end']:.2%}"})
    return verdicts


def fidelity_table(results: list[dict]) -> list[str]:
    """One row per image set and label set.  The margins column shows how near a tie the fp32 answers of the
    images that the int8 image tower flips were (fp32 top-1 minus top-2 cosine), beside the set's median."""
    lines = ["| model | image set | images | image cosine mean / min | label set | top-1 agreement, int8 image tower "
             "| both towers int8 | fp32 top-1 margin of the flipped images (all images) |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for set_name, fid in res["int8_fidelity"].items():
            for label_set, f in fid["label_sets"].items():
                flips = f.get("fp32_margins_of_flips")
                margins = "" if flips is None else (
                    f"{len(flips)} flips, largest {max(flips, default=0):.4f} (median {f['fp32_margin_median']:.4f})")
                lines.append(f"| {res['model']} ({res['pretrained']}) | {set_name} | {fid['images']} | "
                             f"{fid['image_cosine_mean']:.5f} / {fid['image_cosine_min']:.5f} | {label_set} | "
                             f"{f['top1_agreement_image_only']:.2%} | {f['top1_agreement_end_to_end']:.2%} | {margins} |")
    return lines


def fidelity_only(artifact: Path, threads: int, photos: list[Path], args) -> None:
    """int8 fidelity of an existing artifact: int8_fidelity.{json,md} in --out."""
    from orthserve.artifact import ArtifactError, load_artifact

    try:
        art = load_artifact(artifact)
    except ArtifactError as err:
        raise SystemExit(f"error: {err}") from None
    if "int8" not in art.variants("image") or "int8" not in art.variants("text"):
        raise SystemExit(f"{artifact}: no int8 towers (export it with --int8)")
    started = time.perf_counter()
    fidelity = int8_fidelity(art, threads, fidelity_image_sets(photos, args.tiny_per_class))
    model = art.manifest["model"]
    result = {"model": model, "pretrained": art.manifest.get("pretrained"), "artifact": str(artifact),
              "int8_fidelity": fidelity}
    verdicts = fidelity_verdicts(model, fidelity)
    report = {"results": [result], "verdicts": verdicts, "targets": TARGETS,
              "seconds": round(time.perf_counter() - started, 1), **run_record()}
    lines = [f"# int8 fidelity of `{artifact}` ({model}) on real photos", "",
             f"Reproduce: `{FULL_COMMAND} {artifact}`", "",
             "int8 = the artifact's dynamically quantized towers (onnxruntime `quantize_dynamic`, per-channel 7-bit int8 "
             "weights; the first attention's projections and the final projection stay fp32); reference = its fp32 towers. Agreement = same top-1 class as fp32 with the same label set; "
             "`ORTHSERVE_INT8=1` serves the int8 image tower with the fp32 text tower.", "",
             *fidelity_table([result]), "", "| target | value | verdict |", "|---|---|---|"]
    lines += [f"| {v['target']} | {v['value']} | {'PASS' if v['pass'] else 'FAIL'} ({v['note']}) |" for v in verdicts]
    lines += ["", f"{report['created']}; {report['machine']}; {report['seconds']} s."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8_fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "int8_fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="an exported artifact with int8 towers (export --int8)")
    parser.add_argument("--accuracy-images", type=int, default=None, help="hymenoptera photos (default: all)")
    parser.add_argument("--tiny-per-class", type=int, default=None,
                        help="Tiny-ImageNet val photos per class (default: all 25; 0: none)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all CPUs)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    photos = photo_paths()[:args.accuracy_images]
    fidelity_only(args.artifact, args.threads or threads_available(), photos, args)


if __name__ == "__main__":
    main()
