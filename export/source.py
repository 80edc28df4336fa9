"""What gets exported: an adapted (still unfolded) CLIP model and what describes it.

Either a training run (``orthserve.runs.load_run`` rebuilds it) or a plain model name
with an optional class list for a zero-shot classifier.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from torch import nn

import orthserve
from orthserve.classifier import CLIPClassifier
from orthserve.prompts import DEFAULT_TEMPLATES
from orthserve.preprocess import PreprocessSpec
from orthserve.runs import load_run


@dataclass
class Source:
    model: nn.Module                      # the CLIP model, adapters still attached
    tokenizer: Callable
    classifier: CLIPClassifier | None     # None: no class list, no classifier file
    name: str
    pretrained: str
    method: str
    adapters: list[dict]
    preprocess: PreprocessSpec
    run: dict = field(default_factory=dict)   # where it came from (run dir, seed, training extras)

    @property
    def classnames(self) -> list[str]:
        return self.classifier.classnames if self.classifier is not None else []

    @property
    def templates(self) -> list[str]:
        return self.classifier.templates if self.classifier is not None else []


def from_run(run_dir: str | Path) -> Source:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    classifier, info = load_run(run_dir)  # says what the folder is when it is not a run
    spec = PreprocessSpec.from_dict(info.preprocess) if info.preprocess else PreprocessSpec.from_model(classifier.model)
    return Source(model=classifier.model, tokenizer=orthserve.get_tokenizer(info.model), classifier=classifier,
                  name=info.model, pretrained=info.pretrained, method=info.method, adapters=list(info.adapters),
                  preprocess=spec, run={"dir": str(run_dir.resolve()), "seed": info.seed, "extra": info.extra})


def from_model(name: str, pretrained: str = "none", classnames: Sequence[str] = (),
               templates: Sequence[str] = DEFAULT_TEMPLATES) -> Source:
    """A plain zero-shot export; with ``classnames`` it carries a zero-shot classifier."""
    model, _, tokenizer = orthserve.load_model(name, pretrained)
    classifier = CLIPClassifier(model, tokenizer, classnames, templates).eval() if classnames else None
    return Source(model=model, tokenizer=tokenizer, classifier=classifier, name=name, pretrained=str(pretrained),
                  method="zeroshot", adapters=[], preprocess=PreprocessSpec.from_model(model))
