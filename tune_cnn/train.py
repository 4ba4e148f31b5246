"""Train one config on one data set, reporting after every epoch.

The engine keeps the whole data set on the training device as uint8, shuffles and augments whole batches
there, normalises on the fly and sums the epoch's loss and accuracy on the device, so the hot loop is one
gather, one forward, one backward and one optimizer step per batch: no DataLoader, no per-image Python.
On CUDA that step is captured once as a CUDA graph and replayed (StepGraph).

`train()` takes its reporter as an argument, so the same function runs from plain Python (`print_report`,
`LocalCheckpoints`) and as a Ray Tune function trainable (see tune_cnn.sweep).
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import astuple, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tune_cnn.config import MODEL_SETTINGS, SETTINGS, InputShape, TrainConfig
from tune_cnn.data import DATA_HELP, Arrays, DataSplits, load_data
from tune_cnn.errors import CommandParser, ConfigError, DataError, check_folder_can_be_made, exit_on_user_error, first_line
from tune_cnn.models import build_model
from tune_cnn.optim import FusedAdamW, FusedOptimizer, FusedSGD

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "rng", "config", "data")
CHECKPOINT_DATA_KEYS = ("seed", "subset", "shape")  # checkpoint["data"]: what check_same_data compares (and "images")
# What a resumed run must share with its checkpoint: the weights' shapes and the optimizer's state depend on them,
# and the seed's random-number states come from the checkpoint (another seed would change nothing).
RESUME_MUST_MATCH = (*MODEL_SETTINGS, "optimizer", "seed")
Metrics = dict[str, float]
Reporter = Callable[[Metrics, "Path | None"], None]
CPU_EVAL_BATCH = 256
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


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


# --- Checkpoints -------------------------------------------------------------------------------------------


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
    except Exception:  # foreign, truncated or unsafe (code-running) files fail in many ways (KeyError for text)
        checkpoint = None
    if not (isinstance(checkpoint, dict) and set(CHECKPOINT_KEYS) <= set(checkpoint)
            and isinstance(checkpoint["data"], dict) and set(CHECKPOINT_DATA_KEYS) <= set(checkpoint["data"])):
        raise ConfigError(
            f"checkpoint {path} is not a tune_cnn checkpoint (unreadable, without {', '.join(CHECKPOINT_KEYS)} and the data's "
            f"{', '.join(CHECKPOINT_DATA_KEYS)}, or holding objects a safe load refuses); pass a folder written by train or a sweep"
        )
    return checkpoint


def check_resumable(config: TrainConfig, checkpoint: Mapping[str, Any]) -> None:
    """A ConfigError where `config` cannot continue `checkpoint`: another model or optimizer."""
    saved, wanted = TrainConfig.from_flat(checkpoint["config"]).flat(), config.flat()
    changed = [f"{name}={saved[name]}" for name in RESUME_MUST_MATCH if saved[name] != wanted[name]]
    if changed:
        raise ConfigError(f"the checkpoint was trained with {', '.join(changed)}; resume with its model, optimizer "
                          f"and seed (train --resume takes them from the checkpoint)")


def check_same_data(data: DataSplits, checkpoint: Mapping[str, Any]) -> None:
    """A ConfigError where `data` is not the checkpoint's: other images or classes, or another split of them."""
    saved = dict(checkpoint["data"])
    shape, images = InputShape(*saved.pop("shape")), saved.pop("images", None)  # checkpoints before 2026-11-27 lack "images"
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


def load_weights(model: nn.Module, optimizer: FusedOptimizer, checkpoint: Mapping[str, Any]) -> None:
    """The checkpoint's weights and optimizer state; one ConfigError where they do not fit (an edited file)."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"the checkpoint's weights do not fit its model ({first_line(error)}); pass a checkpoint written by train or a sweep") from None


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


def check_epochs_left(config: TrainConfig, checkpoint: Mapping[str, Any]) -> None:
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


def trained_on(checkpoint: Mapping[str, Any]) -> str:
    """The kind of device ("cuda" or "cpu") a checkpoint trained on: its random-number states are that kind's."""
    return "cuda" if "cuda" in checkpoint["rng"] else "cpu"


def _restore_rng(checkpoint: Mapping[str, Any], shuffle: torch.Generator, device: torch.device, seed: int) -> None:
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


# --- The engine --------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but this machine has no CUDA GPU; use device 'auto' or 'cpu'")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' was asked for but this machine has {torch.cuda.device_count()} GPU(s); use cuda:0 or auto")
    return device


class DeviceData:
    """One split resident on the training device, uint8, with its normalisation folded in.

    Stored channels_last when the model runs channels_last, so a gathered batch needs no layout change.
    """

    def __init__(self, arrays: Arrays, scale: torch.Tensor, shift: torch.Tensor, device: torch.device, channels_last: bool):
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.x = torch.from_numpy(arrays.x.copy()).to(device).contiguous(memory_format=self.memory_format)
        self.y = torch.from_numpy(arrays.y.copy()).to(device)
        self.scale, self.shift = scale, shift

    def __len__(self) -> int:
        return len(self.y)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return normalise_pixels(x, self.scale, self.shift, self.memory_format)


def normalise_pixels(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                     memory_format: torch.memory_format = torch.channels_last, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 pixels to the float input the model expects, (x - mean) / std, as x * scale + shift in one
    multiply-add that reads the uint8 batch itself (see pixel_normalisation). With `dtype` (bf16) the float32
    result is rounded once as it is written, as autocast's cast of it would round it, without that cast."""
    x = x.to(memory_format=memory_format)
    out = None if dtype is None else torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=memory_format)
    return torch.addcmul(shift, x, scale, out=out)


def pixel_normalisation(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split's statistics (0..1 scale) as (scale, shift) for normalise_pixels, broadcastable over a
    batch of 0..255 pixels. One kernel on CUDA where a cast, a subtraction and a division were three; on the
    CPU 55 against 138 us per 32-image batch (measured); the same values to within 2e-6 (tested)."""
    mean_255, std_255 = (torch.tensor(values, device=device).view(1, -1, 1, 1) * 255 for values in (mean, std))
    return 1 / std_255, -mean_255 / std_255


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random translation by up to `pad` pixels (zero fill) and/or horizontal flip, for a whole uint8 batch."""
    n, c, h, w = x.shape
    if "crop" in kind:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy, dx = (torch.randint(0, 2 * pad + 1, (2, n, 1), device=x.device, generator=generator))
        rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    if "flip" in kind:
        flip = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def optimizer_settings(config: TrainConfig) -> dict[str, float]:
    """The optimizer's hyperparameters by torch.optim's names: AdamW (decoupled weight decay, the regulariser
    people mean) with Keras's epsilon, as the seed ran, or SGD with momentum."""
    if config.optimizer == "sgd":
        return {"lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay}
    return {"lr": config.lr, "eps": 1e-7, "weight_decay": config.weight_decay}


def make_optimizer(config: TrainConfig, model: nn.Module) -> FusedOptimizer:
    """The engine's optimizer (tune_cnn.optim). With cuda_graph, AdamW's step is capturable in the graph."""
    if config.optimizer == "sgd":
        return FusedSGD(model.parameters(), **optimizer_settings(config))
    capturable = config.cuda_graph and next(model.parameters()).is_cuda
    return FusedAdamW(model.parameters(), **optimizer_settings(config), capturable=capturable)


@dataclass
class Engine:
    """One trial's model on its device and what the hot loop needs besides the data."""

    config: TrainConfig
    device: torch.device
    model: nn.Module  # the eager module: checkpoints and evaluation
    step: nn.Module  # what training calls: the model, or its compiled form
    optimizer: FusedOptimizer
    shuffle: torch.Generator
    autocast: Any
    scale: torch.Tensor  # the pixel normalisation: pixel_normalisation
    shift: torch.Tensor
    graph: StepGraph | None = None  # with cuda_graph: the captured training step

    def put(self, arrays: Arrays) -> DeviceData:
        return DeviceData(arrays, self.scale, self.shift, self.device, channels_last=True)

    def train_epoch(self, data: DeviceData) -> tuple[float, float]:
        return train_epoch(self.step, self.optimizer, data, self.config, self.shuffle, self.autocast, self.graph)

    def evaluate(self, data: DeviceData) -> tuple[float, float]:
        return evaluate(self.model, data, eval_batch_size(self.config, self.device), self.autocast)


def build_engine(config: TrainConfig, shape: InputShape, mean: Sequence[float], std: Sequence[float]) -> Engine:
    """Seed the run and build the model, optimizer and precision for `config` on its device.

    channels_last everywhere: on this project's 2-core CPU it trained the seed model 31% faster and
    evaluated it 2x faster than NCHW (NCHW max-pooling is slow there); on CUDA it is what tensor cores want.

    cuDNN picks its convolution algorithms by heuristics (torch's default), not by timing each
    (cudnn.benchmark): on an H100 the timing added 2.5 s to one seed trial's first epoch and about 2 s to each
    of six sharing the GPU, and bought no later epoch more than 0.01 s (benchmarks/README.md). The heuristics
    also choose the same algorithms every run, so a rerun repeats its numbers: four H100 seed sweeps printed
    identical results, where four with timed algorithms all differed.
    """
    device = resolve_device(config.device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(config.seed)
    shuffle = torch.Generator(device=device).manual_seed(config.seed)
    model = build_model(config.model, shape).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    # No cast cache: each weight is cast once per step anyway, and cached casts must not outlive a graph capture.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if bf16 else nullcontext()
    engine = Engine(config, device, model, compiled(model, config, device), optimizer, shuffle, autocast,
                    *pixel_normalisation(mean, std, device))
    if config.cuda_graph and device.type == "cuda":
        engine.graph = StepGraph(engine, shape, bf16_weight_copies=bf16 and not config.compile)
    return engine


def keep_freed_memory() -> None:
    """Let glibc keep freed activation buffers instead of handing them back to the kernel after every step.

    PyTorch has no caching allocator on the CPU; with glibc's defaults each step's multi-megabyte buffers
    were unmapped and faulted in again (1.3 million page faults and a third of the time in the kernel per
    20,000-image epoch). With these thresholds the seed model trained 3,900 -> 5,000 images/s (measured).
    Process-wide and harmless elsewhere; a no-op where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum: blocks up to 32 MB come from the heap
    mallopt(M_TRIM_THRESHOLD, 512 << 20)  # and the heap keeps up to 512 MB free before trimming


def compiled(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """torch.compile when asked: fused kernels, captured inside the whole-step graph on CUDA, or with
    torch.compile's own CUDA graphs (mode reduce-overhead) when cuda_graph is off. On the CPU it does not pay
    (measured: 22 s to compile, then half the eager speed), so `compile` stays off by default."""
    if not config.compile:
        return model
    own_graphs = device.type == "cuda" and not config.cuda_graph
    return torch.compile(model, mode="reduce-overhead" if own_graphs else "default")


def eval_batch_size(config: TrainConfig, device: torch.device) -> int:
    # On the CPU a batch of 1000 spills the caches and evaluates at half the speed of 256 (measured).
    return config.eval_batch_size if device.type == "cuda" else min(config.eval_batch_size, CPU_EVAL_BATCH)


def train(
    config: TrainConfig,
    data: DataSplits,
    report: Reporter = print_report,
    resume: Mapping[str, Any] | None = None,
) -> list[Metrics]:
    """Train `config` on `data`; call `report(metrics, checkpoint_folder_or_None)` after every epoch.

    Metrics per epoch: epoch, train_loss, train_acc (over the epoch, in training mode), val_loss, val_acc,
    test_loss, test_acc, epoch_seconds (the whole epoch: training pass and evaluation), images_per_second
    (training images over the training pass's seconds) and lr. A checkpoint is due every
    `checkpoint_every` epochs and at the last; `resume` (from load_checkpoint) continues at the next epoch.
    """
    if resume is not None:
        check_resumable(config, resume)
        check_same_data(data, resume)
    engine = build_engine(config, data.shape, data.mean, data.std)
    model, optimizer, shuffle, device = engine.model, engine.optimizer, engine.shuffle, engine.device
    first_epoch = 1
    if resume is not None:
        load_weights(model, optimizer, resume)
        _restore_rng(resume, shuffle, device, config.seed)
        first_epoch = int(resume["epoch"]) + 1
    splits = {name: engine.put(getattr(data, name)) for name in ("train", "val", "test")}
    history = []
    for epoch in range(first_epoch, config.epochs + 1):
        start = time.perf_counter()
        train_loss, train_acc = engine.train_epoch(splits["train"])
        train_seconds = time.perf_counter() - start
        metrics: Metrics = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc}
        for name in ("val", "test"):
            metrics[f"{name}_loss"], metrics[f"{name}_acc"] = engine.evaluate(splits[name])
        metrics["epoch_seconds"] = time.perf_counter() - start
        metrics["images_per_second"] = len(splits["train"]) / train_seconds
        metrics["lr"] = optimizer.group["lr"]
        history.append(metrics)
        if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
            with tempfile.TemporaryDirectory(prefix="tune_cnn_ckpt_") as folder:
                torch.save(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                     "rng": _rng_state(shuffle, device), "config": config.flat(),
                     "data": {**data.split, "shape": list(astuple(data.shape)), "images": data.fingerprint}},
                    Path(folder) / CHECKPOINT_FILE,
                )
                report(metrics, Path(folder))
        else:
            report(metrics, None)
    return history


def train_epoch(model: nn.Module, optimizer: FusedOptimizer, data: DeviceData, config: TrainConfig,
                generator: torch.Generator, autocast, graph: StepGraph | None = None) -> tuple[float, float]:
    """One shuffled pass; returns the mean training loss and accuracy. With `graph`, full batches replay the
    captured step and only a short last batch runs eagerly."""
    model.train()
    order = torch.randperm(len(data), device=data.x.device, generator=generator)
    totals = graph.totals if graph else EpochTotals(data.x.device)
    totals.zero_()
    # Batch norm cannot train on one image (BatchNorm1d refuses it): a last batch of one is left out, a different
    # image each epoch, as a DataLoader's drop_last leaves out every short last batch.
    seen = len(data) - 1 if config.model.batch_norm and len(data) % config.batch_size == 1 else len(data)
    for start in range(0, seen, config.batch_size):
        index = order[start : start + config.batch_size]
        full = graph is not None and len(index) == config.batch_size
        if full and config.augment == "none":
            graph.step_at(data, index)
            continue
        x, y = data.x[index], data.y[index]
        if config.augment != "none":
            x = augment_batch(x, config.augment, generator)
        if full:
            graph.step(x, y)
        else:
            train_step(model, optimizer, data.normalise, x, y, autocast, totals)
    return totals.loss.item() / seen, totals.correct.item() / seen


class EpochTotals:
    """The epoch's summed training loss and correct count, kept on the device: no host sync per step."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)

    def zero_(self) -> None:
        self.loss.zero_()
        self.correct.zero_()


def train_step(model: nn.Module, optimizer: FusedOptimizer, normalise: Callable[[torch.Tensor], torch.Tensor],
               x: torch.Tensor, y: torch.Tensor, autocast, totals: EpochTotals) -> None:
    """One optimizer step on a uint8 batch, adding its loss and correct count to `totals`."""
    with autocast:
        logits = model(normalise(x))
        loss = F.cross_entropy(logits, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    totals.loss.add_(loss.detach(), alpha=len(y))
    totals.correct.add_((logits.argmax(1) == y).sum())


class StepGraph:
    """The whole training step of a full batch (normalise, forward, loss, backward, optimizer step, totals)
    captured once as a CUDA graph and replayed for every later full batch.

    At batch 32 an eager step is dozens of tiny kernels, each paying Python dispatch and a launch; a replay
    is one launch. Measured on an H200 (seed model): 100,279 images/s against the eager engine's 15,055.
    The first WARMUP_STEPS full batches run eagerly on a side stream, as capture requires (cuDNN's
    autotuning, cuBLAS handles and the optimizer's state must exist first); they are ordinary training
    steps, so the run takes the same steps as the eager engine.

    Two cuts to the step's kernels, measured on an H100 (seed model, batch 32, median of 5 passes): a bf16 step
    runs on Bf16Weights with its input normalised straight to bf16 (107,197 against 101,304 images/s), and full
    batches are gathered straight into the graph's inputs (step_at: 103,076); both, 108,926.
    """

    WARMUP_STEPS = 3

    def __init__(self, engine: Engine, shape: InputShape, bf16_weight_copies: bool = False):
        batch, device = engine.config.batch_size, engine.device
        self.x = torch.zeros((batch, shape.channels, shape.height, shape.width), dtype=torch.uint8, device=device)
        self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.zeros(batch, dtype=torch.int64, device=device)
        self.totals = EpochTotals(device)
        input_dtype = torch.bfloat16 if bf16_weight_copies else None
        normalise = partial(normalise_pixels, scale=engine.scale, shift=engine.shift, dtype=input_dtype)
        self.forward = Bf16Weights(engine.step) if bf16_weight_copies else engine.step
        self.run = lambda: train_step(self.forward, engine.optimizer, normalise, self.x, self.y, engine.autocast, self.totals)
        self.parameters = list(engine.model.parameters())
        self.eager_steps, self.replays = 0, 0
        self.graph: torch.cuda.CUDAGraph | None = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x.copy_(x)
        self.y.copy_(y)
        self._run_step()

    def step_at(self, data: DeviceData, index: torch.Tensor) -> None:
        """The full batch at `index`, gathered straight into the graph's inputs: a kernel for the images and one for
        the labels, where gathering them and copying them in were four."""
        torch.index_select(data.x, 0, index, out=self.x)
        torch.index_select(data.y, 0, index, out=self.y)
        self._run_step()

    def _run_step(self) -> None:
        if self.graph is None and self.eager_steps < self.WARMUP_STEPS:
            self._eager_on_side_stream()
            return
        if self.graph is None:
            self._capture()
        self.graph.replay()
        self.replays += 1

    def _eager_on_side_stream(self) -> None:
        side = torch.cuda.Stream(self.x.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.run()
        torch.cuda.current_stream().wait_stream(side)
        self.eager_steps += 1

    def _capture(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.run()
        # The captured gradients live in the graph's memory; an eager short batch replaces .grad, so hold them.
        self.captured_grads = [p.grad for p in self.parameters]


class Bf16Weights:
    """The model's forward on bf16 copies of its convolution and dense parameters, made by one multi-tensor copy
    (CastAllToBf16), whose gradients go back to float32 by one more.

    Autocast casts each of those parameters to bf16 in the forward and each gradient back in the backward: 23 of
    a bf16 step's 99 operations for the seed model (counted on the CPU, torch 2.14). torch's CUDA kernel for a multi-tensor
    copy takes a whole list in one launch when each list has one dtype and the lists' strides match, as here.
    The arithmetic is autocast's bit for bit (tested on the CPU); batch norm keeps its float32 parameters, as
    under autocast. For the CUDA graph only: functional_call adds 0.4 ms of Python to a 1.6 ms CPU forward,
    which a graph pays once, at capture.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.cast = {f"{prefix}.{name}" if prefix else name: p for prefix, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))
                     for name, p in module.named_parameters(recurse=False)}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        copies = CastAllToBf16.apply(*self.cast.values())
        return torch.func.functional_call(self.model, dict(zip(self.cast, copies)), (x,))


class CastAllToBf16(torch.autograd.Function):
    """Float32 tensors to bf16 in one multi-tensor copy; their gradients back to float32 in one more."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _copies(tensors, torch.bfloat16)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _copies(grads, torch.float32)


def _copies(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    copies = [torch.empty_like(t, dtype=dtype) for t in tensors]  # empty_like keeps each one's strides (channels_last)
    torch._foreach_copy_(copies, list(tensors))
    return tuple(copies)


@torch.inference_mode()  # a few percent faster than no_grad on the CPU (measured)
def evaluate(model: nn.Module, data: DeviceData, batch_size: int, autocast=nullcontext()) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a split, in evaluation mode, in large batches."""
    model.eval()
    loss_sum = torch.zeros((), device=data.x.device)
    correct = torch.zeros((), device=data.x.device, dtype=torch.int64)
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
        with autocast:
            logits = model(data.normalise(x))
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(data), correct.item() / len(data)


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
    if resume:
        check_resumable(config, resume)
        check_epochs_left(config, resume)
    device = resolve_device(config.device)  # a GPU that is not there, before the data loads
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
    if resume and trained_on(resume) != device.type:
        print(f"note: the checkpoint trained on {trained_on(resume)} and this run is on {device.type}: "
              f"the shuffle starts afresh, so the epochs will not repeat the original run's numbers exactly", flush=True)
    train(config, data, reporter, resume)


if __name__ == "__main__":
    main()
