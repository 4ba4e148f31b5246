"""Checkpoints: what a checkpoint file holds and how it loads, and the checks that it can continue a run."""
import dataclasses
import math
import os
import shutil

import numpy as np
import pytest
import torch

from tune_cnn.checkpoints import CHECKPOINT_FILE, load_checkpoint, restore
from tune_cnn.config import TrainConfig
from tune_cnn.engine import build_engine
from tune_cnn.errors import ConfigError
from tune_cnn.train import LocalCheckpoints, train

from conftest import synthetic_splits


def quiet(folder):
    return LocalCheckpoints(folder, echo=False)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_checkpoints_load_with_weights_only(small_data, tmp_path):
    train(TrainConfig.from_flat({"epochs": 1}), small_data, quiet(tmp_path))
    state = torch.load(tmp_path / "epoch_001" / CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 1 and {"model", "optimizer", "rng", "config"} <= set(state)
    assert state["data"] == {"seed": 0, "subset": None, "shape": [3, 20, 20, 4], "images": small_data.fingerprint}
    assert load_checkpoint(tmp_path / "epoch_001" / CHECKPOINT_FILE)["epoch"] == 1  # the file itself, as well as its folder


def test_a_checkpoint_resumes_only_its_own_model(small_data, tmp_path):
    config = TrainConfig.from_flat({"epochs": 2, "batch_size": 50, "pooling": "avg"})
    train(config, small_data, quiet(tmp_path))
    checkpoint = load_checkpoint(tmp_path / "epoch_002")
    with pytest.raises(ConfigError, match=r"^the checkpoint was trained with pooling=avg; resume with its model"):
        train(TrainConfig.from_flat({"epochs": 3, "batch_size": 50}), small_data, quiet(tmp_path / "max"), resume=checkpoint)
    assert not (tmp_path / "max").exists()
    assert train(config, small_data, quiet(tmp_path / "again"), resume=checkpoint) == []  # as a sweep's trial restored at its end


def test_a_checkpoint_resumes_only_on_its_own_images(small_data, tmp_path):
    config = TrainConfig.from_flat({"epochs": 2, "batch_size": 50})
    train(config, small_data, quiet(tmp_path))
    checkpoint = load_checkpoint(tmp_path / "epoch_002")
    assert synthetic_splits().fingerprint == small_data.fingerprint
    renamed = dataclasses.replace(small_data, classes=("ant", "bee", "cat", "dog"))  # small_data's shape and split
    reordered = dataclasses.replace(small_data, train=small_data.train.take(np.arange(len(small_data.train))[::-1]))
    assert renamed.fingerprint != small_data.fingerprint != reordered.fingerprint
    same_shape = synthetic_splits(seed=1)  # other pixels, the same names and labels: resumable (decoders may differ)
    assert same_shape.fingerprint == small_data.fingerprint and same_shape.shape == small_data.shape
    with pytest.raises(ConfigError, match=r"^the checkpoint trained on other images than those of synthetic \(the same shape and split"):
        train(TrainConfig.from_flat({"epochs": 3, "batch_size": 50}), renamed, quiet(tmp_path / "other"), resume=checkpoint)
    assert not (tmp_path / "other").exists()
    older = {**checkpoint, "data": {key: value for key, value in checkpoint["data"].items() if key != "images"}}
    assert [m["epoch"] for m in train(TrainConfig.from_flat({"epochs": 3, "batch_size": 50}), small_data, quiet(tmp_path / "older"),
                                      resume=older)] == [3]  # written before checkpoints had a fingerprint


def test_a_checkpoint_without_its_parts_is_one_clear_error(small_data, tmp_path):
    (tmp_path / "partial").mkdir()
    torch.save({"model": {}, "epoch": 3}, tmp_path / "partial" / CHECKPOINT_FILE)
    (tmp_path / "notes.txt").write_text("hello")  # torch's safe load fails on text with a KeyError
    for path in (tmp_path / "partial", tmp_path / "notes.txt"):
        with pytest.raises(ConfigError, match=r"is not a tune_cnn checkpoint \(unreadable, without model, optimizer, epoch, rng, config"):
            load_checkpoint(path)
    config = TrainConfig.from_flat({"epochs": 2, "batch_size": 50})
    train(config, small_data, quiet(tmp_path / "run"))
    checkpoint = load_checkpoint(tmp_path / "run" / "epoch_002")
    shutil.copy(tmp_path / "run" / "epoch_002" / CHECKPOINT_FILE, tmp_path / "renamed.pt")
    assert load_checkpoint(tmp_path / "renamed.pt")["epoch"] == 2  # a checkpoint file by any name
    assert (tmp_path / "run" / "epoch_002").stat().st_mode & 0o777 == 0o777 & ~current_umask()  # not the temporary folder's 0700
    edited = {**checkpoint, "model": {k: v for k, v in checkpoint["model"].items() if not k.endswith("bias")}}
    with pytest.raises(ConfigError, match=r"^the checkpoint's weights do not fit its model \(Error\(s\) in loading state_dict"):
        train(TrainConfig.from_flat({"epochs": 3, "batch_size": 50}), small_data, quiet(tmp_path / "edited"), resume=edited)


def test_a_checkpoint_keeps_which_images_were_right_and_one_without_them_says_so(small_data, tmp_path):
    config = TrainConfig.from_flat({"epochs": 3, "checkpoint_every": 1, "batch_size": 50})
    train(config, small_data, quiet(tmp_path / "run"))
    checkpoint = load_checkpoint(tmp_path / "run" / "epoch_001")
    assert {name: (mask.dtype, len(mask)) for name, mask in checkpoint["correct"].items()} == {"val": (torch.bool, 200), "test": (torch.bool, 200)}
    older = {key: value for key, value in checkpoint.items() if key != "correct"}  # as checkpoints before the diagnostics
    resumed = train(config, small_data, quiet(tmp_path / "older"), resume=older)
    assert math.isnan(resumed[0]["val_forgotten"]) and math.isnan(resumed[0]["test_learned"])  # unknown, not zero
    assert not math.isnan(resumed[1]["val_forgotten"])


def test_a_checkpoint_keeps_the_averaged_weights_and_one_without_them_starts_the_average_at_its_weights(small_data, tmp_path):
    """A run with ema resumed from a checkpoint trained without it averages from the checkpoint's weights on, as a
    fresh run averages from its initial weights."""
    for ema in (0.0, 0.9):
        train(TrainConfig.from_flat({"epochs": 1, "batch_size": 50, "batch_norm": True, "ema": ema}), small_data, quiet(tmp_path / str(ema)))
    plain, averaged = (load_checkpoint(tmp_path / str(ema) / "epoch_001") for ema in (0.0, 0.9))
    assert "ema" not in plain and set(averaged["ema"]) == set(averaged["model"])
    assert not torch.equal(averaged["ema"]["0.weight"], averaged["model"]["0.weight"])
    for checkpoint, expected in ((averaged, averaged["ema"]), (plain, plain["model"])):
        engine = build_engine(TrainConfig.from_flat({"epochs": 2, "batch_size": 50, "batch_norm": True, "ema": 0.9}), small_data.shape,
                              small_data.mean, small_data.std)
        assert restore(engine, checkpoint, {}) == 1
        assert all(torch.equal(value, expected[name]) for name, value in engine.average.model.state_dict().items())
