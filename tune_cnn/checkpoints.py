"""Checkpoints: what a run saves every `checkpoint_every` epochs and at its last, and the checks that a checkpoint
can continue a config on a data set.

A checkpoint file holds the model, the optimizer, the random-number states, the epoch, the settings and the data
split with its fingerprint (and, with ema, the averaged weights); it loads with torch.load(weights_only=True), so a checkpoint file cannot run code.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import astuple
from pathlib import Path
from typing import Any

import torch

from tune_cnn.config import MODEL_SETTINGS, InputShape, TrainConfig
from tune_cnn.data import DataSplits
from tune_cnn.engine import DeviceData, Engine
from tune_cnn.errors import ConfigError, first_line

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "rng", "config", "data")
CHECKPOINT_DATA_KEYS = ("seed", "subset", "shape")  # checkpoint["data"]: what check_same_data compares (and "images")
# What a resumed run must share with its checkpoint: the weights' shapes and the optimizer's state depend on them,
# and the seed's random-number states come from the checkpoint (another seed would change nothing).
RESUME_MUST_MATCH = (*MODEL_SETTINGS, "optimizer", "seed")
Checkpoint = Mapping[str, Any]


def save_checkpoint(folder: Path, engine: Engine, epoch: int, data: DataSplits, evaluated: Mapping[str, DeviceData]) -> None:
    """The engine's state after `epoch` into folder/checkpoint.pt, with the settings, the data's split, which
    images of each `evaluated` split the model got right (for the next epoch's forgotten and learned), and with ema the
    averaged weights (under "ema", in the model's layout)."""
    averaged = {"ema": engine.average.model.state_dict()} if engine.average else {}
    torch.save(
        {"model": engine.model.state_dict(), "optimizer": engine.optimizer.state_dict(), "epoch": epoch,
         "rng": _rng_state(engine.shuffle, engine.device), "config": engine.config.flat(),
         "data": {**data.split, "shape": list(astuple(data.shape)), "images": data.fingerprint},
         "correct": {name: split.last_correct.cpu() for name, split in evaluated.items() if split.last_correct is not None}, **averaged},
        folder / CHECKPOINT_FILE,
    )


def restore(engine: Engine, checkpoint: Checkpoint, evaluated: Mapping[str, DeviceData]) -> int:
    """The checkpoint's weights, optimizer state, random-number states and each `evaluated` split's last right
    images (unknown where the checkpoint did not keep them) into `engine` and the splits; returns its epoch. With ema,
    its averaged weights too, or, from a checkpoint without them (trained without ema), its weights: the average
    starts there, as a fresh run's starts at its initial weights. One ConfigError where the weights do not fit the
    model (an edited file)."""
    try:
        engine.model.load_state_dict(checkpoint["model"])
        engine.optimizer.load_state_dict(checkpoint["optimizer"])
        if engine.average:
            engine.average.model.load_state_dict(checkpoint.get("ema", checkpoint["model"]))
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"the checkpoint's weights do not fit its model ({first_line(error)}); pass a checkpoint written by train or a sweep") from None
    _restore_rng(checkpoint, engine.shuffle, engine.device, engine.config.seed)
    saved = checkpoint.get("correct", {})
    for name, split in evaluated.items():
        split.last_correct = saved[name].to(engine.device) if name in saved else None
    return int(checkpoint["epoch"])


def load_checkpoint(folder: Path) -> dict[str, Any]:
    """Read a checkpoint folder (or its checkpoint file); weights_only=True means a checkpoint file cannot run code."""
    path = Path(folder)
    path = path if path.is_file() else path / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found; pass a checkpoint folder such as checkpoints/epoch_010")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - foreign, truncated or unsafe (code-running) files fail in many ways (KeyError for text)
        checkpoint = None
    if not (isinstance(checkpoint, dict) and set(CHECKPOINT_KEYS) <= set(checkpoint)
            and isinstance(checkpoint["data"], dict) and set(CHECKPOINT_DATA_KEYS) <= set(checkpoint["data"])):
        raise ConfigError(
            f"checkpoint {path} is not a tune_cnn checkpoint (unreadable, without {', '.join(CHECKPOINT_KEYS)} and the data's "
            f"{', '.join(CHECKPOINT_DATA_KEYS)}, or holding objects a safe load refuses); pass a folder written by train or a sweep"
        )
    return checkpoint


def check_resumable(config: TrainConfig, checkpoint: Checkpoint) -> None:
    """A ConfigError where `config` cannot continue `checkpoint`: another model or optimizer."""
    saved, wanted = TrainConfig.from_flat(checkpoint["config"]).flat(), config.flat()
    changed = [f"{name}={saved[name]}" for name in RESUME_MUST_MATCH if saved[name] != wanted[name]]
    if changed:
        raise ConfigError(f"the checkpoint was trained with {', '.join(changed)}; resume with its model, optimizer "
                          f"and seed (train --resume takes them from the checkpoint)")


def check_same_data(data: DataSplits, checkpoint: Checkpoint) -> None:
    """A ConfigError where `data` is not the checkpoint's: other images or classes, or another split of them."""
    saved = dict(checkpoint["data"])
    shape, images = InputShape(*saved.pop("shape")), saved.pop("images", None)  # checkpoints from before the fingerprint lack it
    if shape != data.shape:
        raise ConfigError(f"the checkpoint trained on {shape.describe()}, this data has {data.shape.describe()}; "
                          f"resume on the data it trained on")
    if saved != data.split:
        raise ConfigError(f"the checkpoint trained on the split with seed {saved['seed']} and subset {saved['subset']}, "
                          f"this data has seed {data.split_seed} and subset {data.subset}; load the data as the checkpoint's "
                          f"(train --resume does)")
    if images not in (None, data.fingerprint):
        raise ConfigError(f"the checkpoint trained on other images than those of {data.source} (the same shape and split, but "
                          f"other class names or labels); resume on the data it trained on")


def check_no_other_run(folder: Path) -> None:
    """A fresh run would mix its checkpoints with (and overwrite) those of another run already in `folder`."""
    earlier = sorted(p.name for p in Path(folder).glob("epoch_*"))
    if earlier:
        raise ConfigError(f"checkpoints folder {folder} holds another run's checkpoints ({', '.join(earlier[:3])}"
                          f"{', ...' if len(earlier) > 3 else ''}); pass a new folder, or --resume one of them")


def continues_in(folder: Path, resumed: Path) -> bool:
    """True where `folder` is the checkpoints folder of the run `resumed` (an epoch folder or its file) belongs to."""
    epoch_folder = resumed.parent if resumed.is_file() else resumed
    return epoch_folder.resolve().parent == folder.resolve()


def check_epochs_left(config: TrainConfig, checkpoint: Checkpoint) -> None:
    """A ConfigError where the command line asks to resume a run that has no epochs left. (Not in train(): a
    sweep's trial killed after its last checkpoint is restored from it, and then rightly trains nothing.)"""
    epoch = int(checkpoint["epoch"])
    if config.epochs <= epoch:
        raise ConfigError(f"the checkpoint is at epoch {epoch} and epochs is {config.epochs}, so nothing is left to train; "
                          f"set epochs above {epoch}, e.g. --set epochs={epoch + 10}")


def _rng_state(shuffle: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def trained_on(checkpoint: Checkpoint) -> str:
    """The kind of device ("cuda" or "cpu") a checkpoint trained on: its random-number states are that kind's."""
    return "cuda" if "cuda" in checkpoint["rng"] else "cpu"


def _restore_rng(checkpoint: Checkpoint, shuffle: torch.Generator, device: torch.device, seed: int) -> None:
    """The checkpoint's random-number states. A CUDA generator's state does not fit a CPU one (nor the reverse), so
    on the other kind of device the shuffle is seeded afresh from the seed and the epoch, the same for every rerun."""
    state = checkpoint["rng"]
    torch.set_rng_state(state["torch"])
    if trained_on(checkpoint) != device.type:
        shuffle.manual_seed(seed + int(checkpoint["epoch"]))
        return
    shuffle.set_state(state["shuffle"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
