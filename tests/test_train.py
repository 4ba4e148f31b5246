import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tune_cnn.checkpoints import CHECKPOINT_FILE, load_checkpoint
from tune_cnn.config import TrainConfig
from tune_cnn.data import load_data
from tune_cnn.errors import ConfigError
from tune_cnn.optim import step_lr
from tune_cnn.train import LocalCheckpoints, train
from tune_cnn.train import main as train_main

from conftest import CUDA, make_image_folder, synthetic_splits

DIAGNOSTICS = ("loss_right", "loss_wrong", "conf_right", "conf_wrong", "ece", "forgotten", "learned", "calibration")
METRICS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "epoch_seconds", "images_per_second", "lr",
           *(f"{split}_{name}" for split in ("val", "test") for name in DIAGNOSTICS)}


def quiet(folder):
    return LocalCheckpoints(folder, echo=False)


def test_reports_every_metric_every_epoch_and_checkpoints_on_schedule(small_data, tmp_path):
    reporter = quiet(tmp_path)
    config = TrainConfig.from_flat({"epochs": 5, "checkpoint_every": 2, "batch_size": 64})
    history = train(config, small_data, reporter)
    assert [m["epoch"] for m in reporter.history] == [1, 2, 3, 4, 5]
    assert all(set(m) == METRICS for m in history)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_002", "epoch_004", "epoch_005"]
    assert history[-1]["train_acc"] > 0.9 and history[-1]["val_acc"] > 0.9
    assert all(0 <= m["val_loss"] and m["images_per_second"] > 0 for m in history)


def test_each_epochs_diagnostics_add_up(small_data, tmp_path):
    """The loss splits into its right and wrong images' shares, and images learned less images forgotten is the change
    in images right, epoch to epoch (from none right before the first)."""
    data = synthetic_splits(train=200, val=300, test=300, seed=5)
    for split in (data.val, data.test):
        split.y[:60] = (split.y[:60] + 1) % 4  # some wrong answers at every epoch
    history = train(TrainConfig.from_flat({"epochs": 4, "batch_size": 50, "lr": 3e-4}), data, quiet(tmp_path))
    for split, size in (("val", 300), ("test", 300)):
        right_before = 0
        for m in history:
            acc = m[f"{split}_acc"]
            assert m[f"{split}_loss"] == pytest.approx(acc * m[f"{split}_loss_right"] + (1 - acc) * m[f"{split}_loss_wrong"], rel=1e-6)
            assert m[f"{split}_learned"] - m[f"{split}_forgotten"] == round(acc * size) - right_before
            assert 0 <= m[f"{split}_ece"] <= 1 and 0 < m[f"{split}_conf_wrong"] <= m[f"{split}_conf_right"] + 0.5
            assert sum(n for n, _, _ in m[f"{split}_calibration"]) == size
            right_before = round(acc * size)


def test_a_cosine_schedule_sets_each_epochs_learning_rate_and_the_report_names_it(small_data, tmp_path):
    config = TrainConfig.from_flat({"epochs": 4, "batch_size": 64, "lr": 0.002, "schedule": "cosine"})
    history = train(config, small_data, quiet(tmp_path))
    assert [m["lr"] for m in history] == pytest.approx([0.002, 0.002 * (1 + 0.5**0.5) / 2, 0.001, 0.002 * (1 - 0.5**0.5) / 2])
    assert history[-1]["val_acc"] > 0.9
    assert {m["lr"] for m in train(TrainConfig.from_flat({"epochs": 2, "batch_size": 64}), small_data, quiet(tmp_path / "c"))} == {0.001}


def test_a_per_step_schedule_reports_each_epochs_last_step_rate_and_trains(small_data, tmp_path):
    """600 images in batches of 64: 10 steps an epoch, 40 in the run; the warm-up ends at step 8."""
    config = TrainConfig.from_flat({"epochs": 4, "batch_size": 64, "lr": 0.004, "schedule": "triangular", "warmup": 0.2})
    history = train(config, small_data, quiet(tmp_path))
    assert [m["lr"] for m in history] == [step_lr("triangular", 0.004, 0.2, 10 * epoch - 1, 40) for epoch in (1, 2, 3, 4)]
    assert [m["lr"] for m in history] == pytest.approx([0.004 * 31 / 32, 0.004 * 21 / 32, 0.004 * 11 / 32, 0.004 / 32])
    assert history[-1]["val_acc"] > 0.9


@pytest.mark.parametrize("settings", [{"dropout": 0.3, "augment": "crop_flip"}, {"batch_norm": True, "optimizer": "sgd", "lr": 0.05},
                                      {"schedule": "cosine"},
                                      {"schedule": "triangular", "warmup": 0.3, "optimizer": "nesterov", "lr": 0.05, "label_smoothing": 0.1,
                                       "augment": "flip_translate"},
                                      {"schedule": "onecycle", "warmup": 0.25, "augment": "translate"}, {"warmup": 0.5},
                                      {"ema": 0.9, "batch_norm": True, "tta": "flip_translate"}, {"whiten": True, "model": "fast_resnet",
                                      "width_multiplier": 0.125, "optimizer": "nesterov", "lr": 0.05}])
def test_resume_ends_with_the_same_metrics_as_an_uninterrupted_run(small_data, tmp_path, settings):
    config = TrainConfig.from_flat({"epochs": 4, "checkpoint_every": 2, "batch_size": 50, **settings})
    straight = train(config, small_data, quiet(tmp_path / "straight"))
    resumed = train(config, small_data, quiet(tmp_path / "resumed"), resume=load_checkpoint(tmp_path / "straight" / "epoch_002"))
    assert [m["epoch"] for m in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "val_forgotten", "val_learned", "test_ece",
                    "test_conf_right", "lr"):
            assert a[key] == b[key], key


def test_cli_resume_takes_the_checkpoints_settings(image_folder, decode_cache, tmp_path, capsys):
    first = ["--data", str(image_folder), "--checkpoints", str(tmp_path / "run"), "--set", "epochs=2", "checkpoint_every=1",
             "pooling=avg", "conv_width=1", "seed=7", "lr=3e-3"]
    train_main(first)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [line.split()[1] for line in lines] == ["1", "2"]
    assert lines[0].endswith(f"[checkpoint {tmp_path / 'run' / 'epoch_001'}]")
    other_run = ["--checkpoints", str(tmp_path / "run")]  # a fresh run, or a resumed one from elsewhere, would mix two runs
    for options in ([], ["--resume", str(tmp_path / "run" / "epoch_001"), "--set", "epochs=3", "--checkpoints", str(tmp_path / "x")]):
        shutil.copytree(tmp_path / "run" / "epoch_001", tmp_path / "x" / "epoch_001", dirs_exist_ok=True)
        with pytest.raises(SystemExit):
            train_main(["--data", str(image_folder), *(options or other_run)])
        folder = tmp_path / ("x" if options else "run")
        assert capsys.readouterr().err.startswith(f"error: checkpoints folder {folder} holds another run's checkpoints (epoch_001")
    train_main(["--data", str(image_folder), "--resume", str(tmp_path / "run" / "epoch_001" / CHECKPOINT_FILE), "--set", "epochs=3",
                *other_run])  # a run continued in its own folder
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["epoch_001", "epoch_002", "epoch_003"]
    capsys.readouterr()
    train_main(["--data", str(image_folder), "--checkpoints", str(tmp_path / "resumed"), "--resume", str(tmp_path / "run" / "epoch_001")])
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")] == ["2"]
    resumed = load_checkpoint(tmp_path / "resumed" / "epoch_002")["config"]
    assert (resumed["pooling"], resumed["conv_width"], resumed["seed"], resumed["lr"]) == ("avg", 1, 7, 0.003)
    with pytest.raises(SystemExit) as stop:
        train_main(["--data", str(image_folder), "--resume", str(tmp_path / "run" / "epoch_001"), "--set", "conv_width=3"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: the checkpoint was trained with conv_width=1; resume with its model, optimizer and seed "
                                       "(train --resume takes them from the checkpoint)\n")
    for option, message in ((["--set", "seed=8"], "the checkpoint was trained with seed=7; resume with its model, optimizer and seed"),
                            (["--subset", "10"], "--subset 10: a resumed run trains on its checkpoint's split (subset None); leave --subset out")):
        with pytest.raises(SystemExit):
            train_main(["--data", str(image_folder), "--resume", str(tmp_path / "run" / "epoch_001"), *option])
        assert capsys.readouterr().err.startswith(f"error: {message}")
    with pytest.raises(SystemExit):
        train_main(["--data", str(image_folder), "--resume", str(tmp_path / "run" / "epoch_003")])
    assert capsys.readouterr().err.startswith("error: the checkpoint is at epoch 3 and epochs is 3, so nothing is left to train; set epochs above 3")


def test_the_weight_average_and_test_time_augmentation_change_the_evaluation_only(small_data, image_folder, decode_cache, tmp_path):
    """Training runs on the raw weights, bit for bit as without them; the evaluated splits' metrics are another
    model's. From the command line as any other setting."""
    base = {"epochs": 2, "batch_size": 50}
    runs = {name: train(TrainConfig.from_flat({**base, **settings}), small_data, quiet(tmp_path / name))
            for name, settings in (("plain", {}), ("ema", {"ema": 0.9}), ("tta", {"tta": "flip"}))}
    for name in ("ema", "tta"):
        assert [(m["train_loss"], m["train_acc"]) for m in runs[name]] == [(m["train_loss"], m["train_acc"]) for m in runs["plain"]]
        assert runs[name][-1]["val_loss"] != runs["plain"][-1]["val_loss"] and runs[name][-1]["val_acc"] > 0.9
    train_main(["--data", str(image_folder), "--checkpoints", str(tmp_path / "cli"), "--set", "ema=0.99", "tta=flip", "epochs=1", "padding=same"])
    checkpoint = load_checkpoint(tmp_path / "cli" / "epoch_001")
    assert (checkpoint["config"]["ema"], checkpoint["config"]["tta"]) == (0.99, "flip") and set(checkpoint["ema"]) == set(checkpoint["model"])


def test_cli_resume_of_a_sweeps_checkpoint_trains_on_the_sweeps_split(image_folder, decode_cache, tmp_path, capsys):
    # As a sweep's trial: the data split with the sweep's seed (5) and a subset, the trial trained with its own seed (0)
    data = load_data(image_folder, subset=20, seed=5)
    config = TrainConfig.from_flat({"epochs": 2, "checkpoint_every": 1, "batch_size": 8})
    train(config, data, quiet(tmp_path / "trial"))
    train_main(["--data", str(image_folder), "--checkpoints", str(tmp_path / "resumed"), "--resume", str(tmp_path / "trial" / "epoch_001")])
    assert "20 train" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "resumed" / "epoch_002" / CHECKPOINT_FILE, weights_only=True)
    assert resumed["data"] == {"seed": 5, "subset": 20, "shape": [3, 20, 20, 3], "images": data.fingerprint}
    uninterrupted = torch.load(tmp_path / "trial" / "epoch_002" / CHECKPOINT_FILE, weights_only=True)
    assert all(torch.equal(resumed["model"][name], weights) for name, weights in uninterrupted["model"].items())
    with pytest.raises(ConfigError, match=r"^the checkpoint trained on the split with seed 5 and subset 20, this data has seed 0 and subset None"):
        train(config, load_data(image_folder), quiet(tmp_path / "other"), resume=load_checkpoint(tmp_path / "trial" / "epoch_001"))
    for per_class, message in ((10, "subset 20 is out of range; use 2 (one image of each class) to 18 training images (resuming a checkpoint that trained on "
                                     "3x20x20 images of 3 classes, subset 20: pass the --data it trained on)"),
                               (15, "the checkpoint trained on 3x20x20 images of 3 classes, this data has 3x20x20 images of 2 classes; "
                                    "resume on the data it trained on")):
        two_classes = make_image_folder(tmp_path / f"two{per_class}", classes=("cat", "dog"), per_class={"train": per_class, "test": 4})
        with pytest.raises(SystemExit) as stop:
            train_main(["--data", str(two_classes), "--resume", str(tmp_path / "trial" / "epoch_001")])
        assert stop.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def as_if_trained_on_cuda(checkpoint: dict) -> dict:
    """The random-number states a CUDA run saves: a CUDA generator's state is 16 bytes (seed and offset)."""
    cuda_state = torch.arange(16, dtype=torch.uint8)
    return {**checkpoint, "rng": {"torch": checkpoint["rng"]["torch"], "shuffle": cuda_state, "cuda": cuda_state}}


def test_a_checkpoint_from_a_gpu_resumes_on_the_cpu_with_a_fresh_shuffle(small_data, image_folder, decode_cache, tmp_path, capsys):
    config = TrainConfig.from_flat({"epochs": 3, "batch_size": 50, "checkpoint_every": 1, "dropout": 0.2})
    straight = train(config, small_data, quiet(tmp_path / "run"))
    checkpoint = as_if_trained_on_cuda(load_checkpoint(tmp_path / "run" / "epoch_001"))
    resumed = [train(config, small_data, quiet(tmp_path / f"resumed{i}"), resume=checkpoint) for i in range(2)]
    assert [m["epoch"] for m in resumed[0]] == [2, 3]
    assert resumed[0][-1]["train_loss"] == resumed[1][-1]["train_loss"] != straight[-1]["train_loss"]  # another order, every rerun the same
    assert resumed[0][-1]["val_acc"] > 0.9
    train_main(["--data", str(image_folder), "--checkpoints", str(tmp_path / "cli"), "--set", "epochs=1", "device=cpu"])
    torch.save(as_if_trained_on_cuda(load_checkpoint(tmp_path / "cli" / "epoch_001")), tmp_path / "cli" / "epoch_001" / CHECKPOINT_FILE)
    capsys.readouterr()
    train_main(["--data", str(image_folder), "--resume", str(tmp_path / "cli" / "epoch_001"), "--set", "epochs=2"])
    out = capsys.readouterr().out
    assert ("note: the checkpoint trained on cuda and this run is on cpu: the shuffle starts afresh, so the epochs will not repeat "
            "the original run's numbers exactly") in out and "epoch   2" in out


def test_a_run_that_diverges_stops_at_the_first_epoch_whose_loss_is_not_a_number(small_data, capsys):
    reports = []
    history = train(TrainConfig.from_flat({"lr": 1e10, "epochs": 5}), small_data, lambda metrics, folder: reports.append(metrics))
    assert len(history) == len(reports) < 5 and history[-1]["train_loss"] != history[-1]["train_loss"]  # NaN, and reported
    assert all(r["train_loss"] == r["train_loss"] for r in history[:-1])
    assert capsys.readouterr().err == (f"warning: training diverged at epoch {len(history)} (training loss nan); the run stops here; "
                                       f"a lower lr may fix it\n")


def test_checkpoints_go_to_a_folder_not_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for folder in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        with pytest.raises(ConfigError, match=r"checkpoints folder .*: .*notes\.txt is a file; pass a folder"):
            LocalCheckpoints(folder)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match=r"^checkpoints folder /proc/run: /proc is not writable; pass a folder"):
        LocalCheckpoints(Path("/proc/run"))  # a folder nobody may make anything in, root included


def test_batch_norm_leaves_out_a_last_batch_of_one_image(tmp_path):
    data = synthetic_splits(train=61, val=20, test=20)
    config = TrainConfig.from_flat({"epochs": 2, "batch_size": 20, "batch_norm": True})
    history = train(config, data, quiet(tmp_path))
    assert all(round(m["train_acc"] * 60, 6).is_integer() for m in history)  # the mean over the 60 images trained on
    with pytest.raises(ConfigError, match="batch_norm needs batch_size 2 or more"):
        TrainConfig.from_flat({"batch_size": 1, "batch_norm": True})


def test_seeds_change_the_run(small_data, tmp_path):
    runs = [train(TrainConfig.from_flat({"epochs": 1, "seed": s, "dropout": 0.2}), small_data, quiet(tmp_path / str(s))) for s in (0, 0, 1)]
    assert runs[0][0]["train_loss"] == runs[1][0]["train_loss"] != runs[2][0]["train_loss"]


def test_cuda_graph_changes_nothing_off_cuda(small_data, tmp_path):
    runs = [train(TrainConfig.from_flat({"epochs": 1, "device": "cpu", "cuda_graph": g}), small_data, quiet(tmp_path / str(g))) for g in (True, False)]
    assert runs[0][0]["train_loss"] == runs[1][0]["train_loss"]


# --- On a CUDA GPU (the device machine; skipped elsewhere) ------------------------------------------------


@CUDA
@pytest.mark.parametrize("settings", [{}, {"batch_norm": True, "optimizer": "sgd", "lr": 0.05, "augment": "crop_flip"}])
def test_cuda_graph_trains_like_the_eager_engine(small_data, tmp_path, settings):
    """600 images in batches of 64: nine full batches (three eager warm-ups, then capture and replays) and a
    short last batch that runs eagerly, every epoch. fp32, so only kernel choices differ between the two."""
    base = {"epochs": 3, "batch_size": 64, "device": "cuda", "precision": "fp32", **settings}
    eager = train(TrainConfig.from_flat({**base, "cuda_graph": False}), small_data, quiet(tmp_path / "eager"))
    graphed = train(TrainConfig.from_flat({**base, "cuda_graph": True}), small_data, quiet(tmp_path / "graph"))
    for a, b in zip(eager, graphed):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-2)
        assert abs(a["train_acc"] - b["train_acc"]) <= 0.02 and abs(a["val_acc"] - b["val_acc"]) <= 0.03
    assert graphed[-1]["val_acc"] > 0.9


@CUDA
def test_cuda_graph_resumes_from_a_checkpoint(small_data, tmp_path):
    config = TrainConfig.from_flat({"epochs": 4, "checkpoint_every": 2, "batch_size": 64, "device": "cuda", "precision": "fp32",
                                    "cuda_graph": True, "batch_norm": True})
    straight = train(config, small_data, quiet(tmp_path / "straight"))
    resumed = train(config, small_data, quiet(tmp_path / "resumed"), resume=load_checkpoint(tmp_path / "straight" / "epoch_002"))
    assert [m["epoch"] for m in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-2) and abs(a["val_acc"] - b["val_acc"]) <= 0.03


@CUDA
def test_a_checkpoint_from_the_cpu_resumes_on_cuda(small_data, tmp_path):
    config = TrainConfig.from_flat({"epochs": 2, "checkpoint_every": 1, "batch_size": 64, "device": "cpu"})
    train(config, small_data, quiet(tmp_path / "cpu"))
    on_gpu = TrainConfig.from_flat({**config.flat(), "device": "cuda"})
    resumed = train(on_gpu, small_data, quiet(tmp_path / "gpu"), resume=load_checkpoint(tmp_path / "cpu" / "epoch_001"))
    assert [m["epoch"] for m in resumed] == [2] and resumed[0]["val_acc"] > 0.8


def test_cli_bad_setting_is_one_line_and_exit_code_2():
    run = subprocess.run([sys.executable, "-m", "tune_cnn.train", "--set", "dropout=1.5"], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["error: dropout 1.5 is out of range; use 0 <= dropout < 1"]


def test_seed_model_learns_real_cifar10(cifar_archive, tmp_path):
    data = load_data(cifar_archive, subset=5000)
    history = train(TrainConfig.from_flat({"epochs": 2}), data, quiet(tmp_path))
    assert history[-1]["val_acc"] >= 0.35
    assert history[-1]["test_acc"] >= 0.35
