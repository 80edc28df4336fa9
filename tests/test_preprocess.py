"""orthserve.preprocess (NumPy + Pillow) against open_clip's own eval transform on real photos."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from orthserve.preprocess import ImageDecodeError, PreprocessSpec, decode_image, preprocess, resized_size

from conftest import requires_data

PHOTO_DIR = "hymenoptera-val"


def sample_photos(data_dir, n: int = 24):
    root = data_dir / PHOTO_DIR
    if not root.is_dir():
        pytest.skip(f"no {root}")
    files = sorted(root.glob("*/*.jpg"))
    return files[:: max(1, len(files) // n)][:n]


@requires_data
@pytest.mark.parametrize("size", [64, 224])
def test_matches_open_clip_eval_transform(data_dir, size):
    transform = open_clip.image_transform(size, is_train=False)
    spec = PreprocessSpec(size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    worst = 0.0
    for path in sample_photos(data_dir):
        ours = preprocess(decode_image(path.read_bytes()), spec)
        theirs = transform(Image.open(path)).numpy()
        assert ours.shape == theirs.shape == (3, size, size) and ours.dtype == np.float32
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst < 1e-4, f"max abs difference {worst}"


@requires_data
def test_same_top1_with_tiny_model(data_dir, tiny):
    model, transform, tokenizer = tiny
    spec = PreprocessSpec.from_model(model)
    paths = sample_photos(data_dir)
    ours = torch.from_numpy(np.stack([preprocess(decode_image(p.read_bytes()), spec) for p in paths]))
    theirs = torch.stack([transform(Image.open(p)) for p in paths])
    with torch.no_grad():
        text = model.encode_text(tokenizer(["a photo of ants.", "a photo of bees.", "a photo of a dog."]))
        text = text / text.norm(dim=-1, keepdim=True)

        def top1(pixels):
            img = model.encode_image(pixels)
            return ((img / img.norm(dim=-1, keepdim=True)) @ text.T).argmax(dim=-1)

        assert torch.equal(top1(ours), top1(theirs))
        assert torch.allclose(model.encode_image(ours), model.encode_image(theirs), atol=1e-4)


def test_elongated_image_is_refused_before_the_resize():
    """1x60000 passes the decoded-pixel limit, but its shorter side resized to 224 would be 224 x 13,440,000."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (1, 60000)).save(buffer, "PNG")
    assert resized_size(1, 60000, 224) == (224, 13_440_000)
    assert decode_image(buffer.getvalue(), max_pixels=40_000_000).size == (1, 60000)  # no size: decoding alone is fine
    with pytest.raises(ImageDecodeError, match="too elongated"):
        decode_image(buffer.getvalue(), max_pixels=40_000_000, image_size=224)
