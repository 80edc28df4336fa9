"""Shared fixtures.

``sample_images``: small synthetic JPEGs committed in tests/fixtures/images (folders ``flowers5`` and
``hymenoptera-val``, named like the real ones), for tests that need some images to run on.
``data_dir``: the real images in ../shared/data (never copied into the repo), for tests about real
photos or the benchmark datasets; those skip without them.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

IMAGES = REPO / "tests" / "fixtures" / "images"  # written by tests/fixtures/make_images.py

requires_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real images not found at {DATA}")


@pytest.fixture
def tiny():
    """A fresh orthserve-tiny ``(model, preprocess, tokenizer)`` with fixed random weights."""
    import orthserve

    torch.manual_seed(0)
    return orthserve.load_model("orthserve-tiny", "none")


@pytest.fixture(scope="session")
def sample_images() -> Path:
    return IMAGES


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real images not found at {DATA}")
    return DATA


@pytest.fixture(autouse=True)
def _fresh_artifact_check(monkeypatch):
    """The service remembers, in the environment, which artifact its server process verified (for its workers);
    each test starts as a new server would."""
    monkeypatch.delenv("ORTHSERVE_VERIFIED_ARTIFACT", raising=False)
