"""service/settings.py: every ORTHSERVE_* variable read in one place, once per environment."""
from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Limits, Settings, settings


def test_defaults_without_any_variable():
    s = Settings.from_env({})
    assert s == Settings() and s.limits == Limits() and s.variant == "auto" and s.balance and not s.debug


def test_every_variable_is_read():
    env = {"ORTHSERVE_MODEL": "/art", "ORTHSERVE_PROVIDERS": "cpu", "ORTHSERVE_VARIANT": "INT8", "ORTHSERVE_INT8": "1",
           "ORTHSERVE_WORKERS": "3", "ORTHSERVE_THREADS": "2", "ORTHSERVE_WORK_THREADS": "6",
           "ORTHSERVE_MAX_BATCH_SIZE": "64", "ORTHSERVE_CUDA_GRAPHS": "yes", "ORTHSERVE_TRT_CACHE": "/trt",
           "ORTHSERVE_LABEL_CACHE": "10", "ORTHSERVE_BALANCE": "0", "ORTHSERVE_DEBUG": "1",
           "ORTHSERVE_MAX_BYTES": "100", "ORTHSERVE_MAX_PIXELS": "200", "ORTHSERVE_MAX_LABELS": "3",
           "ORTHSERVE_MAX_LABEL_CHARS": "40", "ORTHSERVE_MAX_IMAGES": "5", "ORTHSERVE_MAX_TEXTS": "6"}
    s = Settings.from_env(env)
    assert (s.model, s.providers, s.variant, s.int8_image) == ("/art", "cpu", "int8", True)
    assert (s.workers, s.threads, s.work_threads, s.max_batch, s.label_cache) == (3, 2, 6, 64, 10)
    assert s.cuda_graphs and s.trt_cache == Path("/trt") and not s.balance and s.debug
    assert s.limits == Limits(100, 200, 3, 40, 5, 6)


@pytest.mark.parametrize("name, value, message", [("ORTHSERVE_WORKERS", "two", "not a whole number"),
                                                  ("ORTHSERVE_MAX_BYTES", "0", "at least 1"),
                                                  ("ORTHSERVE_VARIANT", "fp8", "expected one of")])
def test_a_bad_value_names_its_variable(name, value, message):
    with pytest.raises(ValueError, match=f"{name}.*{message}"):
        Settings.from_env({name: value})


def test_built_once_per_environment(monkeypatch):
    monkeypatch.delenv("ORTHSERVE_LABEL_CACHE", raising=False)
    first = settings()
    assert settings() is first  # the same object while nothing changes
    monkeypatch.setenv("ORTHSERVE_LABEL_CACHE", "7")
    assert settings().label_cache == 7 and settings() is not first


def test_no_service_module_reads_the_environment_itself():
    from conftest import REPO

    readers = [p.name for p in (REPO / "service").glob("*.py") if p.name != "settings.py" and "os.environ" in p.read_text()]
    assert readers == []


def test_cuda_visible_devices_is_read_and_rebuilds_the_settings(monkeypatch):
    """CUDA's own variable picks the GPUs the workers get (service/gpu.py); unset and empty differ (empty: none)."""
    assert Settings.from_env({}).cuda_visible_devices is None
    assert Settings.from_env({"CUDA_VISIBLE_DEVICES": ""}).cuda_visible_devices == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    first = settings()
    assert first.cuda_visible_devices == "0,1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert settings().cuda_visible_devices == "1" and settings() is not first
