"""End to end: `python -m training.finetune` / `training.evaluate` on orthserve-tiny and flowers5."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orthserve.runs import RunInfo, load_run
from training import evaluate, finetune
from training.data import DataError
from test_training_data import make_folder  # tests/ is on sys.path (rootdir conftest)

REPO = Path(__file__).resolve().parents[1]


def quick(data: Path, out: Path, *extra: str) -> list[str]:
    """A few-step run: 2 shots x 5 classes, one batch of 10 per epoch, tiny held-out sets."""
    return ["--model", "orthserve-tiny", "--pretrained", "none", "--data", str(data), "--out", str(out),
            "--shots", "2", "--epochs", "1", "--batch-size", "10", "--workers", "0", "--val-shots", "1",
            "--test-per-class", "4", "--eval-batch-size", "32", "--progress", "off", *extra]


@pytest.mark.parametrize("method", finetune.METHODS)
def test_every_method_trains_one_epoch_and_rebuilds(sample_images, tmp_path, method):
    out = tmp_path / "run"
    metrics = finetune.main(quick(sample_images / "flowers5", out, "--method", method))
    for name in ("adapter.safetensors", "run.json", "metrics.json", "confusion.png"):
        assert (out / name).is_file(), name
    if method != "zeroshot":
        assert (out / "curves.png").is_file() and (out / "log.csv").is_file() and (out / "checkpoint.pt").is_file()
        baseline, trained = metrics["epochs"]  # epoch 0 is the zero-shot model, then the one trained epoch
        assert baseline["epoch"] == 0 and {"val_acc", "val_loss", "test_top1"} <= baseline.keys()
        assert trained["epoch"] == 1 and trained["train_loss"] > 0 and "val_acc" in trained and trained["train_seconds"] > 0
        assert metrics["zero_shot"]["test_top1"] == baseline["test_top1"]
        assert metrics["gain"]["test_top1"] == pytest.approx(metrics["test"]["top1"] - baseline["test_top1"])
    else:
        assert metrics["zero_shot"]["test_top1"] == metrics["test"]["top1"] and metrics["gain"]["test_top1"] == 0
    assert json.loads((out / "metrics.json").read_text())["test"]["top1"] == metrics["test"]["top1"]
    info = RunInfo.read(out)
    assert info.method == method and info.classnames == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert {"torch", "open_clip"} <= info.extra["versions"].keys() and "git_commit" in info.extra
    tensors = load_file(str(out / "adapter.safetensors"))
    if method in ("lora", "aoft", "orthcr", "orthcr+taskres", "taskres"):
        assert tensors and all(k.startswith(("model.", "taskres.")) for k in tensors)
    # the run rebuilds from RUN_DIR alone and scores the same held-out images identically
    result = evaluate.main(["--run", str(out), "--data", str(sample_images / "flowers5"), "--per-class", "3",
                            "--workers", "0", "--out", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text())["top1"] == result["top1"]
    classifier, _ = load_run(out)
    assert classifier.classnames == info.classnames


def test_resumed_run_ends_with_the_same_metrics(sample_images, tmp_path):
    args = ["--method", "orthcr+taskres", "--epochs", "3", "--shots", "3", "--batch-size", "8",
            "--cutout", "attentive"]
    whole = finetune.main(quick(sample_images / "flowers5", tmp_path / "whole", *args))
    parted = tmp_path / "parted"
    stopped = finetune.main(quick(sample_images / "flowers5", parted, *args, "--stop-after-epochs", "1"))
    assert stopped["stopped_at_epoch"] == 1 and not (parted / "metrics.json").exists()
    stale = parted / ".checkpoint.pt.tmp-99999"  # what a kill -9 during a checkpoint write leaves
    stale.write_bytes(b"half a checkpoint")
    resumed = finetune.main(quick(sample_images / "flowers5", parted, *args, "--resume"))
    assert not stale.exists()
    untimed = lambda rows: [{k: v for k, v in row.items() if k != "train_seconds"} for row in rows]  # noqa: E731
    assert untimed(resumed["epochs"]) == untimed(whole["epochs"]) and resumed["test"] == whole["test"]
    assert resumed["zero_shot"] == whole["zero_shot"]
    a, b = load_file(str(tmp_path / "whole" / "adapter.safetensors")), load_file(str(parted / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_base_to_new_reports_harmonic_mean(sample_images, tmp_path):
    metrics = finetune.main(quick(sample_images / "flowers5", tmp_path / "run", "--method", "lora", "--subsample", "base"))
    assert RunInfo.read(tmp_path / "run").classnames == ["daisy", "dandelion", "rose"]
    base, new = metrics["base_top1"], metrics["new_top1"]
    assert metrics["new"]["images"] == 8  # 4 per new class
    assert metrics["harmonic_mean"] == pytest.approx(0 if base + new == 0 else 2 * base * new / (base + new))
    result = evaluate.main(["--run", str(tmp_path / "run"), "--data", str(sample_images / "flowers5"),
                            "--subsample", "new", "--per-class", "4", "--seed", "3", "--workers", "0"])
    assert result["classes"] == ["sunflower", "tulip"] and result["images"] == 8
    assert (tmp_path / "run" / "eval-flowers5-new.json").is_file()


def test_zero_shot_evaluation_needs_no_run(sample_images, tmp_path):
    result = evaluate.main(["--model", "orthserve-tiny", "--pretrained", "none", "--data", str(sample_images / "hymenoptera-val"),
                            "--per-class", "3", "--workers", "0", "--out", str(tmp_path / "zs.json")])
    assert result["method"] == "zeroshot" and result["images"] == 6 and result["classes"] == ["ants", "bees"]


def test_yaml_config_with_flags_on_top(sample_images, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: lora\nrank: 3\nlambda1: 0.25\ntemplate: 'a photo of a {}, a flower.'\nepochs: 5\n")
    args = finetune.parse_args(quick(sample_images / "flowers5", tmp_path / "run", "--config", str(config)))
    assert (args.method, args.rank, args.lambda1, args.epochs) == ("lora", 3, 0.25, 1)  # --epochs 1 wins
    assert args.templates == ["a photo of a {}, a flower."] and args.objective == "ce" and args.lr == 2e-4
    (tmp_path / "bad.yaml").write_text("methd: lora\n")
    with pytest.raises(SystemExit):
        finetune.parse_args(quick(sample_images / "flowers5", tmp_path / "run", "--config", str(tmp_path / "bad.yaml")))


def test_help_documents_the_options():
    text = subprocess.run([sys.executable, "-m", "training.finetune", "--help"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    for option in ("--shots", "--subsample", "--method", "--lambda1", "--cutout", "attentive", "--resume",
                   "--precision", "--iters", "--warmup-steps", "--block-size", "--rank", "--val-data", "--config"):
        assert option in text, option


def test_bad_input_gets_clear_errors(sample_images, tmp_path, capsys):
    with pytest.raises(SystemExit):
        finetune.main(quick(sample_images / "flowers5", tmp_path / "r", "--method", "prompt-tuning"))
    assert "unknown --method 'prompt-tuning'" in capsys.readouterr().err
    with pytest.raises(DataError, match="does not exist"):
        finetune.main(quick(tmp_path / "nowhere", tmp_path / "r"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        finetune.main(quick(tmp_path / "empty", tmp_path / "r"))
    # a run of one model cannot be resumed or evaluated as another
    finetune.main(quick(sample_images / "flowers5", tmp_path / "r", "--method", "taskres"))
    with pytest.raises(DataError, match="orthserve-tiny"):
        finetune.main(quick(sample_images / "flowers5", tmp_path / "r", "--method", "taskres", "--resume",
                            "--model", "ViT-B-32"))
    with pytest.raises(DataError, match="already holds a run"):
        finetune.main(quick(sample_images / "flowers5", tmp_path / "r", "--method", "taskres"))
    with pytest.raises(DataError, match="not 'ViT-B-32'"):
        evaluate.main(["--run", str(tmp_path / "r"), "--model", "ViT-B-32", "--data", str(sample_images / "flowers5")])
    proc = subprocess.run([sys.executable, "-m", "training.finetune", *quick(tmp_path / "empty", tmp_path / "x")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_images_and_short_classes_do_not_stop_training(tmp_path, caplog):
    data = make_folder(tmp_path / "d", {"cat": 6, "dog": 1}, corrupt={"cat": 2, "dog": 1})
    metrics = finetune.main(["--model", "orthserve-tiny", "--pretrained", "none", "--data", str(data), "--out", str(tmp_path / "r"),
                             "--shots", "8", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                             "--method", "orthcr", "--progress", "off", "--val-shots", "0"])
    assert any("fewer than --shots 8" in n for n in metrics["notes"])
    assert any("skipped 3 unreadable" in n for n in metrics["notes"])
    assert "skipped 3 unreadable" in caplog.text


def test_csv_manifest_and_iterations(tmp_path):
    root = make_folder(tmp_path / "imgs", {"cat": 4, "dog": 4})
    rows = ["path,label"] + [f"imgs/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    metrics = finetune.main(["--model", "orthserve-tiny", "--pretrained", "none", "--data", str(tmp_path / "m.csv"), "--out",
                             str(tmp_path / "r"), "--shots", "3", "--iters", "4", "--batch-size", "2",
                             "--workers", "0", "--method", "aoft", "--progress", "off", "--val-shots", "0"])
    assert metrics["steps"] == 4 and [r["epoch"] for r in metrics["epochs"]] == [0, 1, 2]  # zero-shot, then 3 steps per epoch


@pytest.mark.slow
def test_compiled_training_follows_the_eager_loss_curve(sample_images, tmp_path):
    """``--compile`` (torch.compile of forward and loss, about a minute to compile here) trains the same
    model: per-epoch losses within 1e-3 of eager (compiled kernels reorder fp32 sums), the same number of
    steps; attentive Cutout so that the hooked frozen pass and the random draws go through it too."""
    args = ["--method", "orthcr", "--epochs", "3", "--shots", "4", "--batch-size", "10", "--cutout", "attentive"]
    eager = finetune.main(quick(sample_images / "flowers5", tmp_path / "eager", *args))
    compiled = finetune.main(quick(sample_images / "flowers5", tmp_path / "compiled", *args, "--compile"))
    assert compiled["steps"] == eager["steps"] == 6
    assert compiled["epochs"][0] == eager["epochs"][0]  # the zero-shot row
    for mine, theirs in zip(compiled["epochs"][1:], eager["epochs"][1:]):
        for key in ("train_loss", "train_ce", "train_kl", "val_loss"):
            assert abs(mine[key] - theirs[key]) < 1e-3, (key, mine[key], theirs[key])
        assert mine["orthogonality_error"] < 1e-5


def test_validation_split_is_large_enough_to_mean_something():
    assert finetune.default_val_shots(shots=16, classes=5) == 40       # 200 images, steps of 0.5%
    assert finetune.default_val_shots(shots=16, classes=100) == 4      # 400 images already
    assert finetune.default_val_shots(shots=1, classes=1000) == 1


def test_result_line_states_the_gain_over_zero_shot():
    line = finetune.result_line({"test": {"top1": 0.62}, "new_top1": 0.40,
                                 "zero_shot": {"test_top1": 0.48, "new_top1": 0.41}, "gain": {"test_top1": 0.14, "new_top1": -0.01}})
    assert line == "test top-1 62.0% (zero-shot 48.0%, +14.0 points); new-class top-1 40.0% (zero-shot 41.0%, -1.0 points)"


def test_pretrain_writes_its_run_and_resumes_from_the_shared_checkpoint(sample_images, tmp_path):
    """training.pretrain uses the run directory of finetune (training/rundir.py): same checkpoint format."""
    from training import pretrain
    from training.rundir import CHECKPOINT_FORMAT

    argv = ["--data", str(sample_images / "flowers5"), "--holdout-per-class", "1", "--epochs", "1", "--batch-size", "8",
            "--warmup-steps", "1", "--precision", "fp32", "--device", "cpu", "--out", str(tmp_path / "run"),
            "--weights-out", str(tmp_path / "mini.safetensors")]
    first = pretrain.main(argv)
    for name in ("checkpoint.pt", "metrics.json", "log.csv", "curves.png"):
        assert (tmp_path / "run" / name).is_file(), name
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["epoch"] == 1 and len(state["rng"]) == 1
    resumed = pretrain.main([*argv, "--resume"])  # nothing left to train: the same model, the same held-out score
    assert resumed["history"] == first["history"]
    assert resumed["holdout_top1_shipped"] == first["holdout_top1_shipped"]


def test_pretrain_warm_restart_from_shipped_weights_with_cutmix(sample_images, tmp_path):
    """--init-weights starts from a shipped file (folded stem, batch norms put back): before any step the
    model scores what the file scores; --cutmix trains on soft labels."""
    from training import pretrain

    common = ["--data", str(sample_images / "flowers5"), "--holdout-per-class", "1", "--batch-size", "8",
              "--warmup-steps", "1", "--precision", "fp32", "--device", "cpu"]
    first = pretrain.main([*common, "--epochs", "1", "--out", str(tmp_path / "first"),
                           "--weights-out", str(tmp_path / "first.safetensors")])
    start = pretrain.main([*common, "--epochs", "0", "--init-weights", str(tmp_path / "first.safetensors"),
                           "--out", str(tmp_path / "zero"), "--weights-out", str(tmp_path / "zero.safetensors")])
    assert start["holdout_top1_shipped"] == first["holdout_top1_shipped"]
    warm = pretrain.main([*common, "--epochs", "1", "--init-weights", str(tmp_path / "first.safetensors"),
                          "--cutmix", "1.0", "--out", str(tmp_path / "warm"), "--weights-out", str(tmp_path / "warm.safetensors")])
    assert [row["epoch"] for row in warm["history"]] == [0, 1]  # epoch 0: the file it started from
    assert warm["history"][0]["val_acc"] == start["holdout_top1"] == first["holdout_top1"]
    assert math.isfinite(warm["history"][1]["train_loss"])


def test_one_name_per_method_across_cli_config_and_benchmarks():
    """The CLI's --method is the '+'-joined ``method`` of the adapter configs it injects; benchmark names are
    '<CLI method>' or '<CLI method>-<variant>'; files with the old config name still load."""
    sys.path.insert(0, str(REPO / "bench"))
    import common  # bench/common.py

    from orthserve.adapters import config_from_dict

    for method in finetune.METHODS:
        if method in ("zeroshot", "full"):
            continue
        args = finetune.parse_args(["--data", "unused", "--out", "unused", "--method", method])
        assert "+".join(c.method for c in finetune.adapter_configs(args)) == method
    for name, flags in common.METHODS.items():
        cli_method = flags[flags.index("--method") + 1]
        assert name == cli_method or name.startswith(cli_method + "-"), name
    assert config_from_dict({"method": "orthogonal", "blocks": 4}).method == "orthcr"
