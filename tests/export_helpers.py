"""Small adapted training runs on orthserve-tiny for the export tests (not a test module)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import orthserve
from orthserve import AOFTConfig, CLIPClassifier, LoRAConfig, OrthogonalConfig, TaskResConfig
from orthserve.preprocess import PreprocessSpec
from orthserve.runs import ADAPTER_FILE, RunInfo

TINY = "orthserve-tiny"
CLASSES = ["ant", "bee", "rose"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]

# method -> adapter configs (None: full fine-tuning, the whole state_dict is the run's weights)
METHODS: dict[str, list | None] = {
    "zeroshot": [],
    "taskres": [TaskResConfig(alpha=0.5)],
    "lora": [LoRAConfig(rank=2)],
    "aoft": [AOFTConfig(rank=4)],
    "orthcr": [OrthogonalConfig(blocks=4)],
    "orthcr+taskres": [OrthogonalConfig(blocks=None, block_size=16, cayley="neumann", max_norm=0.5), TaskResConfig()],
    "full": None,
    "all": [OrthogonalConfig(blocks=2), LoRAConfig(), AOFTConfig(), TaskResConfig()],
}


def base_checkpoint(directory: Path) -> Path:
    """Fixed 'pretrained' weights, so a run rebuilds on the same base it was adapted from."""
    torch.manual_seed(0)
    model, _, _ = orthserve.load_model(TINY, "none")
    path = directory / "tiny-base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def make_run(run_dir: Path, checkpoint: Path, method: str) -> Path:
    """A RUN_DIR as training writes it, with adapters moved away from identity."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model, _, tokenizer = orthserve.load_model(TINY, str(checkpoint))
    classifier = CLIPClassifier(model, tokenizer, CLASSES, TEMPLATES).eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=generator)
    with torch.no_grad():
        before = classifier(images)
    configs = METHODS[method]
    with torch.no_grad():
        if configs is None:
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / ADAPTER_FILE))
        else:
            for config in configs:
                orthserve.inject(classifier, config)
            for p in orthserve.adapter_parameters(classifier).values():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
            orthserve.save_adapters(run_dir / ADAPTER_FILE, classifier, configs)
        after = classifier(images)
    if method != "zeroshot":
        assert (after - before).abs().max() > 1e-3, f"{method}: adapters still act as the identity"
    RunInfo(model=TINY, pretrained=str(checkpoint), method=method, classnames=CLASSES, templates=TEMPLATES,
            adapters=[c.to_dict() for c in configs or []], preprocess=PreprocessSpec.from_model(model).to_dict(),
            seed=0).save(run_dir)
    return run_dir
