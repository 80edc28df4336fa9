"""A training run directory, as training writes it and export / evaluation read it.

RUN_DIR/
  run.json             everything needed to rebuild the model (see ``RunInfo``)
  adapter.safetensors  adapter tensors of the CLIPClassifier (keys "model.…", "taskres.…"),
                       configs in its metadata; for method "full" the whole CLIP state_dict
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .classifier import CLIPClassifier
from .files import atomic_text
from .models import NO_WEIGHTS, load_model
from .surgery import load_adapters

RUN_FORMAT = "orthserve-run/1"
ADAPTER_FILE = "adapter.safetensors"
RUN_FILE = "run.json"


@dataclass
class RunInfo:
    model: str
    pretrained: str
    method: str                                   # zeroshot | taskres | lora | aoft | orthcr | orthcr+taskres | full
    classnames: list[str]
    templates: list[str]
    adapters: list[dict] = field(default_factory=list)   # AdapterConfig.to_dict() of each injected adapter
    preprocess: dict = field(default_factory=dict)       # PreprocessSpec.to_dict()
    seed: int | None = None
    extra: dict = field(default_factory=dict)            # training hyper-parameters, versions, git commit
    format: str = RUN_FORMAT

    def save(self, run_dir: str | Path) -> Path:
        return atomic_text(Path(run_dir) / RUN_FILE, json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunInfo":
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            if (Path(run_dir) / "manifest.json").is_file():  # orthserve.artifact.MANIFEST_FILE
                raise FileNotFoundError(f"{run_dir} is an exported artifact, not a training run: serve it with "
                                        f"`ORTHSERVE_MODEL={run_dir} .venv/bin/bentoml serve`; --run wants a folder "
                                        "written by `python -m training.finetune --out RUN_DIR`")
            raise FileNotFoundError(f"{run_dir} is not a training run: no {RUN_FILE} (training.finetune --out writes one)")
        data = json.loads(path.read_text())
        if data.get("format") != RUN_FORMAT:
            raise ValueError(f"{path}: run format {data.get('format')!r}, expected {RUN_FORMAT!r}")
        return cls(**data)


def load_base_model(name: str, pretrained: str, seed: int | None, device: str | torch.device = "cpu"):
    """``load_model``, with random base weights (``pretrained`` none) drawn from ``seed``.

    Training seeds the same way, so a run on random weights rebuilds the base it was
    trained on; the caller's global RNG state is left untouched.
    """
    if pretrained not in NO_WEIGHTS:
        return load_model(name, pretrained, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        return load_model(name, pretrained, device)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[CLIPClassifier, RunInfo]:
    """Rebuild the adapted (unfolded) classifier of a run, in eval mode."""
    info = RunInfo.read(run_dir)
    model, _, tokenizer = load_base_model(info.model, info.pretrained, info.seed, device)
    classifier = CLIPClassifier(model, tokenizer, info.classnames, info.templates).to(device)
    weights = Path(run_dir) / ADAPTER_FILE
    if info.method == "full":
        state = load_file(str(weights))
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{weights} does not fit model {info.model}: missing {result.missing_keys[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")
    elif info.adapters:
        load_adapters(weights, classifier)
    return classifier.eval(), info
