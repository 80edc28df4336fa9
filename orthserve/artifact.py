"""An exported artifact directory (ART_DIR), as export writes it and the service reads it.

ART_DIR/
  image.onnx, text.onnx          uint8 pixels / int64 tokens -> L2-normalized embeddings (dynamic batch)
  image.{fp16,int8}.onnx, ...    optional variants
  tokenizer.json                 the text tower's tokenizer (HF tokenizers): the service needs no torch to tokenize
  classifier.safetensors         class_embeddings [C, D] (TaskRes folded in), logit_scale (exponentiated)
  open_clip_model.safetensors    folded plain open_clip state_dict
  parity.json                    verification figures
  manifest.json                  everything else, with the sha256 of every other file

Loading never trusts the directory: the schema version and every file's sha256 are
checked, so a half-copied or edited artifact is refused instead of served.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np

from .preprocess import PreprocessSpec
from .prompts import check_templates

# 2: the image graph takes uint8 pixels and normalizes inside; the tokenizer ships as tokenizer.json
SCHEMA_VERSION = 2
MANIFEST_FILE = "manifest.json"
PARITY_FILE = "parity.json"
CLASSIFIER_FILE = "classifier.safetensors"
CHECKPOINT_FILE = "open_clip_model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
COMPONENTS = ("image", "text")
VARIANTS = ("fp32", "fp16", "int8")
# onnxruntime 1.31's NchwcTransformer (CPU, ORT_ENABLE_ALL) segfaults while optimizing fp16 graphs:
# pass these as InferenceSession(..., disabled_optimizers=...) when running a variant on CPU.
ORT_DISABLED_OPTIMIZERS = {"fp16": ["NchwcTransformer"]}
REQUIRED_KEYS = ("schema_version", "model", "pretrained", "method", "classnames", "templates", "preprocess", "inputs",
                 "tokenizer", "embed_dim", "logit_scale", "files", "variants")


class ArtifactError(ValueError):
    """The directory is not a usable artifact (missing, wrong schema, tampered or incomplete)."""


def onnx_file(component: str, variant: str = "fp32") -> str:
    """File name of one exported tower: ``image.onnx``, ``text.int8.onnx``, ..."""
    return f"{component}.onnx" if variant == "fp32" else f"{component}.{variant}.onnx"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(root: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` section for ``names`` under ``root``."""
    return {name: {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size} for name in sorted(names)}


@dataclass
class Artifact:
    root: Path
    manifest: dict
    preprocess: PreprocessSpec
    classnames: list[str]
    templates: list[str]
    class_embeddings: np.ndarray | None
    logit_scale: float
    _tokenizer: Callable | None = field(default=None, repr=False)

    def variants(self, component: str) -> list[str]:
        if component not in COMPONENTS:
            raise ArtifactError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        return list(self.manifest["variants"].get(component, {}))

    def onnx_path(self, component: str, variant: str = "fp32") -> Path:
        available = self.variants(component)
        if variant not in available:
            raise ArtifactError(f"{self.root}: no {variant!r} variant of the {component} model; available: {available}")
        return self.root / self.manifest["variants"][component][variant]

    @property
    def context_length(self) -> int:
        return int(self.manifest["tokenizer"]["context_length"])

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> int64 token ids ``[N, context_length]``, from the artifact's tokenizer.json (no torch)."""
        if self._tokenizer is None:
            from .tokenizer import load_tokenizer

            info = self.manifest["tokenizer"]
            self._tokenizer = load_tokenizer(self.root / info["file"], info)
        return np.asarray(self._tokenizer(list(texts)), dtype=np.int64)


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {root} does not exist")
    if not path.is_file():
        if (root / "run.json").is_file():  # orthserve.runs.RUN_FILE (that module needs torch)
            raise ArtifactError(f"{root} is a training run, not an artifact: export it first with "
                                f"`python -m export --run {root} --out ART_DIR`, then serve ART_DIR")
        raise ArtifactError(f"{root} is not an artifact: no {MANIFEST_FILE} (export one with `python -m export`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a JSON object")
    version = manifest.get("schema_version")
    if version == 1:
        raise ArtifactError(f"{root} was exported by an earlier orthserve (schema_version 1: float32 pixels, no "
                            "tokenizer.json), which this service cannot run. Re-export it: `python -m export --run "
                            "RUN_DIR --out DIR` (or `--model NAME --pretrained TAG`); for the built-in default, `make artifact`")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema_version {version!r} is not supported (this orthserve reads "
                            f"{SCHEMA_VERSION}); re-export the model with this version")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ArtifactError(f"{path} lacks required keys {missing}")
    try:
        check_templates(manifest["templates"] or ["{}"])
    except ValueError as err:
        raise ArtifactError(f"{path}: {err}") from None
    tokenizer = manifest["tokenizer"]
    if not isinstance(tokenizer, dict) or tokenizer.get("file") not in manifest["files"]:
        raise ArtifactError(f"{root} has no {TOKENIZER_FILE} listed in its manifest: without it the service would need "
                            "torch to tokenize. Re-export it with this orthserve (`python -m export ...`, or "
                            "`make artifact` for the built-in default)")
    return manifest


def _check_files(root: Path, manifest: dict, hashed: Collection[str] | None = None) -> None:
    """Every listed file present with its size; the sha256 of those in ``hashed`` (None: all)."""
    files = manifest["files"]
    for component, variants in manifest["variants"].items():
        for variant, name in variants.items():
            if name not in files:
                raise ArtifactError(f"{root}: {component} {variant} file {name!r} is not listed in the manifest's files")
    for name, entry in files.items():
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{root}: manifest lists a file outside the artifact: {name!r}")
        if not path.is_file():
            raise ArtifactError(f"{root}: {name} is listed in the manifest but missing (incomplete copy?)")
        if path.stat().st_size != entry["bytes"] or (
                (hashed is None or name in hashed) and sha256_file(path) != entry["sha256"]):
            raise ArtifactError(f"{root}: {name} does not match its sha256 in the manifest "
                                f"(modified or corrupted); re-export or re-copy the artifact")


def verify_files(artifact: Artifact, hashed: Collection[str] | None = None) -> Artifact:
    """Check a loaded artifact's files (sizes; sha256 of ``hashed``, None: all) against its manifest; returns it."""
    _check_files(artifact.root, artifact.manifest, hashed)
    return artifact


def load_artifact(path: str | Path, verify: bool = True, hashed: Collection[str] | None = None) -> Artifact:
    """Open ART_DIR; checks the schema and (with ``verify``) every file's size and the sha256 of the files
    in ``hashed`` (None: all of them)."""
    root = Path(path)
    manifest = _read_manifest(root)
    try:
        if verify:
            _check_files(root, manifest, hashed)
        spec = PreprocessSpec.from_dict(manifest["preprocess"])
    except ArtifactError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise ArtifactError(f"{root}: malformed {MANIFEST_FILE}: {err!r}") from err
    embeddings = None
    logit_scale = float(manifest["logit_scale"])
    if CLASSIFIER_FILE in manifest["files"]:
        from safetensors.numpy import load_file

        tensors = load_file(str(root / CLASSIFIER_FILE))
        embeddings = tensors["class_embeddings"].astype(np.float32)
        logit_scale = float(tensors["logit_scale"])
        if embeddings.shape != (len(manifest["classnames"]), manifest["embed_dim"]):
            raise ArtifactError(f"{root}: class_embeddings has shape {embeddings.shape}, manifest says "
                                f"{len(manifest['classnames'])} classes x {manifest['embed_dim']}")
    return Artifact(root=root, manifest=manifest, preprocess=spec,
                    classnames=list(manifest["classnames"]), templates=list(manifest["templates"]),
                    class_embeddings=embeddings, logit_scale=logit_scale)


def ort_session(path: str | Path, variant: str = "fp32", providers: Sequence[str] = ("CPUExecutionProvider",),
                threads: int | None = None, log_severity: int = 3, spinning: bool = True,
                profile_prefix: str | None = None):
    """The one way we open an onnxruntime session (export verification, service, benchmarks).

    Disables the graph optimizers that crash onnxruntime on some variants
    (``ORT_DISABLED_OPTIMIZERS``); ``threads`` sets intra-op threads (None: onnxruntime's default).
    ``spinning=False`` stops idle intra-op threads from busy-waiting for work: right for a server whose
    other processes (HTTP, decoding) need the same cores, wrong for one process that only runs the model.
    ``profile_prefix``: write onnxruntime's per-node profile there (``session.end_profiling()`` names the file).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=list(providers),
                                disabled_optimizers=ORT_DISABLED_OPTIMIZERS.get(variant))
