"""Shared helpers of the accuracy benchmarks (``bench/base_to_new.py``, ``bench/transfer.py``, ``bench/fewshot_curve.py``).

Everything trains and evaluates through ``training.finetune.main`` (the training CLI, run
in process), so the benchmarks measure exactly what a user of the CLI gets.  This module
only prepares folders, maps benchmark method names onto CLI flags, runs / reuses runs and
aggregates, tabulates and plots their ``metrics.json``.

Folders.  The CLI wants an ImageFolder whose class list is exactly the benchmark's, with
the same classes in ``--data`` and ``--test-data``.  :func:`class_view` builds such a
folder of *symlinks* to the class folders (images are never copied, and never into the
repository).  :func:`styled_copy` renders a whole source ImageFolder, class by class and
once, through a fixed style transform into a cache (default ``~/.cache/orthserve/bench``).

Style ``gray`` (version 1), the domain shift of the base-to-new benchmark, applied to
every train and test image: ``ImageOps.grayscale`` (PIL "L", ITU-R 601-2 luma), saved as an
8-bit grayscale PNG.  orthserve-mini leans on colour: its zero-shot top-1 drops from about 19%
to about 5% (100-way, chance 1%).

Style ``edges`` (version 1), a harder shift (``--style edges``):

    grayscale (PIL "L") -> ImageFilter.FIND_EDGES (3x3 Laplacian-like kernel)
    -> ImageOps.autocontrast(cutoff=1) -> ImageOps.invert -> saved as 8-bit grayscale PNG

i.e. dark edge lines on a white background: colour and texture are gone, only outlines
are left; orthserve-mini is at chance on it zero-shot.  The image size is unchanged (64x64 for Tiny-ImageNet).

Style ``blur`` (version 1), a heavy optical blur that keeps colour: ``ImageFilter.GaussianBlur``
with radius 4% of the shorter side (2.56 px at 64x64), saved as an RGB PNG.

The domain-generalization benchmark (``bench/transfer.py``) trains on the original photos and
tests on all three styles.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA = REPO.parent / "shared" / "data"
DEFAULT_CACHE = Path(os.environ.get("ORTHSERVE_BENCH_CACHE", Path.home() / ".cache" / "orthserve" / "bench"))
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
log = logging.getLogger("bench")

# Benchmark method name -> training CLI flags.  "reg" = the OrthCR KL terms (lambda1 1.5,
# lambda2 1, the CLI defaults); "noreg" sets both to 0.  With --cutout none the OrthCR objective's
# second view is the image itself (so CE and KL are each counted twice; same cost as with Cutout).
METHODS: dict[str, list[str]] = {
    "zeroshot": ["--method", "zeroshot"],
    "taskres": ["--method", "taskres"],
    "lora": ["--method", "lora"],
    "full": ["--method", "full"],
    "aoft": ["--method", "aoft"],
    "orthcr-noreg": ["--method", "orthcr", "--lambda1", "0", "--lambda2", "0", "--cutout", "none"],
    "orthcr-reg": ["--method", "orthcr", "--cutout", "none"],
    "orthcr-reg-cutout": ["--method", "orthcr", "--cutout", "random"],
    "orthcr-reg-attentive": ["--method", "orthcr", "--cutout", "attentive"],
    # block-size variants of the CLI's default OrthCR (KL + random Cutout): the paper's 4 blocks per
    # rotation (the CLI's --blocks default) against fixed block sides (PEFT OFT's default is 32)
    "orthcr-bs32": ["--method", "orthcr", "--cutout", "random", "--block-size", "32"],
    "orthcr-bs16": ["--method", "orthcr", "--cutout", "random", "--block-size", "16"],
}
PAPER_METHODS = [m for m in METHODS if not m.startswith("orthcr-bs")]  # the papers' comparison
METHOD_LABELS = {
    "zeroshot": "zero-shot",
    "taskres": "TaskRes",
    "lora": "LoRA",
    "full": "full fine-tuning",
    "aoft": "AOFT",
    "orthcr-noreg": "OrthCR, no regularization (lambda1=lambda2=0, no Cutout)",
    "orthcr-reg": "OrthCR + KL regularization (no Cutout)",
    "orthcr-reg-cutout": "OrthCR + KL + random Cutout",
    "orthcr-reg-attentive": "OrthCR + KL + attentive Cutout",
    "orthcr-bs32": "OrthCR + KL + random Cutout, blocks of 32",
    "orthcr-bs16": "OrthCR + KL + random Cutout, blocks of 16",
}


# --------------------------------------------------------------------------- folders

def class_folders(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"error: data folder {root} does not exist")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def common_classes(train_root: Path, test_root: Path | None) -> tuple[list[str], list[str]]:
    """Sorted classes present in both folders, and those of the training folder missing from the test folder."""
    train = class_folders(train_root)
    if test_root is None:
        return train, []
    test = set(class_folders(test_root))
    missing = [c for c in train if c not in test]
    extra = sorted(test - set(train))
    if extra:
        log.warning("test folder %s has %d class(es) absent from training (%s): ignored", test_root, len(extra), extra[:5])
    return [c for c in train if c in test], missing


def default_classnames(train_root: Path, given: str | None) -> str | None:
    """``--classnames``, else a ``classnames.txt`` inside the training folder or beside it (Tiny-ImageNet layout)."""
    if given:
        return str(given)
    for candidate in (Path(train_root) / "classnames.txt", Path(train_root).parent / "classnames.txt"):
        if candidate.is_file():
            return str(candidate)
    return None


def limit_classes(classes: Sequence[str], limit: int | None) -> list[str]:
    """``limit`` classes evenly spaced over the sorted list (all when ``limit`` is falsy or too big)."""
    classes = sorted(classes)
    if not limit or limit >= len(classes):
        return list(classes)
    if limit < 1:
        raise SystemExit("error: --limit-classes must be at least 1")
    return [classes[math.floor(i * len(classes) / limit)] for i in range(limit)]


def _digest(*parts: object) -> str:
    return hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:10]


def class_view(cache: Path, roots: dict[str, Path], classes: Sequence[str]) -> dict[str, Path]:
    """``{split: folder}`` where each folder holds one symlink per class into ``roots[split]``."""
    view = Path(cache) / "views" / _digest(sorted(roots.items()), list(classes))
    out = {}
    for split, root in roots.items():
        folder = view / split
        folder.mkdir(parents=True, exist_ok=True)
        for c in classes:
            link, target = folder / c, (Path(root) / c).resolve()
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target, target_is_directory=True)
        out[split] = folder
    return out


def edges_style(image):
    """Style ``edges`` v1 (see the module docstring): PIL image in, grayscale edge rendering out."""
    from PIL import ImageFilter, ImageOps

    gray = ImageOps.grayscale(image)
    return ImageOps.invert(ImageOps.autocontrast(gray.filter(ImageFilter.FIND_EDGES), cutoff=1))


def gray_style(image):
    """Style ``gray`` v1 (see the module docstring): the photo without its colour, as 8-bit grayscale."""
    from PIL import ImageOps

    return ImageOps.grayscale(image)


def blur_style(image):
    """Style ``blur`` v1 (see the module docstring): Gaussian blur, radius 4% of the shorter side."""
    from PIL import ImageFilter

    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius=0.04 * min(image.size)))


STYLES: dict[str, tuple[int, Callable]] = {"gray": (1, gray_style), "edges": (1, edges_style), "blur": (1, blur_style)}
DEFAULT_STYLE = "gray"  # the built-in base-to-new task's domain shift (why gray, not edges: docs/BENCHMARKS.md)
STYLE_CHOICES = (*STYLES, "none")


def styled_copy(source: Path, classes: Iterable[str], style: str, cache: Path) -> Path:
    """Render ``source/<class>/*`` through ``style`` into the cache (once per class), return its root.

    Each class folder is written under a temporary name and renamed when complete, so an
    interrupted run never leaves a half-rendered class behind.
    """
    from orthserve.preprocess import decode_image

    version, transform = STYLES[style]
    source = Path(source).resolve()
    root = Path(cache) / "styled" / f"{source.parent.name}-{source.name}-{style}-v{version}-{_digest(source)}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "STYLE.json").write_text(json.dumps({"source": str(source), "style": style, "version": version,
                                                 "doc": (transform.__doc__ or "").strip()}, indent=2))
    todo = [c for c in classes if not (root / c).is_dir()]
    if todo:
        log.info("rendering %d class folder(s) of %s with style %r into %s", len(todo), source, style, root)
    started = time.time()
    for c in todo:
        tmp = root / f".{c}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for path in sorted((source / c).rglob("*")):
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
                continue
            try:
                image = decode_image(path.read_bytes())
            except (OSError, ValueError) as err:  # unreadable images are skipped (the CLI would skip them too)
                log.warning("style %s: skipping unreadable %s: %s", style, path, err)
                continue
            transform(image).save(tmp / f"{path.stem}.png")
        os.replace(tmp, root / c)
    if todo:
        log.info("rendered %d class folder(s) in %.1f s", len(todo), time.time() - started)
    return root


# --------------------------------------------------------------------------- runs

def default_lr(method: str) -> float:
    """The training CLI's default learning rate for a benchmark method."""
    from training.finetune import DEFAULT_LR

    flags = METHODS[method]
    return DEFAULT_LR[flags[flags.index("--method") + 1]]


def method_flags(method: str, lrs: dict[str, float] | None = None) -> list[str]:
    """The CLI flags of a benchmark method, plus ``--lr`` where ``lrs`` (from ``--lrs``) names a rate other
    than the CLI's default (so runs at the default keep their flags and are reused from the cache)."""
    lr = (lrs or {}).get(method)
    if method == "zeroshot" or lr is None or math.isclose(lr, default_lr(method), rel_tol=1e-9):
        return list(METHODS[method])
    return [*METHODS[method], "--lr", repr(float(lr))]


def learning_rates(args) -> dict[str, float]:
    """Per-method learning rates: ``--lrs FILE`` (lr_sweep's choice), then ``--lr METHOD=VALUE`` over it."""
    lrs = load_lrs(args.lrs)
    for item in args.lr or []:
        method, _, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = -1.0
        if method not in METHODS or lr <= 0:
            raise ValueError(f"--lr {item!r}: expected METHOD=RATE with one of {', '.join(METHODS)} and a positive rate")
        lrs[method] = lr
    return lrs


def load_lrs(path: Path | None) -> dict[str, float]:
    """``--lrs FILE``: the ``chosen`` learning rates of ``bench/lr_sweep.py``'s JSON (method -> lr)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--lrs {path}: no such file (run python bench/lr_sweep.py first, or leave --lrs out)")
    chosen = json.loads(path.read_text()).get("chosen")
    if not isinstance(chosen, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in chosen.values()):
        raise ValueError(f"--lrs {path}: expected a JSON object with 'chosen': {{method: positive learning rate}}")
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise ValueError(f"--lrs {path}: unknown method(s) {', '.join(unknown)}")
    return {m: float(v) for m, v in chosen.items()}


def run_method(method: str, seed: int, run_dir: Path, common: list[str], fresh: bool = False,
               lrs: dict[str, float] | None = None) -> dict:
    """Train + evaluate one (method, seed) with ``training.finetune.main``; reuse a finished identical run."""
    from training import finetune

    argv = [*common, *method_flags(method, lrs), "--seed", str(seed), "--out", str(run_dir)]
    marker, metrics_file = run_dir / "bench-argv.json", run_dir / "metrics.json"
    if not fresh and marker.is_file() and metrics_file.is_file() and json.loads(marker.read_text()) == argv:
        log.info("%s seed %d: reusing finished run %s", method, seed, run_dir)
        metrics = json.loads(metrics_file.read_text())
        seconds = json.loads(marker.with_name("bench-time.json").read_text()).get("seconds") \
            if marker.with_name("bench-time.json").is_file() else None
        return {"metrics": metrics, "seconds": seconds, "argv": argv, "reused": True}
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    log.info("%s seed %d: python -m training.finetune %s", method, seed, shlex.join(argv))
    started = time.time()
    metrics = finetune.main([*argv, "--overwrite"])
    seconds = time.time() - started
    (run_dir / "bench-time.json").write_text(json.dumps({"seconds": seconds}))
    marker.write_text(json.dumps(argv))
    log.info("%s seed %d: done in %.1f s", method, seed, seconds)
    return {"metrics": metrics, "seconds": seconds, "argv": argv, "reused": False}


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (None with a single value)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def fmt(stat: dict, scale: float = 100.0) -> str:
    """``mean ± std`` in percent (just the mean with one seed)."""
    if stat.get("mean") is None:
        return "n/a"
    text = f"{stat['mean'] * scale:.1f}"
    return text + (f" ± {stat['std'] * scale:.1f}" if stat.get("std") is not None else "")


def check_methods(methods: Sequence[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return list(methods)


def model_args(args) -> list[str]:
    return ["--model", args.model, "--pretrained", args.pretrained]


def add_common_options(p, *, default_methods: Sequence[str], default_epochs: int, default_out: Path) -> None:
    """Options both benchmark scripts take (model, methods, seeds, epochs, output, cache)."""
    p.add_argument("--model", default="orthserve-mini",
                   help="open_clip name (e.g. ViT-B-16), orthserve-mini / orthserve-tiny, or a JSON config path")
    p.add_argument("--pretrained", default="default",
                   help="'default' (orthserve-mini's embedded weights), an open_clip tag (e.g. openai), "
                        "a local checkpoint file, or 'none' (random weights: for smoke tests and timing only)")
    p.add_argument("--methods", nargs="+", default=list(default_methods), metavar="METHOD",
                   help=f"any of: {', '.join(METHODS)} (default: the papers' nine)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds (default 1 2 3)")
    p.add_argument("--epochs", type=int, default=default_epochs, help="training epochs (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--classnames", help="'<folder> <readable name>' file (default: classnames.txt in or beside the training folder, "
                        "else folder names with '_' as a space)")
    p.add_argument("--limit-classes", type=int, default=None,
                   help="use only N classes, evenly spaced over the sorted class list (0: all; default %(default)s)")
    p.add_argument("--template", action="append", help="prompt template(s), passed to the CLI (default: its own)")
    p.add_argument("--lrs", type=Path, default=None, metavar="FILE",
                   help="per-method learning rates chosen by bench/lr_sweep.py (its JSON, e.g. bench/results/lr_sweep.json); "
                        "default: the training CLI's per-method defaults")
    p.add_argument("--lr", action="append", metavar="METHOD=RATE",
                   help="a learning rate for one method (repeatable; over --lrs), e.g. --lr lora=0.005")
    p.add_argument("--extra", default="", help="more training CLI flags, one quoted string (e.g. \"--lr 1e-4\"); "
                   "applied to every method")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes per run (default 0: in process)")
    p.add_argument("--out", type=Path, default=default_out, help=f"results folder (default {default_out})")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help=f"styled images, class views and run folders (default {DEFAULT_CACHE}; "
                        "$ORTHSERVE_BENCH_CACHE overrides)")
    p.add_argument("--fresh", action="store_true", help="retrain runs even where an identical finished run exists")


def cli_args(args) -> list[str]:
    """Training CLI flags shared by every run of a benchmark."""
    flags = [*model_args(args), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
             "--device", args.device, "--workers", str(args.workers), "--progress", "off"]
    for template in args.template or []:
        flags += ["--template", template]
    return flags + shlex.split(args.extra)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", script, *argv])


def report_footer(result: dict, name: str) -> list[str]:
    """The lines every benchmark table ends with: chart, run counts, wall time, random-weights warning."""
    runs = result["runs"]
    lines = ["", f"![chart]({name}.png)", "",
             f"Runs: {len(runs)} ({sum(r['reused'] for r in runs)} reused from the cache); "
             f"wall time of this invocation {result['wall_seconds']:.0f} s on {result['environment']['cpus']} CPUs "
             f"(cuda: {result['environment']['cuda']}). Every run's flags are in {name}.json.", ""]
    lrs = result["settings"].get("lrs") or {}
    if lrs.get("chosen"):
        source = " and ".join([*([f"from `{lrs['file']}` (bench/lr_sweep.py, chosen on validation images)"]
                                 if lrs.get("file") else []),
                               *([f"given with {' '.join('--lr ' + x for x in lrs['overrides'])}"]
                                 if lrs.get("overrides") else [])])
        lines += [f"Learning rates {source}: " + ", ".join(f"{m} {v:g}" for m, v in lrs["chosen"].items())
                  + "; every other method: the training CLI's default.", ""]
    if result["settings"]["pretrained"] == "none":
        lines += ["**Random weights (`--pretrained none`): these numbers only check the pipeline; "
                  "they say nothing about the methods.**", ""]
    return lines


def write_outputs(result: dict, out: Path, name: str, markdown: Callable[[dict], str],
                  chart: Callable[[dict, Path], None]) -> None:
    """``out/name.{json,md,png}``, then the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{name}.json", json.dumps(result, indent=2))
    write_text(out / f"{name}.md", markdown(result))
    chart(result, out / f"{name}.png")
    log.info("wrote %s/%s.{md,json,png} in %.0f s", out, name, result["wall_seconds"])
    print(markdown(result))


def write_text(path: Path, text: str) -> None:
    from orthserve.files import atomic_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, text)


def environment() -> dict:
    import platform

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "host": platform.machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_chart(fig, ax, path: Path, legend_size: int = 7, grid_axis: str = "both") -> None:
    """Legend, light grid, tight layout, write ``path`` (PNG, 100 dpi) and free the figure."""
    ax.legend(fontsize=legend_size)
    ax.grid(axis=grid_axis, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)


def entry_point(main: Callable[[], object]) -> None:
    """Run a benchmark's ``main``: data and weights problems end with a one-line message, not a traceback."""
    from orthserve import WeightsUnavailableError

    try:
        main()
    except (ValueError, FileNotFoundError, WeightsUnavailableError) as err:
        sys.exit(f"error: {err}")
