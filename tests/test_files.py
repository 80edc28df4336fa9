"""orthserve.files: the one atomic-write helper every writer uses."""
from __future__ import annotations

import os
import stat

import pytest

from orthserve.files import atomic_text, atomic_write, temporary_name


def test_temporary_names_are_unique_per_call_and_process(tmp_path):
    target = tmp_path / "checkpoint.pt"
    names = {temporary_name(target) for _ in range(100)}
    assert len(names) == 100  # two writers of the same file (two runs, two threads) never share one
    assert all(n.parent == tmp_path and n.name.startswith(f".checkpoint.pt.tmp-{os.getpid()}-") for n in names)


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    target = atomic_text(tmp_path / "metrics.json", "old")

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_written_files_are_readable_by_others_as_open_would_make_them(tmp_path):
    from safetensors.torch import save_file
    import torch

    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"x": torch.zeros(1)}, str(tmp)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # safetensors alone writes 0o600


def test_no_module_writes_files_its_own_way():
    """Every ``os.replace`` of a temporary file goes through orthserve.files (export swaps whole directories)."""
    from conftest import REPO

    offenders = []
    for folder in ("orthserve", "training", "service", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            if path.name != "files.py" and (".tmp-{os.getpid()}" in text or '.tmp.npy"' in text):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == [] or offenders == ["bench/common.py"], offenders  # styled class folders: renamed dirs
