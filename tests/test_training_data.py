"""Few-shot data protocol: exact shot sampling, base/new split, class names, bad input."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (DataError, EvalImages, TrainImages, drop_unreadable, few_shot, load_labelled,
                           read_classnames, subsample_classes)
from orthserve.preprocess import PreprocessSpec

SPEC = PreprocessSpec(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def make_folder(root: Path, counts: dict[str, int], corrupt: dict[str, int] | None = None) -> Path:
    """A synthetic ImageFolder (tiny PNGs) under tmp, never in the repo."""
    for index, (name, count) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            noise = np.random.default_rng(100 * index + i).integers(0, 256, (32, 40 + i, 3), dtype=np.uint8)
            Image.fromarray(noise).save(folder / f"img{i}.png")
        for i in range((corrupt or {}).get(name, 0)):
            (folder / f"bad{i}.jpg").write_bytes(b"not an image at all" if i % 2 == 0 else b"")
    return root


def test_shot_sampling_is_exact_coop(sample_images):
    data = load_labelled(sample_images / "flowers5")
    assert data.classes == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    shots, rest = few_shot(data, 3, seed=7)
    rng, expected = random.Random(7), []
    for label, name in enumerate(data.classes):
        paths = sorted(str(p) for p in (sample_images / "flowers5" / name).iterdir())
        expected += [(p, label) for p in rng.sample(paths, 3)]
    assert [(s.path, s.label) for s in shots.samples] == expected
    assert len(shots.samples) + len(rest.samples) == len(data.samples)
    assert not {s.path for s in shots.samples} & {s.path for s in rest.samples}
    again, _ = few_shot(load_labelled(sample_images / "flowers5"), 3, seed=7)
    assert [s.path for s in again.samples] == [s.path for s in shots.samples]
    other, _ = few_shot(data, 3, seed=8)
    assert [s.path for s in other.samples] != [s.path for s in shots.samples]


def test_base_new_split_is_first_half_rounded_up(sample_images, tmp_path):
    base = load_labelled(sample_images / "flowers5", subsample="base")
    new = load_labelled(sample_images / "flowers5", subsample="new")
    assert base.classes == ["daisy", "dandelion", "rose"] and new.classes == ["sunflower", "tulip"]
    assert {s.label for s in new.samples} == {0, 1}  # relabelled from 0, as CoOp
    assert subsample_classes(list("abcdefg"), "base") == list("abcd")
    assert subsample_classes(list("abcdef"), "new") == list("def")
    with pytest.raises(DataError, match="subsample"):
        subsample_classes(["a"], "half")


def test_classnames_file_and_underscore_fallback(data_dir, tmp_path):
    names = read_classnames(data_dir / "tiny-imagenet" / "classnames.txt")
    assert names["n01443537"] == "goldfish" and names["n01629819"] == "European fire salamander"
    root = make_folder(tmp_path / "d", {"n01443537": 1, "n01629819": 1, "golden_retriever": 1})
    data = load_labelled(root, data_dir / "tiny-imagenet" / "classnames.txt")
    assert data.classnames == ["golden retriever", "goldfish", "European fire salamander"]
    plain = load_labelled(root)
    assert plain.classnames[0] == "golden retriever"


def test_csv_manifest(tmp_path):
    root = make_folder(tmp_path / "imgs", {"cat": 2, "dog": 3})
    lines = ["path,label"] + [f"imgs/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    data = load_labelled(tmp_path / "m.csv")
    assert data.classes == ["cat", "dog"] and len(data.samples) == 5
    assert all(Path(s.path).is_file() for s in data.samples)


def test_fewer_images_than_shots_uses_all_and_reports(tmp_path, caplog):
    data = load_labelled(make_folder(tmp_path / "d", {"a": 5, "b": 2}))
    with caplog.at_level(logging.WARNING):
        shots, _ = few_shot(data, 4, seed=1)
    assert [s.label for s in shots.samples].count(1) == 2 and [s.label for s in shots.samples].count(0) == 4
    assert any("'b' has 2 images, fewer than --shots 4" in n for n in shots.notes)
    assert "fewer than --shots" in caplog.text


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    data = load_labelled(make_folder(tmp_path / "d", {"a": 2, "b": 2}, corrupt={"a": 2}))
    assert len(data.samples) == 6
    with caplog.at_level(logging.WARNING):
        good = drop_unreadable(data)
    assert len(good.samples) == 4 and "skipped 2 unreadable" in caplog.text
    pixels, label, ok = EvalImages(data, SPEC)[0]  # bad0.jpg sorts first in class a
    assert not ok and pixels.shape == (3, 64, 64)
    view, _ = TrainImages(good, SPEC, seed=0)[0]
    assert view.shape == (3, 64, 64)


def test_train_views_depend_only_on_seed_epoch_index(tmp_path):
    good = load_labelled(make_folder(tmp_path / "d", {"a": 2}))
    first, second = TrainImages(good, SPEC, seed=3), TrainImages(good, SPEC, seed=3)
    second[1]  # other draws in between change nothing
    assert (first[0][0] == second[0][0]).all()
    second.set_epoch(1)
    assert not (first[0][0] == second[0][0]).all()


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("empty_class", "class folders without images"),
    ("missing_csv", "does not exist"),
])
def test_bad_data_folders_name_the_problem(tmp_path, case, message):
    if case == "empty":
        (tmp_path / "d").mkdir()
    if case == "empty_class":
        make_folder(tmp_path / "d", {"a": 1})
        (tmp_path / "d" / "hollow").mkdir()
    path = tmp_path / ("m.csv" if case == "missing_csv" else "d")
    with pytest.raises(DataError, match=message):
        load_labelled(path)
