"""Source model -> verified ART_DIR, all or nothing.

Order matters: reference outputs come from the *unfolded* adapted model, then the
adapters are folded and the folded model is exported, so the verification checks
folding and ONNX conversion together.  Everything is written into a temporary
directory beside ART_DIR, which replaces ART_DIR only once it is complete.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import orthserve
from orthserve.files import readable_mode
from orthserve.artifact import (CHECKPOINT_FILE, CLASSIFIER_FILE, COMPONENTS, MANIFEST_FILE, PARITY_FILE,
                                SCHEMA_VERSION, TOKENIZER_FILE, file_entries, onnx_file)
from orthserve.tokenizer import load_tokenizer, write_tokenizer
from orthserve.preprocess import normalize

from . import verify
from .source import Source
from .towers import DEFAULT_OPSET, INPUT_NAMES, VARIANT_BUILDERS, check_opset, check_variants, export_tower

from .verify import DEFAULT_TOLERANCE, ExportError, VerificationError, check_parity  # noqa: F401  (re-exported)


def _versions() -> dict[str, str]:
    import onnxruntime
    import open_clip

    versions = {"orthserve": orthserve.__version__, "torch": str(torch.__version__), "open_clip": open_clip.__version__,
                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                "python": platform.python_version()}
    try:
        import transformers
        versions["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    return versions


def _reference(source: Source, pixels: np.ndarray, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the unfolded adapted model (uint8 pixels normalized by ``orthserve.preprocess``): what the
    artifact must reproduce."""
    model = source.model.eval()
    images = torch.from_numpy(normalize(pixels, source.preprocess))
    with torch.no_grad():
        ref = {"image": F.normalize(model.encode_image(images), dim=-1),
               "text": F.normalize(model.encode_text(tokens), dim=-1),
               "logit_scale": model.logit_scale.exp().float()}
        if source.classifier is not None:
            ref["classes"] = source.classifier.class_embeddings().float().contiguous()
    return ref


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The folded model's plain open_clip state_dict, one contiguous copy per key (safetensors refuses shared storage)."""
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _variant_figures(runners: dict, images: np.ndarray, tokens: np.ndarray, fp32: dict[str, np.ndarray],
                     basis: np.ndarray, source: Source) -> dict[str, dict]:
    """Cosine to fp32 embeddings and top-1 agreement with fp32 on the verification images."""
    image, text = runners["image"](images), runners["text"](tokens)
    if source.classifier is not None:
        classes = verify.class_matrix(torch.from_numpy(text), source.classifier).detach().numpy()
    else:
        classes = text
    counted = {"images": int(len(images)), "classes": int(len(basis))}
    return {
        "image": {**verify.cosine_stats(image, fp32["image"]),
                  "top1_agreement": verify.top1_agreement(image, basis, fp32["image"], basis), **counted},
        "text": {**verify.cosine_stats(text, fp32["text"]),
                 "top1_agreement": verify.top1_agreement(fp32["image"], classes, fp32["image"], basis), **counted},
    }


def _export_tokenizer(source: Source, root: Path, texts: list[str], tokens: torch.Tensor) -> dict:
    """tokenizer.json for the service (HF tokenizers, no torch), checked against the model's own tokenizer on the
    verification texts (prompts, a one-letter text, one longer than the context) and a few awkward ones."""
    info = write_tokenizer(source.tokenizer, root / TOKENIZER_FILE, int(tokens.shape[1]))
    served = load_tokenizer(root / TOKENIZER_FILE, info)
    awkward = ["", "  ", "Crème brûlée", "rock &amp; roll", "日本の猫", "ﬁsh 🐟", "“quoted”", "a-b_c/d"]
    expected = np.concatenate([tokens.numpy(), np.asarray(source.tokenizer(awkward), dtype=np.int64)])
    got = np.asarray(served(texts + awkward), dtype=np.int64)
    if got.shape != expected.shape or not (got == expected).all():
        rows = [t for t, a, b in zip(texts + awkward, got, expected) if a.shape != b.shape or (a != b).any()]
        raise VerificationError(f"verification failed: {TOKENIZER_FILE} tokenizes differently from the model's "
                                f"tokenizer, e.g. {rows[:3]!r}")
    return info


def build(source: Source, root: Path, variants: Sequence[str] = (), images_dir: str | Path | None = None,
          tolerance: float = DEFAULT_TOLERANCE, opset: int = DEFAULT_OPSET) -> dict:
    """Write a complete artifact into the empty directory ``root``; returns the manifest."""
    images, image_source = verify.verification_images(source.preprocess, images_dir)
    texts = verify.verification_texts(source.classifier)
    tokens = source.tokenizer(texts)
    ref = _reference(source, images, tokens)

    orthserve.fold(source.classifier if source.classifier is not None else source.model)
    examples = {"image": torch.from_numpy(images[[0, -1]]), "text": tokens[[0, -1]]}
    inputs = {"image": images, "text": tokens.numpy()}
    parity: dict = {"reference": "unfolded adapted PyTorch model (fp32, CPU)", "tolerance": tolerance,
                    "images": image_source, "texts": len(texts)}
    fp32, nodes, fusions = {}, {}, {}
    for component in COMPONENTS:  # check each tower as soon as it exists: fail fast
        path = root / onnx_file(component)
        fusions[component] = export_tower(source.model, component, examples[component], path, source.preprocess,
                                          opset)
        fp32[component] = verify.OnnxRunner(path)(inputs[component])
        nodes[component] = len(onnx.load(str(path), load_external_data=False).graph.node)
        parity[component] = check_parity(component, fp32[component], ref[component], tolerance)
    files = [onnx_file(c) for c in COMPONENTS]
    tokenizer = _export_tokenizer(source, root, texts, tokens)
    files.append(TOKENIZER_FILE)
    if source.classifier is not None:
        rebuilt = verify.class_matrix(torch.from_numpy(fp32["text"]), source.classifier)
        parity["classifier"] = check_parity("classifier", rebuilt, ref["classes"], tolerance)
        save_file({"class_embeddings": ref["classes"], "logit_scale": ref["logit_scale"].reshape(())},
                  str(root / CLASSIFIER_FILE))
        files.append(CLASSIFIER_FILE)

    save_file(_state_dict(source.model), str(root / CHECKPOINT_FILE), metadata={"open_clip_model": source.name})
    files.append(CHECKPOINT_FILE)

    variant_files = {c: {"fp32": onnx_file(c)} for c in COMPONENTS}
    basis = ref["classes"].numpy() if source.classifier is not None else fp32["text"]
    parity["variants"] = {}
    for variant in variants:
        runners = {}
        for component in COMPONENTS:
            path = VARIANT_BUILDERS[variant](root / onnx_file(component), root / onnx_file(component, variant))
            runners[component] = verify.OnnxRunner(path, variant)
            variant_files[component][variant] = path.name
            files.append(path.name)
        parity["variants"][variant] = _variant_figures(runners, images, inputs["text"], fp32, basis, source)
    (root / PARITY_FILE).write_text(json.dumps(parity, indent=2))
    files.append(PARITY_FILE)

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model": source.name,
        "pretrained": source.pretrained,
        "method": source.method,
        "adapters": source.adapters,
        "classnames": source.classnames,
        "templates": source.templates,
        "preprocess": source.preprocess.to_dict(),
        "inputs": {"image": {"name": INPUT_NAMES["image"], "dtype": "uint8", "shape": ["batch", *images.shape[1:]]},
                   "text": {"name": INPUT_NAMES["text"], "dtype": "int64", "shape": ["batch", int(tokens.shape[1])]}},
        "tokenizer": {"model": source.name, **tokenizer},
        "embed_dim": int(fp32["image"].shape[1]),
        "logit_scale": float(ref["logit_scale"]),
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=True)",
        "graph_nodes": nodes,
        "graph_fusions": fusions,
        "checkpoint": {"file": CHECKPOINT_FILE, "open_clip_model": source.name},
        "files": file_entries(root, files),
        "variants": variant_files,
        "source": source.run,
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    _make_readable(root)
    return manifest


def _make_readable(root: Path) -> None:
    """safetensors writes owner-only files; the service may run as another user."""
    for path in root.iterdir():
        path.chmod(readable_mode())


def _check_destination(out: Path) -> None:
    """Only ever replace an earlier artifact, never an unrelated directory."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise ExportError(f"output {out} exists, is not empty and is not an artifact (no {MANIFEST_FILE}); "
                          "refusing to replace it: choose another --out or remove it")


def _remove_stale(out: Path) -> None:
    """Temporary directories that a killed export (SIGKILL, power loss) left beside ART_DIR."""
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        pid = path.name.rsplit(".tmp-", 1)[1].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished directory in; the old artifact is removed only after the swap."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}") if out.exists() else None
    if old is not None:
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_artifact(source: Source, out: str | Path, variants: Sequence[str] = (), bento_model: str | None = None,
                    images_dir: str | Path | None = None, tolerance: float = DEFAULT_TOLERANCE,
                    opset: int = DEFAULT_OPSET) -> dict:
    """Export ``source`` to ``out`` (replacing an earlier artifact there); returns the manifest.

    On any failure (including Ctrl-C) nothing new is left at ``out``: an earlier
    artifact there stays as it was.  Note: ``source``'s model is folded in place.
    """
    variants = check_variants(variants)
    check_opset(opset)
    out = Path(out).absolute()
    _check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        manifest = build(source, tmp, variants, images_dir, tolerance, opset)
        if bento_model:
            from .bento import store

            manifest = {**manifest, "bento_tag": store(bento_model, tmp, manifest)}
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
