"""Smoke tests of the benchmark scripts in bench/ (accuracy, speed, int8 headroom, load, GPU on the CPU).

orthserve-tiny with random weights, 2 classes, 1 shot, 1 seed, 2 methods, 1 epoch: checks the
plumbing (styled cache, class views, runs through the training CLI, table / JSON / chart), not accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, requires_data

pytestmark = pytest.mark.slow  # every benchmark script end to end

sys.path.insert(0, str(REPO / "bench"))

METHODS = ["zeroshot", "orthcr-reg-cutout"]
TINY = ["--model", "orthserve-tiny", "--pretrained", "none", "--seeds", "1", "--epochs", "1",
        "--methods", *METHODS]


@requires_data
def test_base_to_new_smoke(tmp_path):
    import base_to_new

    out, cache = tmp_path / "results", tmp_path / "cache"
    result = base_to_new.main([*TINY, "--limit-classes", "2", "--shots", "1", "--out", str(out),
                               "--cache-dir", str(cache)])
    assert {p.name for p in out.iterdir()} >= {"base_to_new.md", "base_to_new.json", "base_to_new.png"}
    data = json.loads((out / "base_to_new.json").read_text())
    assert data["settings"]["style"] == "gray" and len(data["classes"]["base"]) == 1 and len(data["classes"]["new"]) == 1
    assert sorted(data["dropped_classes"]) == ["n02480855", "n10148035"]  # no val images
    assert [r["method"] for r in data["runs"]] == METHODS
    table = (out / "base_to_new.md").read_text()
    assert "python bench/base_to_new.py" in table
    for method in METHODS:
        row = data["summary"][method]
        for key in ("base", "new"):
            assert 0.0 <= row[key]["mean"] <= 1.0
        line = next(l for l in table.splitlines() if l.startswith(f"| {base_to_new.METHOD_LABELS[method]} |"))
        assert f"{row['base']['mean'] * 100:.1f}" in line and f"{row['new']['mean'] * 100:.1f}" in line
    # styled images live in the cache, as an ImageFolder the CLI read; a second call reuses the runs
    assert any((cache / "styled").glob("tiny-imagenet-train-gray-v1-*/n*/*.png"))
    again = base_to_new.main([*TINY, "--limit-classes", "2", "--shots", "1", "--out", str(out),
                              "--cache-dir", str(cache), "--methods", "zeroshot"])
    assert again["runs"][0]["reused"] and again["runs"][0]["base_top1"] == result["runs"][0]["base_top1"]


@requires_data
def test_transfer_smoke(tmp_path):
    """Cross-dataset and domain generalization: one training run per (method, seed), evaluated on
    three styled copies of the base test images and on two other datasets; block-size variants."""
    import transfer

    out, cache = tmp_path / "results", tmp_path / "cache"
    argv = ["--model", "orthserve-tiny", "--pretrained", "none", "--seeds", "1", "--epochs", "1", "--shots", "1",
            "--limit-classes", "2", "--methods", "zeroshot", "orthcr-bs16", "--out", str(out), "--cache-dir", str(cache),
            "--tag", "smoke"]
    result = transfer.main(argv)
    assert {p.name for p in out.iterdir()} >= {"transfer_smoke.md", "transfer_smoke.json", "transfer_smoke.png"}
    assert set(result["sets"]) == {"dg-gray", "dg-edges", "dg-blur", "cross-flowers5", "cross-ants-bees"}
    for style in ("gray", "edges", "blur"):
        assert any((cache / "styled").glob(f"tiny-imagenet-val-{style}-v1-*/n*/*.png"))
    zeroshot, orthcr = result["runs"]
    assert zeroshot["trainable_parameters"] == 0 and orthcr["trainable_parameters"] > 0
    assert orthcr["seconds_per_step"] > 0
    assert orthcr["argv"][orthcr["argv"].index("--block-size") + 1] == "16"
    for run in result["runs"]:
        for key in (*result["sets"], "base", "new", "dg_mean", "cross_mean"):
            assert 0.0 <= run[key] <= 1.0, key
        assert run["dg_mean"] == pytest.approx(sum(run[f"dg-{s}"] for s in ("gray", "edges", "blur")) / 3)
    table = (out / "transfer_smoke.md").read_text()
    line = next(l for l in table.splitlines() if l.startswith("| OrthCR + KL + random Cutout, blocks of 16 |"))
    assert f"{orthcr['cross-flowers5'] * 100:.1f}" in table and "n/a" not in line
    again = transfer.main(argv)  # runs and their evaluations are reused
    assert all(r["reused"] for r in again["runs"]) and again["runs"][1]["dg-blur"] == orthcr["dg-blur"]


@requires_data
def test_fewshot_curve_smoke(tmp_path):
    import fewshot_curve

    out = tmp_path / "results"
    fewshot_curve.main([*TINY, "--limit-classes", "2", "--shots", "1", "--test-per-class", "5",
                        "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    data = json.loads((out / "fewshot_curve.json").read_text())
    assert data["classes"] == ["daisy", "rose"] and (out / "fewshot_curve.png").is_file()
    table = (out / "fewshot_curve.md").read_text()
    assert "python bench/fewshot_curve.py" in table and "| method | 1-shot |" in table
    for method in METHODS:
        stat = data["summary"][method]["1"]
        assert stat["n"] == 1 and 0.0 <= stat["mean"] <= 1.0
        run = next(r for r in data["runs"] if r["method"] == method)
        assert run["test_images"] == 10
        line = next(l for l in table.splitlines() if l.startswith(f"| {fewshot_curve.METHOD_LABELS[method]} |"))
        assert f"{stat['mean'] * 100:.1f}" in line


@requires_data
def test_lr_sweep_chooses_on_validation_and_feeds_the_benchmarks(tmp_path):
    """The sweep trains each method at each factor, picks the best validation top-1, and
    ``--lrs`` passes the chosen rates to the benchmark's runs (Cutout variants: their parent's)."""
    import common
    import fewshot_curve
    import lr_sweep

    out, cache = tmp_path / "results", tmp_path / "cache"
    result = lr_sweep.main(["--model", "orthserve-tiny", "--pretrained", "none", "--epochs", "1", "--limit-classes", "4",
                            "--shots", "2", "--val-shots", "2", "--factors", "1", "10", "--methods", "lora",
                            "orthcr-reg-cutout", "--out", str(out), "--cache-dir", str(cache)])
    assert [r["method"] for r in result["runs"]] == ["lora", "lora", "orthcr-reg", "orthcr-reg"]
    assert [r["lr"] for r in result["runs"][:2]] == pytest.approx([2e-4, 2e-3])
    for method in ("lora", "orthcr-reg"):
        row = result["table"][method]
        best = max(row["scores"].values())
        assert row["scores"][repr(row["chosen_factor"])] == best
        assert result["chosen"][method] == pytest.approx(row["default"] * row["chosen_factor"])
    assert result["chosen"]["orthcr-reg-cutout"] == result["chosen"]["orthcr-reg"]
    for run in result["runs"]:  # validation came from the training folder: 2 base classes x 2 images
        assert "--val-shots" in run["argv"] and run["val_top1"] is not None
    assert "**" in (out / "lr_sweep.md").read_text() and (out / "lr_sweep.png").is_file()

    curve = fewshot_curve.main([*TINY, "--limit-classes", "2", "--shots", "1", "--test-per-class", "2",
                                "--lrs", str(out / "lr_sweep.json"), "--out", str(tmp_path / "curve"),
                                "--cache-dir", str(cache)])
    run = next(r for r in curve["runs"] if r["method"] == "orthcr-reg-cutout")
    if result["table"]["orthcr-reg"]["chosen_factor"] == 1.0:  # the CLI default: no flag, runs stay reusable
        assert "--lr" not in run["argv"]
    else:
        assert float(run["argv"][run["argv"].index("--lr") + 1]) == pytest.approx(result["chosen"]["orthcr-reg-cutout"])
    assert common.method_flags("lora", {"lora": 2e-4}) == common.METHODS["lora"]  # 2e-4 is LoRA's default
    assert common.method_flags("lora", {"lora": 5e-3})[-2:] == ["--lr", "0.005"]
    assert "--lr" not in next(r for r in curve["runs"] if r["method"] == "zeroshot")["argv"]
    assert "Learning rates from" in (tmp_path / "curve" / "fewshot_curve.md").read_text()


def test_bad_lrs_file_is_refused(tmp_path):
    import common

    with pytest.raises(FileNotFoundError, match="lr_sweep"):
        common.load_lrs(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"chosen": {"lora": -1}}))
    with pytest.raises(ValueError, match="positive"):
        common.load_lrs(bad)
    bad.write_text(json.dumps({"chosen": {"nope": 1e-3}}))
    with pytest.raises(ValueError, match="unknown method"):
        common.load_lrs(bad)
    assert common.learning_rates(argparse.Namespace(lrs=None, lr=["lora=0.005"])) == {"lora": 0.005}
    for item in ("lora=fast", "nope=0.1", "lora=0", "lora"):
        with pytest.raises(ValueError, match="METHOD=RATE"):
            common.learning_rates(argparse.Namespace(lrs=None, lr=[item]))


def test_unknown_method_is_refused(tmp_path):
    import base_to_new

    with pytest.raises(SystemExit, match="unknown method"):
        base_to_new.main(["--methods", "nope", "--out", str(tmp_path)])


def test_train_step_smoke(tmp_path):
    """bench/train_step.py on orthserve-tiny: per-method processes and the side-by-side ratio."""
    out = tmp_path / "train_step"
    done = subprocess.run([sys.executable, "bench/train_step.py", "--model", "orthserve-tiny", "--batch-size", "4",
                           "--devices", "cpu", "--methods", "lora", "orthcr-ce", "--warmup", "1", "--steps", "1",
                           "--interleave", "lora", "orthcr-ce", "orthcr-ce@4896f2c", "--rounds", "2", "--flops",
                           "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in report["results"]["cpu"]] == ["lora", "orthcr-ce"]
    assert all(r["step_s_median"] > 0 and r["peak_memory_mib"] > 0 for r in report["results"]["cpu"])
    (side,) = report["interleaved"]
    assert side["methods"] == ["lora", "orthcr-ce", "orthcr-ce@4896f2c"] and len(side["step_s_all"]["orthcr-ce"]) == 2
    assert side["ratio_to_first"]["lora"] == 1.0 and side["ratio_to_first"]["orthcr-ce"] > 0
    # FLOPs of a real step: the orthogonal adapter does more work than LoRA, the old code as much as the new
    flops = side["flops"]["per_step"]
    assert flops["orthcr-ce"] > flops["lora"] > 0 and 0 < side["flops"]["fraction_of_matmul_rate"]["lora"] < 1
    assert "Side by side" in out.with_suffix(".md").read_text()


def test_cayley_candidates_smoke(tmp_path):
    """bench/cayley.py --smoke: every candidate timed and checked; the exact ones agree with a solve."""
    import cayley

    report = cayley.main(["--smoke", "--devices", "cpu", "--out", str(tmp_path)])
    rows = report["runs"][0]["candidates"]
    assert set(rows) == set(cayley.CANDIDATES)
    for name, row in rows.items():
        assert row["median_s"] > 0 and row["cpu_ops"] > 0
        if name != "neumann-5":
            assert row["orthogonality_error"] < 1e-5 and row["max_diff_from_solve"] < 1e-5, name
    assert rows["neumann-5"]["orthogonality_error"] > 1e-3  # at |Q|_2 = 1 the truncated series is far off
    assert (tmp_path / "cayley_smoke.md").is_file()


@requires_data
def test_gpu_check_smoke(tmp_path):
    """bash bench/gpu_check.sh --smoke on the CPU: every section runs at toy scale and the report is written."""
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--no-compile", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    assert report["smoke"] and report["environment"]["device"] == "cpu"
    statuses = {name: section["status"] for name, section in report["sections"].items()}
    assert statuses == dict.fromkeys(["cayley", "steps", "data", "training", "export", "inference"], "ok"), report["sections"]
    assert report["sections"]["data"]["by_workers"]["0"]["images_per_s"] > 0
    steps = report["sections"]["steps"]["runs"]
    assert [run["methods"] for run in steps][0] == ["lora", "orthcr-ce", "orthcr-ce@4896f2c"]
    assert report["sections"]["training"]["runs"]["orthcr"]["orthogonality_error"] < 1e-5
    assert report["sections"]["export"]["parity"]
    text = (tmp_path / "gpu_check_smoke.md").read_text()
    assert "Smoke scale" in text and "fraction of matmul rate" in text


def test_inference_ratios_are_paired_per_round():
    """Two equally fast paths on a machine that slowed down in one round: the paired ratio is 1."""
    import inference

    rounds = {"a": {"8": [100.0, 40.0, 100.0]}, "b": {"8": [100.0, 40.0, 100.0]}}
    assert inference.paired_ratio(rounds, "a", "b", "8") == 1.0
    rounds["a"]["8"] = [90.0, 36.0, 90.0]
    assert inference.paired_ratio(rounds, "a", "b", "8") == 0.9


def test_top_two_margins_measure_how_near_a_tie_each_answer_is():
    """Best minus second-best score per image, whatever the order of the classes."""
    import int8_fidelity
    import numpy as np

    scores = np.array([[0.30, 0.10, 0.29], [0.05, 0.50, 0.20]])
    assert np.allclose(int8_fidelity.top_two_margins(scores), [0.01, 0.30])


@requires_data
def test_inference_benchmark_smoke(tmp_path):
    """bench/inference.py --smoke on orthserve-tiny: every path timed, ratios, verdicts, table and chart."""
    done = subprocess.run([sys.executable, "bench/inference.py", "--smoke", "--models", "orthserve-tiny",
                           "--batches", "1", "2", "--seconds", "0.05", "--matmul-n", "256", "--accuracy-images", "8",
                           "--tiny-per-class", "0", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "inference.json").read_text())
    (result,) = report["results"]
    assert set(result["ratios"]) == {"folded_over_base", "unfolded_over_base", "ort_fp32_over_folded", "int8_over_fp32"}
    assert all(value > 0 for row in result["ratios"].values() for value in row.values())
    layout = result["service_layout"]  # fp32 and int8 in worker processes, as the service runs them
    assert layout["workers"] >= 1 and set(layout["int8_over_fp32"]) == {"1", "2"}
    assert all(rate > 0 for v in ("fp32", "int8") for rates in layout["images_per_s_all_rounds"][v].values() for rate in rates)
    assert sum("service layout" in v["target"] for v in report["verdicts"]) == 2
    markdown = (tmp_path / "inference.md").read_text()
    assert "Ratios" in markdown and "service's layout" in markdown and (tmp_path / "inference.png").stat().st_size > 0


@requires_data
def test_load_benchmark_smoke(tmp_path_factory, tmp_path):
    """bench/load.py against a live `bentoml serve` it starts itself: service vs raw, zero-shot check, and where
    the CPU time went per request (client, service worker)."""
    from service_helpers import export_tiny

    artifact = export_tiny(tmp_path_factory.getbasetemp())
    done = subprocess.run([sys.executable, "bench/load.py", "--serve", str(artifact), "-c", "2", "--seconds", "2",
                           "--images", "4", "--compare-raw", "--zero-shot-check", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "service_vs_raw.json").read_text())
    (row,) = summary["rows"]
    assert row["service"]["errors"] == 0 and row["service"]["requests_ok"] > 0 and row["ratio"] > 0
    assert row["service"]["mean_batch_size"] >= 1  # the batcher's histogram reached /metrics
    cpu = row["service"]["cpu_ms_per_request"]
    assert cpu["client"] > 0 and cpu["api"] > 0, cpu
    assert summary["zero_shot"]["errors"] == 0
    assert "CPU ms / request" in (tmp_path / "service_vs_raw.md").read_text()


def test_image_gflop_counts_attention():
    """ViT-B-32's image tower is about 8.8 GFLOP per 224 px image; counting without a grad-requiring input
    missed nn.MultiheadAttention's fused inference path and read 5.9."""
    import inference
    import orthserve

    model, _, _ = orthserve.load_model("ViT-B-32", "none")
    model.eval().requires_grad_(False)
    assert 8.7 < inference.image_gflop(model, 224) < 8.9


def test_gpu_inference_smoke(tmp_path):
    """bench/gpu_inference.py --device cpu --smoke: paths timed, checked against fp32, roofline verdict, table
    and chart; the GPU run itself needs a CUDA machine."""
    done = subprocess.run([sys.executable, "bench/gpu_inference.py", "--device", "cpu", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_inference.json").read_text())
    result = report["result"]
    assert result["paths"] == ["torch-fp32", "torch-fp16", "torch-bf16"]
    assert all(rate > 0 for rates in result["images_per_s"].values() for rate in rates.values())
    assert all(c["cosine_min"] > 0.99 for c in result["check_against_torch_fp32"].values())
    assert report["roofline"]["batch"] == 4 and report["roofline"]["images_per_s"] > 0
    assert "SMOKE SCALE" in (tmp_path / "gpu_inference.md").read_text()
    assert (tmp_path / "gpu_inference.png").stat().st_size > 0


def test_gpu_inference_without_cuda_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    done = subprocess.run([sys.executable, "bench/gpu_inference.py", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no CUDA device" in done.stderr and "Traceback" not in done.stderr


@requires_data
def test_int8_headroom_smoke(tmp_path_factory, tmp_path):
    """bench/int8_headroom.py --smoke on an exported orthserve-tiny: the CPU's int8 instructions, bare matmuls
    fp32 against int8, the tower's profile split, the speed-up the target needs; table and chart."""
    from service_helpers import export_tiny

    artifact = export_tiny(tmp_path_factory.getbasetemp())
    done = subprocess.run([sys.executable, "bench/int8_headroom.py", str(artifact), "--smoke", "--models", "orthserve-tiny",
                           "--batches", "1", "2", "--square", "128", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "int8_headroom.json").read_text())
    assert report["cpu"]["int8_dot"] and set(report["cpu"]["flags"]) >= {"avx2", "amx_int8"}
    assert report["gemms"]["square"]["int8_over_fp32"] > 0
    block = report["gemms"]["blocks"]["orthserve-tiny"]
    assert block["tokens"] == 17 and len(block["shapes"]) == 4  # 64 px / patch 16 -> 16 patches + class token
    assert all(block["block"][b]["int8_ms"] > 0 for b in ("1", "2"))
    tower = report["tower"]
    assert tower["model"] == "orthserve-tiny" and all(tower["int8_over_fp32"][b] > 0 for b in ("1", "2"))
    for variant in ("fp32", "int8"):
        assert all(tower["profile"][variant][b]["matmul_ms"] > 0 for b in ("1", "2"))
    assert "DynamicQuantizeMatMul" in tower["profile"]["int8"]["2"]["ops_ms"]
    assert {"at_matmul_speedup", "matmul_speedup_for_target", "free_matmuls"} <= set(report["headroom"]["2"])
    assert "matmul speed-up that" in (tmp_path / "int8_headroom.md").read_text()
    assert (tmp_path / "int8_headroom.png").stat().st_size > 0


def test_int8_headroom_without_artifact_says_so(tmp_path):
    done = subprocess.run([sys.executable, "bench/int8_headroom.py", str(tmp_path / "nothing"), "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no artifact there" in done.stderr and "Traceback" not in done.stderr
