"""Packaging: only `orthserve.*` is installed, the console scripts exist, and the library imports light."""
from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_only_the_orthserve_namespace(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(REPO)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = tmp_path.glob("orthserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"orthserve"}
    for module in ("orthserve/training/finetune.py", "orthserve/export/__main__.py", "orthserve/service/service.py",
                   "orthserve/weights/orthserve-mini.safetensors"):
        assert module in names, module
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "orthserve-finetune = orthserve.training.finetune:console" in entry_points


def test_console_scripts_point_at_functions_that_exist() -> None:
    import importlib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"orthserve-finetune", "orthserve-export"} <= set(scripts)
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_namespaced_and_repo_root_names_are_the_same_code() -> None:
    import orthserve.training.finetune as namespaced
    import training.finetune as repo_root

    assert Path(namespaced.__file__).resolve() == Path(repo_root.__file__).resolve()


def test_importing_the_library_needs_neither_bentoml_nor_matplotlib() -> None:
    code = ("import sys, importlib, pkgutil, orthserve\n"
            "for m in pkgutil.walk_packages(orthserve.__path__, 'orthserve.'):\n"
            "    if m.name.split('.')[1] not in ('training', 'export', 'service'): importlib.import_module(m.name)\n"
            "heavy = [k for k in ('bentoml', 'matplotlib', 'onnx', 'onnxruntime') if k in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
