"""Train one config on one data set, reporting after every epoch; and `python -m tune_cnn.train`.

`train()` takes its reporter as an argument, so the same function runs from plain Python (`print_report`,
`LocalCheckpoints`) and as a Ray Tune function trainable (see tune_cnn.sweep). The engine (tune_cnn.engine) does
the work; checkpoints are tune_cnn.checkpoints'.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tune_cnn.checkpoints import (
    Checkpoint,
    check_epochs_left,
    check_no_other_run,
    check_resumable,
    check_same_data,
    continues_in,
    load_checkpoint,
    restore,
    save_checkpoint,
    trained_on,
)
from tune_cnn.config import SETTINGS, InputShape, TrainConfig
from tune_cnn.data import DATA_HELP, DataSplits, load_data
from tune_cnn.engine import DeviceData, Engine, build_engine, resolve_device
from tune_cnn.errors import CommandParser, ConfigError, DataError, check_folder_can_be_made, exit_on_user_error, first_line
from tune_cnn.memory import FIXES, available_memory, check_fits, trial_memory

Metrics = dict[str, Any]  # numbers, and each evaluated split's calibration bins
Reporter = Callable[[Metrics, "Path | None"], None]
SPLITS = ("train", "val", "test")
EVALUATED = ("val", "test")  # the splits every epoch evaluates


# --- Reporters ---------------------------------------------------------------------------------------------


def print_report(metrics: Metrics, checkpoint: Path | None) -> None:
    """Print the epoch's line; the checkpoint is not kept (LocalCheckpoints keeps them)."""
    print(report_line(metrics), flush=True)


def report_line(metrics: Metrics) -> str:
    return (f"epoch {metrics['epoch']:>3}  train_acc {metrics['train_acc']:.4f}  val_acc {metrics['val_acc']:.4f}  "
            f"val_loss {metrics['val_loss']:.4f}  test_acc {metrics['test_acc']:.4f}  "
            f"{metrics['epoch_seconds']:.1f}s  {metrics['images_per_second']:.0f} img/s")


class LocalCheckpoints:
    """A reporter for plain Python: prints each epoch and keeps checkpoints in folder/epoch_NNN/."""

    def __init__(self, folder: Path, echo: bool = True):
        self.folder = Path(folder)
        check_folder_can_be_made(self.folder, f"checkpoints folder {self.folder}", "pass a folder (it is made if missing)")
        self.echo = echo
        self.history: list[Metrics] = []

    def __call__(self, metrics: Metrics, checkpoint: Path | None) -> None:
        self.history.append(metrics)
        kept = None
        if checkpoint is not None:
            kept = self.folder / f"epoch_{int(metrics['epoch']):03d}"
            kept.mkdir(parents=True, exist_ok=True)  # with the umask's permissions, not the temporary folder's 0700
            for part in checkpoint.iterdir():
                shutil.copy(part, kept / part.name)
        if self.echo:
            print(report_line(metrics) + (f"  [checkpoint {kept}]" if kept else ""), flush=True)


# --- A run --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A config checked once for its device and, when it continues one, against its checkpoint: what train() trains.
    The command line prepares it before the data loads, so that a mistake costs no loading."""

    config: TrainConfig
    device: torch.device
    resume: Checkpoint | None = None

    @classmethod
    def prepare(cls, config: TrainConfig, resume: Checkpoint | None = None) -> Run:
        if resume is not None:
            check_resumable(config, resume)
        return cls(config, resolve_device(config.device), resume)

    def train(self, data: DataSplits, report: Reporter = print_report) -> list[Metrics]:
        """Train on `data`; call `report(metrics, checkpoint_folder_or_None)` after every epoch (see train())."""
        if self.resume is not None:
            check_same_data(data, self.resume)
        check_trial_memory(self.config, data, self.device)
        with allocation_failures_as_one_line(self.device):
            engine = build_engine(self.config, data.shape, data.mean, data.std, self.device, data.train.x)
            splits = {name: engine.put(getattr(data, name)) for name in SPLITS}
            evaluated = {name: splits[name] for name in EVALUATED}
            first_epoch = 1 if self.resume is None else restore(engine, self.resume, evaluated) + 1
            history = []
            for epoch in range(first_epoch, self.config.epochs + 1):
                metrics = run_epoch(engine, splits, epoch)
                history.append(metrics)
                if epoch % self.config.checkpoint_every == 0 or epoch == self.config.epochs:
                    with tempfile.TemporaryDirectory(prefix="tune_cnn_ckpt_") as folder:
                        save_checkpoint(Path(folder), engine, epoch, data, evaluated)
                        report(metrics, Path(folder))
                else:
                    report(metrics, None)
                if not math.isfinite(metrics["train_loss"]):  # every later epoch would be NaN too
                    warn_diverged(metrics)
                    break
        return history


def train(config: TrainConfig, data: DataSplits, report: Reporter = print_report, resume: Checkpoint | None = None) -> list[Metrics]:
    """Train `config` on `data`; call `report(metrics, checkpoint_folder_or_None)` after every epoch.

    Metrics per epoch: epoch, train_loss, train_acc (over the epoch, in training mode, of the raw weights), val_loss,
    val_acc, test_loss, test_acc and their diagnostics (of the averaged weights with ema, from the averaged views with
    tta: Engine.evaluate), epoch_seconds (the whole epoch: training pass and evaluation), images_per_second
    (training images over the training pass's seconds) and lr. A checkpoint is due every
    `checkpoint_every` epochs and at the last; `resume` (from load_checkpoint) continues at the next epoch.
    """
    return Run.prepare(config, resume).train(data, report)


def warn_diverged(metrics: Metrics) -> None:
    """One line on stderr for the epoch whose training loss is no longer a number (a learning rate too high for the
    model), after which the run stops."""
    print(f"warning: training diverged at epoch {metrics['epoch']} (training loss {metrics['train_loss']}); the run stops here; "
          f"a lower lr may fix it", file=sys.stderr, flush=True)


def check_trial_memory(config: TrainConfig, data: DataSplits, device: torch.device) -> None:
    """A ConfigError where the model, its optimizer, its batches and a copy of the images cannot fit the memory
    the device has free now (this process, and the images it loaded, are already counted there)."""
    estimate = replace(trial_memory(config, data.shape, data.images), runtime=0)
    if device.type == "cuda":
        check_fits(estimate, torch.cuda.mem_get_info(device)[0], "this trial", f"GPU {device}")
    else:
        check_fits(estimate, available_memory(), "this trial")


@contextmanager
def allocation_failures_as_one_line(device: torch.device) -> Iterator[None]:
    """An allocation that fails despite the estimate (memory taken by others meanwhile, a process limit) as one
    ConfigError line saying what to change, where torch raises its allocator's traceback."""
    try:
        yield
    except RuntimeError as error:  # torch.OutOfMemoryError on CUDA; a RuntimeError from the CPU's allocator
        if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
            raise
        raise ConfigError(f"this trial ran out of memory on {device.type} ({first_line(error)}); {FIXES}") from None


def run_epoch(engine: Engine, splits: dict[str, DeviceData], epoch: int) -> Metrics:
    """One training pass and the evaluation of the validation and test splits, as the epoch's metrics."""
    engine.start_epoch(epoch)
    start = time.perf_counter()
    train_loss, train_acc = engine.train_epoch(splits["train"])
    train_seconds = time.perf_counter() - start
    metrics: Metrics = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc}
    for split in EVALUATED:
        metrics.update({f"{split}_{name}": value for name, value in engine.evaluate(splits[split]).items()})
    metrics["epoch_seconds"] = time.perf_counter() - start
    metrics["images_per_second"] = len(splits["train"]) / train_seconds
    metrics["lr"] = engine.optimizer.group["lr"]
    return metrics


# --- A single run from the command line --------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(prog="python -m tune_cnn.train", description="Train one config and print every epoch.")
    parser.add_argument("--data", default=None, help=DATA_HELP)
    parser.add_argument("--subset", type=int, default=None, help="train on a stratified subset of N images")
    parser.add_argument("--checkpoints", type=Path, default=None, help="keep checkpoints in this folder")
    parser.add_argument("--resume", type=Path, default=None,
                        help="continue from this checkpoint folder, with its settings (--set may change epochs, lr, ...)")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                        help=f"settings, e.g. --set epochs=10 pooling=avg batch_norm=true; names: {', '.join(SETTINGS)}")
    return parser.parse_args(argv)


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    import yaml

    settings = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--set {pair}: write NAME=VALUE, for example --set epochs=10")
        if name in settings:
            raise ConfigError(f"--set {name}: named twice; give each setting once")
        try:
            settings[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {pair}: {value!r} is not a value; write a number, a word or a list such as [32, 64]") from None
    return settings


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    resume = load_checkpoint(args.resume) if args.resume else None
    # A resumed run keeps its checkpoint's settings and data split: a sweep's trial trains with its own seed on
    # the sweep's split.
    config = TrainConfig.from_flat({**(resume["config"] if resume else {}), **parse_settings(args.set)})
    split = resume["data"] if resume else {"seed": config.seed, "subset": args.subset}
    if resume and args.subset not in (None, split["subset"]):
        raise ConfigError(f"--subset {args.subset}: a resumed run trains on its checkpoint's split (subset {split['subset']}); "
                          f"leave --subset out")
    run = Run.prepare(config, resume)  # another model, or a GPU that is not there, before the data loads
    if resume:
        check_epochs_left(config, resume)
    reporter = LocalCheckpoints(args.checkpoints) if args.checkpoints else print_report
    if args.checkpoints and not (resume and continues_in(args.checkpoints, args.resume)):
        check_no_other_run(args.checkpoints)
    try:
        data = load_data(args.data, subset=split["subset"], seed=split["seed"])
    except DataError as error:
        if not resume:
            raise
        shape = InputShape(*resume["data"]["shape"])
        raise DataError(f"{error} (resuming a checkpoint that trained on {shape.describe()}, subset {split['subset']}: "
                        f"pass the --data it trained on)") from None
    print(data.describe(), flush=True)
    if resume and trained_on(resume) != run.device.type:
        print(f"note: the checkpoint trained on {trained_on(resume)} and this run is on {run.device.type}: "
              f"the shuffle starts afresh, so the epochs will not repeat the original run's numbers exactly", flush=True)
    run.train(data, reporter)


if __name__ == "__main__":
    main()
