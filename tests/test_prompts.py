"""One prompt-template dialect, one class-embedding recipe, for training, export, service and benchmarks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import orthserve
from orthserve import prompts
from orthserve.artifact import ArtifactError


@pytest.mark.parametrize("template", ["a photo", "a photo of a {c}.", "{} and {}", ""])
def test_a_template_without_exactly_one_slot_is_refused_everywhere(tiny, template):
    """Before: the service appended the label to 'a photo' or filled '{c}', while training gave every class the
    same prompt ('a photo'.format(name)) or raised KeyError ('{c}')."""
    model, _, tokenizer = tiny
    with pytest.raises(ValueError, match="exactly one"):
        orthserve.CLIPClassifier(model, tokenizer, ["cat", "dog"], [template])
    with pytest.raises(ValueError, match="exactly one"):
        prompts.prompts(["cat"], [template])


def test_braces_in_names_and_templates_are_plain_text():
    assert prompts.prompts(["{weird} cat", "dog"], ["a {} ({styled}).", "itap of a {}"]) == [
        "a {weird} cat ({styled}).", "itap of a {weird} cat", "a dog ({styled}).", "itap of a dog"]


def test_numpy_and_torch_give_the_same_class_embeddings():
    rng = np.random.default_rng(0)
    per_prompt = rng.normal(size=(3 * 2 + 4, 8)).astype(np.float32)  # class-major, plus unrelated rows
    from_numpy = prompts.class_embeddings(per_prompt, 3, 2)
    from_torch = prompts.class_embeddings(torch.from_numpy(per_prompt), 3, 2).numpy()
    expected = torch.nn.functional.normalize(torch.nn.functional.normalize(torch.from_numpy(per_prompt[:6]), dim=-1)
                                             .view(3, 2, -1).mean(1), dim=-1).numpy()
    np.testing.assert_allclose(from_numpy, expected, atol=1e-6)
    np.testing.assert_allclose(from_torch, expected, atol=1e-6)


def test_an_artifact_with_a_bad_template_is_refused(tmp_path):
    import json

    from orthserve import artifact

    manifest = {key: {} for key in artifact.REQUIRED_KEYS}
    manifest.update(schema_version=artifact.SCHEMA_VERSION, templates=["a photo of a {c}."])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="exactly one"):
        artifact.load_artifact(tmp_path)
