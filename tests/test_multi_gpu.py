"""One service worker per GPU (service/gpu.py, service/runtime.py), checked as logic: no GPU is needed.

The machine's GPU count is replaced by a number (``gpu.system_gpus``); everything above it runs for real:
settings, CUDA_VISIBLE_DEVICES, provider choice, BentoML's worker index, the options a session is opened with.
"""
from __future__ import annotations

import logging

import bentoml
import pytest

from service import gpu, runtime
from service_helpers import PHOTOS, export_tiny


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: this machine now has ``n`` GPUs, every device variable cleared."""
    for name in ("CUDA_VISIBLE_DEVICES", "ORTHSERVE_WORKERS", "ORTHSERVE_PROVIDERS", "ORTHSERVE_MAX_BATCH_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "_tensorrt_loadable", lambda: False)  # the CUDA provider, as without libnvinfer

    def have(n: int) -> None:
        monkeypatch.setattr(gpu, "system_gpus", lambda: n)

    return have


@pytest.mark.parametrize("worker_index, visible, device", [
    (None, 4, 0),  # not a BentoML worker (tests, scripts): the first GPU
    (1, 4, 0), (2, 4, 1), (4, 4, 3),  # BentoML numbers workers from 1, CUDA devices from 0
    (5, 4, 0), (6, 4, 1),  # more workers than GPUs: round-robin
    (3, 1, 0), (2, 0, 0),
])
def test_worker_index_to_device(worker_index, visible, device):
    assert gpu.device_for_worker(worker_index, visible) == device


def test_a_worker_index_below_1_is_refused():
    with pytest.raises(ValueError, match="start at 1"):
        gpu.device_for_worker(0, 4)


@pytest.mark.parametrize("cuda_visible_devices, system, visible", [
    (None, 4, 4),  # unset: every GPU
    ("2,3", 4, 2),
    ("3", 4, 1),
    ("", 4, 0), ("-1", 4, 0),  # CUDA's ways of hiding every GPU
    ("1,7,2", 4, 1),  # CUDA stops at the first invalid entry
    ("0,-1,1", 4, 1),
    ("GPU-8f0c1a2b,MIG-3d4e5f60", 1, 2),  # UUIDs count one each
    (" 0 , 1 ", 2, 2),
    ("0", 0, 0),
])
def test_visible_gpus_follow_cuda_visible_devices(cuda_visible_devices, system, visible):
    assert gpu.visible_gpus(cuda_visible_devices, system) == visible


@pytest.mark.parametrize("override, gpus, cpus, workers", [
    (None, 0, 2, 2), (None, 0, 16, 4),  # CPU: one per CPU, at most 4 (unchanged)
    (None, 1, 16, 1), (None, 4, 16, 4),  # one per GPU
    (8, 4, 16, 8), (3, 0, 16, 3),  # ORTHSERVE_WORKERS wins
])
def test_worker_count(override, gpus, cpus, workers, caplog):
    with caplog.at_level(logging.WARNING, logger="orthserve.service"):
        assert gpu.workers_for(override, gpus, cpus) == workers
    assert not caplog.records


def test_an_uneven_worker_override_is_honoured_with_a_warning(caplog):
    gpu._warn_uneven.cache_clear()
    with caplog.at_level(logging.WARNING, logger="orthserve.service"):
        assert gpu.workers_for(3, 4, 16) == 3
        assert gpu.workers_for(3, 4, 16) == 3  # warned once per process, not per call
    (record,) = caplog.records
    assert "ORTHSERVE_WORKERS=3 on 4 GPUs" in record.getMessage() and "GPUs 3-3 get no worker" in record.getMessage()


@pytest.mark.parametrize("system, visible_env, workers, max_batch", [
    (0, None, None, 32),  # CPU: as before
    (1, None, 1, 256),
    (4, None, 4, 256),
    (4, "1,3", 2, 256),  # only the GPUs CUDA_VISIBLE_DEVICES lists
    (4, "", None, 32),  # every GPU hidden: CPU
])
def test_default_workers_and_batch_follow_the_visible_gpus(gpus, monkeypatch, system, visible_env, workers,
                                                           max_batch):
    gpus(system)
    if visible_env is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible_env)
    expected = workers or min(4, runtime.available_cpus())
    assert runtime.default_workers() == expected and runtime.default_max_batch() == max_batch
    assert runtime.serving_gpus() == (workers or 0)


def test_cpu_provider_on_a_gpu_machine_keeps_the_cpu_rules(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv("ORTHSERVE_PROVIDERS", "cpu")
    assert runtime.serving_gpus() == 0 and runtime.default_workers() == min(4, runtime.available_cpus())


def test_forcing_cuda_without_a_visible_gpu_is_a_clear_error(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    monkeypatch.setenv("ORTHSERVE_PROVIDERS", "cuda")
    with pytest.raises(ValueError, match=r"ORTHSERVE_PROVIDERS=cuda asks for a GPU, but none is visible "
                                         r"\(CUDA_VISIBLE_DEVICES='-1'\)"):
        runtime.default_workers()


@pytest.mark.parametrize("visible_env, worker_index, device", [(None, 3, 2), ("2,3", 2, 1), ("2,3", 3, 0)])
def test_each_worker_takes_its_own_device(gpus, monkeypatch, visible_env, worker_index, device):
    gpus(4)
    if visible_env is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible_env)
    monkeypatch.setattr(bentoml.server_context, "worker_index", worker_index)
    assert runtime.worker_device() == device


def test_provider_options_carry_the_device_id(monkeypatch, tmp_path):
    monkeypatch.setenv("ORTHSERVE_TRT_CACHE", str(tmp_path))
    cuda = gpu.provider_options("CUDAExecutionProvider", "pixels", [3, 224, 224], 256, device_id=2)
    trt = gpu.provider_options("TensorrtExecutionProvider", "pixels", [3, 224, 224], 256, device_id=3)
    assert cuda["device_id"] == "2" and cuda["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert trt["device_id"] == "3" and trt["trt_profile_max_shapes"] == "pixels:256x3x224x224"
    assert gpu.provider_options("CUDAExecutionProvider", "pixels", [3, 224, 224], 256)["device_id"] == "0"


@pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"real photos not found at {PHOTOS}")  # export_tiny's calibration
def test_a_worker_opens_its_sessions_on_its_device(gpus, monkeypatch, tmp_path_factory):
    """Worker 3 of a 4-GPU server: the image session is asked for CUDA device 2.  The session itself then opens on
    the CPU (there is no GPU here), which is the only part replaced."""
    from orthserve.artifact import load_artifact

    art = load_artifact(export_tiny(tmp_path_factory.getbasetemp()))
    gpus(4)
    monkeypatch.setattr(bentoml.server_context, "worker_index", 3)
    asked = []
    real_session = runtime.ort_session

    def record(path, variant, providers, threads, spinning):
        asked.append(providers)
        return real_session(path, variant, ["CPUExecutionProvider"], threads, spinning=spinning)

    monkeypatch.setattr(runtime, "ort_session", record)
    encoder = runtime.OnnxEncoder(art, "image", providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                  threads=1, max_batch=8)
    (cuda, options), cpu = asked[0]
    assert (cuda, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider") and options["device_id"] == "2"
    assert encoder.device_id == 2 and encoder.variant == "fp16"  # fp16 on a GPU
