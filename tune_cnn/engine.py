"""The training engine: one trial's model, optimizer and data on its device, and the hot loop.

The whole data set stays on the training device as uint8; whole batches are shuffled and augmented there,
normalised on the fly, and the epoch's loss and accuracy are summed on the device, so the hot loop is one gather,
one forward, one backward and one optimizer step per batch: no DataLoader, no per-image Python. On CUDA that step
is captured once as a CUDA graph and replayed (StepGraph). Two optional steps of the airbench recipe: an average of
the weights that evaluation runs (ema: WeightAverage), and test-time augmentation (tta: predict). Why each choice,
with its measurements: benchmarks/README.md.
"""
from __future__ import annotations

import copy
import ctypes
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tune_cnn.config import InputShape, TrainConfig
from tune_cnn.data import Arrays
from tune_cnn.errors import ConfigError
from tune_cnn.models import build_model
from tune_cnn.optim import FusedAdamW, FusedOptimizer, FusedSGD, per_step, scheduled_lr, step_lr

CPU_EVAL_BATCH = 256
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
CALIBRATION_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al. 2017)
NO_AUTOCAST = nullcontext()  # fp32: reusable, as a context manager that does nothing is
TRANSLATE_PAD = 2  # augment translate's largest shift, airbench94's
TTA_SHIFT = 1  # tta flip_translate's shift, airbench94's
WHITEN_IMAGES = 5000  # the training images whose patches whiten sets the first convolution from, airbench94's count
WHITEN_EPS = 5e-4  # added to each eigenvalue before its inverse square root, airbench94's
WHITEN_CHUNK = 500  # images unfolded at a time: 5,000 images' 3x3 patches at once would take half a gigabyte


def resolve_device(name: str) -> torch.device:
    """The device a config's `device` names on this machine; one ConfigError for a GPU that is not there."""
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
        # Which images the model got right at the split's last evaluation (none before the first; None: unknown, as
        # after a resume from a checkpoint that did not keep it).
        self.last_correct: torch.Tensor | None = torch.zeros(len(self.y), dtype=torch.bool, device=device)

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
    batch of 0..255 pixels: one multiply-add where a cast, a subtraction and a division were three kernels."""
    mean_255, std_255 = (torch.tensor(values, device=device).view(1, -1, 1, 1) * 255 for values in (mean, std))
    return 1 / std_255, -mean_255 / std_255


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random translation (crop: by up to `pad` pixels, zero fill; translate: by up to TRANSLATE_PAD, the border
    reflected, as airbench94 does) and/or horizontal flip, for a whole uint8 batch."""
    if "crop" in kind:
        x = shifted(x, generator, pad, "constant")
    if "translate" in kind:
        x = shifted(x, generator, TRANSLATE_PAD, "reflect")
    if "flip" in kind:
        flip = torch.rand(len(x), device=x.device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def shifted(x: torch.Tensor, generator: torch.Generator, pad: int, mode: str) -> torch.Tensor:
    """Each image moved by its own random offset of up to `pad` pixels each way, the space filled by F.pad's `mode`:
    one pad and one gather for the whole batch, where a crop per image would be a kernel per image."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, n, 1), device=x.device, generator=generator))
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def optimizer_settings(config: TrainConfig) -> dict[str, Any]:
    """The optimizer's hyperparameters by torch.optim's names: AdamW (decoupled weight decay, the regulariser
    people mean) with Keras's epsilon, as the seed ran, or SGD with momentum, Nesterov's for optimizer nesterov."""
    if config.optimizer != "adam":
        return {"lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay, "nesterov": config.optimizer == "nesterov"}
    return {"lr": config.lr, "eps": 1e-7, "weight_decay": config.weight_decay}


def make_optimizer(config: TrainConfig, model: nn.Module) -> FusedOptimizer:
    """The engine's optimizer (tune_cnn.optim). With cuda_graph, AdamW's step is capturable in the graph."""
    if config.optimizer != "adam":
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
    graph: StepGraph | None  # with cuda_graph on CUDA: the captured training step
    average: WeightAverage | None  # with ema: the averaged weights, which evaluation runs
    epoch: int = 1  # the epoch train_epoch trains (from 1): start_epoch

    def put(self, arrays: Arrays) -> DeviceData:
        return DeviceData(arrays, self.scale, self.shift, self.device, channels_last=True)

    def start_epoch(self, epoch: int) -> None:
        """Set the learning rate for `epoch` (from 1): its one rate (optim.scheduled_lr) or, with a per-step schedule,
        the epoch whose steps train_epoch places in the run's schedule, so a resumed run takes the schedule up where it
        stopped with no state but the epoch."""
        self.epoch = epoch
        self.optimizer.set_lr(scheduled_lr(self.config.schedule, self.config.lr, epoch, self.config.epochs))

    def train_epoch(self, data: DeviceData) -> tuple[float, float]:
        return train_epoch(self.step, self.optimizer, data, self.config, self.shuffle, self.autocast, self.graph, self.epoch, self.average)

    def evaluate(self, data: DeviceData) -> dict[str, float]:
        """`data`'s metrics (evaluate) by the model evaluation runs: the averaged weights with ema, else the raw ones."""
        model = self.average.model if self.average else self.model
        return evaluate(model, data, eval_batch_size(self.config, self.device), self.autocast, self.config.tta)


def build_engine(config: TrainConfig, shape: InputShape, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | None = None, train_images: np.ndarray | None = None) -> Engine:
    """Seed the run and build the model, optimizer and precision for `config` on `device` (default: the one
    config.device names). With whiten, the first convolution is set from `train_images` (uint8, NCHW), which it needs.

    channels_last everywhere: faster on the CPU (NCHW max-pooling is slow there) and what tensor cores want. cuDNN
    picks its convolution algorithms by heuristics (torch's default), not by timing each (cudnn.benchmark), which
    costs more than it buys for trials this small and lets a rerun repeat its numbers.
    """
    device = device or resolve_device(config.device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(config.seed)
    shuffle = torch.Generator(device=device).manual_seed(config.seed)
    model = build_model(config.model, shape).to(device, memory_format=torch.channels_last)
    scale, shift = pixel_normalisation(mean, std, device)
    if config.whiten:
        if train_images is None:
            raise ValueError("whiten sets the first convolution from the training images; pass train_images")
        whiten_first_convolution(model, torch.tensor(train_images[:WHITEN_IMAGES], device=device), scale, shift)  # a copy: Ray shares it read-only
    optimizer = make_optimizer(config, model)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    # No cast cache: each weight is cast once per step anyway, and cached casts must not outlive a graph capture.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if bf16 else nullcontext()
    step = compiled(model, config, device)
    average = WeightAverage(model, config.ema) if config.ema else None
    graph = None
    if config.cuda_graph and device.type == "cuda":
        bf16_weight_copies = bf16 and not config.compile
        graph = StepGraph(Bf16Weights(step) if bf16_weight_copies else step, optimizer, autocast, scale, shift,
                          (config.batch_size, shape.channels, shape.height, shape.width), torch.bfloat16 if bf16_weight_copies else None,
                          config.label_smoothing, average)
    return Engine(config, device, model, step, optimizer, shuffle, autocast, scale, shift, graph, average)


def whiten_first_convolution(model: nn.Module, images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Set the model's first convolution to whiten its input patches, and freeze it (whiten).

    Its filters become the eigenvectors of the covariance of the normalised images' patches (of the convolution's
    size), each divided by the square root of its eigenvalue, in pairs of opposite sign (v, -v: a ReLU-like activation
    after it keeps both halves of each direction), the largest eigenvalues first, as airbench94 sets its first layer;
    where the convolution has more filters than twice a patch's values, the rest keep their initialisation. Its weights
    then stay fixed (the optimizer skips a parameter without a gradient); a bias trains. Decorrelated inputs of equal
    variance make the first steps at a high learning rate as well conditioned as the later ones.
    """
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    filters, channels, height, width = conv.weight.shape
    covariance = torch.zeros(channels * height * width, channels * height * width, dtype=torch.float64, device=images.device)
    patches = 0
    for start in range(0, len(images), WHITEN_CHUNK):
        x = normalise_pixels(images[start : start + WHITEN_CHUNK], scale, shift, torch.contiguous_format)
        columns = F.unfold(x, (height, width)).transpose(1, 2).reshape(-1, covariance.shape[0]).double()
        covariance += columns.T @ columns
        patches += len(columns)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance / patches)  # ascending
    scaled = (eigenvectors / (eigenvalues + WHITEN_EPS).sqrt()).T.flip(0)  # rows, the largest eigenvalue first
    pairs = torch.stack([scaled, -scaled], 1).reshape(-1, channels, height, width)[:filters]
    with torch.no_grad():
        conv.weight[: len(pairs)] = pairs.to(conv.weight.dtype)
    conv.weight.requires_grad_(False)


def keep_freed_memory() -> None:
    """Let glibc keep freed activation buffers instead of handing them back to the kernel after every step.

    PyTorch has no caching allocator on the CPU, and with glibc's defaults each step's multi-megabyte buffers are
    unmapped and faulted in again. Process-wide and harmless elsewhere; a no-op where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum: blocks up to 32 MB come from the heap
    mallopt(M_TRIM_THRESHOLD, 512 << 20)  # and the heap keeps up to 512 MB free before trimming


def compiled(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """torch.compile when asked: fused kernels, captured inside the whole-step graph on CUDA, or with
    torch.compile's own CUDA graphs (mode reduce-overhead) when cuda_graph is off. Off by default: it pays only
    for long trials on a GPU."""
    if not config.compile:
        return model
    own_graphs = device.type == "cuda" and not config.cuda_graph
    return torch.compile(model, mode="reduce-overhead" if own_graphs else "default")


def eval_batch_size(config: TrainConfig, device: torch.device) -> int:
    """The evaluation batch: at most CPU_EVAL_BATCH on the CPU, where larger batches spill the caches."""
    return config.eval_batch_size if device.type == "cuda" else min(config.eval_batch_size, CPU_EVAL_BATCH)


def train_epoch(model: nn.Module, optimizer: FusedOptimizer, data: DeviceData, config: TrainConfig,
                generator: torch.Generator, autocast, graph: StepGraph | None = None, epoch: int = 1,
                average: WeightAverage | None = None) -> tuple[float, float]:
    """One shuffled pass; returns the mean training loss (label-smoothed where config smooths it) and accuracy. With
    `graph`, full batches replay the captured step (`average`'s update in it) and only a short last batch runs eagerly,
    updating `average` after its step too. With a per-step
    schedule each step sets its own rate (optim.step_lr), step (epoch - 1) * batches + i of epochs * batches, so the
    optimizer's rate after the pass (the epoch's reported lr) is the last step's."""
    model.train()
    order = torch.randperm(len(data), device=data.x.device, generator=generator)
    totals = graph.totals if graph else EpochTotals(data.x.device)
    totals.zero_()
    # Batch norm cannot train on one image (BatchNorm1d refuses it): a last batch of one is left out, a different
    # image each epoch, as a DataLoader's drop_last leaves out every short last batch.
    seen = len(data) - 1 if config.model.batch_norm and len(data) % config.batch_size == 1 else len(data)
    starts = range(0, seen, config.batch_size)
    stepwise = per_step(config.schedule, config.warmup)
    for step, start in enumerate(starts, (epoch - 1) * len(starts)):
        if stepwise:
            optimizer.set_lr(step_lr(config.schedule, config.lr, config.warmup, step, config.epochs * len(starts)))
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
            train_step(model, optimizer, data.normalise, x, y, autocast, totals, config.label_smoothing, average)
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
               x: torch.Tensor, y: torch.Tensor, autocast, totals: EpochTotals, label_smoothing: float = 0.0,
               average: WeightAverage | None = None) -> None:
    """One optimizer step on a uint8 batch, adding its loss and correct count to `totals`, then `average`'s update.
    `label_smoothing` is F.cross_entropy's (0: the plain loss), a regulariser for training only, which keeps the logits
    from growing."""
    with autocast:
        logits = model(normalise(x))
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if average is not None:
        average.update()
    totals.loss.add_(loss.detach(), alpha=len(y))
    totals.correct.add_((logits.argmax(1) == y).sum())


class WeightAverage:
    """An exponential moving average of a model's weights, in a copy of the model that evaluation runs while training
    goes on with the raw weights: after every optimizer step, average = ema * average + (1 - ema) * weights, starting
    from the initial weights (with no bias correction: their share after k steps is ema^k, so 1 / (1 - ema) should be
    well below the run's steps). Averaged weights sit nearer the middle of the valley the last steps wander in, which
    tends to evaluate better than any one step's.

    What is averaged: the parameters and every floating-point buffer, batch norm's running mean and variance included
    (as timm's ModelEmaV2 and torch's AveragedModel with use_buffers do), so the statistics follow the averaged weights
    rather than the last step's alone; the copy's integer num_batches_tracked stays at 0 (batch norm reads it only with
    momentum None). The update is one multi-tensor lerp on the device, with no host sync; within a CUDA
    graph it is captured with the step that precedes it (train_step calls it), so a replay updates the average too.
    """

    def __init__(self, model: nn.Module, ema: float):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.weight = 1.0 - ema
        self.averaged, self.raw = ([t.detach() for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()] for m in (self.model, model))

    def update(self) -> None:
        torch._foreach_lerp_(self.averaged, self.raw, self.weight)


class StepGraph:
    """The whole training step of a full batch (normalise, forward, loss, backward, optimizer step, totals)
    captured once as a CUDA graph and replayed for every later full batch.

    At batch 32 an eager step is dozens of tiny kernels, each paying Python dispatch and a launch; a replay
    is one launch. The first WARMUP_STEPS full batches run eagerly on a side stream, as capture requires (cuDNN's
    autotuning, cuBLAS handles and the optimizer's state must exist first); they are ordinary training
    steps, so the run takes the same steps as the eager engine. Built from the parts of the step it captures,
    it holds no reference back to the engine that holds it.
    """

    WARMUP_STEPS = 3

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], optimizer: FusedOptimizer, autocast: Any,
                 scale: torch.Tensor, shift: torch.Tensor, batch_shape: tuple[int, int, int, int], input_dtype: torch.dtype | None = None,
                 label_smoothing: float = 0.0, average: WeightAverage | None = None):
        """`forward`: the model (or Bf16Weights of it); `batch_shape`: (batch, channels, height, width); `input_dtype`:
        bf16 to normalise the input straight to bf16, as Bf16Weights wants it; `label_smoothing`, `average`: train_step's
        (the average's update is captured in the graph, on tensors that stay where they are)."""
        device = scale.device
        self.x = torch.zeros(batch_shape, dtype=torch.uint8, device=device).contiguous(memory_format=torch.channels_last)
        self.y = torch.zeros(batch_shape[0], dtype=torch.int64, device=device)
        self.totals = EpochTotals(device)
        self.forward, self.optimizer, self.autocast, self.label_smoothing, self.average = forward, optimizer, autocast, label_smoothing, average
        self.normalise = partial(normalise_pixels, scale=scale, shift=shift, dtype=input_dtype)
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
            self._train_step()
        torch.cuda.current_stream().wait_stream(side)
        self.eager_steps += 1

    def _capture(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._train_step()
        # The captured gradients live in the graph's memory; an eager short batch replaces .grad, so hold them.
        self.captured_grads = [p.grad for p in self.optimizer.params]

    def _train_step(self) -> None:
        train_step(self.forward, self.optimizer, self.normalise, self.x, self.y, self.autocast, self.totals, self.label_smoothing, self.average)


class Bf16Weights:
    """The model's forward on bf16 copies of its convolution and dense parameters, made by one multi-tensor copy
    (CastAllToBf16), whose gradients go back to float32 by one more, where autocast casts each parameter and each
    gradient apart.

    torch's CUDA kernel for a multi-tensor copy takes a whole list in one launch when each list has one dtype and
    the lists' strides match, as here. The arithmetic is autocast's bit for bit (tested on the CPU); batch norm
    keeps its float32 parameters, as under autocast. For the CUDA graph only, which pays functional_call's Python
    once, at capture.
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


@torch.inference_mode()  # faster than no_grad on the CPU
def evaluate(model: nn.Module, data: DeviceData, batch_size: int, autocast: Any = NO_AUTOCAST, tta: str = "none") -> dict[str, Any]:
    """A split's metrics by name (each epoch reports them as `<split>_<name>`), in evaluation mode, in large batches,
    summed on the device in this one pass and read back once, all of them from the prediction `tta` makes (predict):

    - `loss`, `acc`: mean cross-entropy and accuracy;
    - `loss_right`, `loss_wrong`, `conf_right`, `conf_wrong`: mean cross-entropy and mean top-class probability over
      the images the model gets right and wrong (NaN where there are none), so loss = acc * loss_right +
      (1 - acc) * loss_wrong;
    - `ece`: the expected calibration error over CALIBRATION_BINS equal-width bins of the top-class probability,
      bin m holding ((m - 1) / M, m / M], as Guo et al. (2017) define it;
    - `forgotten`, `learned`: images right at the split's last evaluation and wrong now, and the reverse (Toneva et
      al. 2019); before the first evaluation every image counts as wrong; NaN where the last one is unknown;
    - `calibration`: per bin, [images, mean confidence, accuracy], for a reliability diagram.
    """
    model.eval()
    device = data.x.device
    sums = torch.zeros(4, device=device)  # cross-entropy over the right and the wrong images, then their confidence
    bins = torch.zeros(3, CALIBRATION_BINS, device=device)  # per bin: images, summed confidence, right images
    right = torch.empty(len(data), dtype=torch.bool, device=device)
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
        with autocast:
            logits = predict(model, data.normalise(x), tta)
        _add_predictions(logits.float().log_softmax(1), y, sums, bins, right[start : start + batch_size])
    previous, data.last_correct = data.last_correct, right
    unknown = torch.full((2,), math.nan, device=device)
    transitions = unknown if previous is None else torch.stack([(previous & ~right).sum(), (~previous & right).sum()]).float()
    numbers = torch.cat([sums, transitions, bins.flatten()]).tolist()  # the one read back from the device
    return _split_metrics(numbers[:4], numbers[4:6], [numbers[6 + i * CALIBRATION_BINS : 6 + (i + 1) * CALIBRATION_BINS] for i in range(3)],
                          len(data))


def predict(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """The model's logits for a normalised batch: as they are (tta none), or averaged over test-time augmentations, as
    airbench94's TTA levels 1 and 2 average them: flip, the image and its mirror image, half each; flip_translate, half
    that and half the same for the image shifted by TTA_SHIFT pixel down and right and for it shifted up and left (the
    border reflected), a quarter each. Logits, not probabilities, are averaged, as airbench does, so that its accuracy
    is what this reports; the diagnostics come from the softmax of the average. The views' errors partly cancel, so
    their average is right more often than the image alone."""
    if tta == "none":
        return model(x)
    mirrored = _mirrored(model, x)
    if tta == "flip":
        return mirrored
    height, width = x.shape[2:]
    padded = F.pad(x, (TTA_SHIFT,) * 4, mode="reflect")
    moved = padded[:, :, : height, : width], padded[:, :, 2 * TTA_SHIFT :, 2 * TTA_SHIFT :]
    return 0.5 * mirrored + 0.25 * (_mirrored(model, moved[0]) + _mirrored(model, moved[1]))


def _mirrored(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The mean of the model's float32 logits for the batch and for its mirror image (flipped left to right)."""
    return 0.5 * (model(x).float() + model(x.flip(3)).float())


def _add_predictions(log_probs: torch.Tensor, y: torch.Tensor, sums: torch.Tensor, bins: torch.Tensor, right: torch.Tensor) -> None:
    """One batch's cross-entropy and confidence into `sums` (right images, then wrong ones) and `bins`; which images
    it got right into `right`."""
    top, predicted = log_probs.max(1)
    confidence = top.exp()
    loss = -log_probs.gather(1, y[:, None]).squeeze(1)
    torch.eq(predicted, y, out=right)
    hit = right.float()
    sums += torch.stack([(loss * hit).sum(), (loss * (1 - hit)).sum(), (confidence * hit).sum(), (confidence * (1 - hit)).sum()])
    index = (confidence * CALIBRATION_BINS).ceil().long().clamp_(1, CALIBRATION_BINS) - 1
    bins.index_add_(1, index, torch.stack([torch.ones_like(confidence), confidence, hit]))


def _split_metrics(sums: list[float], transitions: list[float], bins: list[list[float]], images: int) -> dict[str, Any]:
    """evaluate()'s metrics from its sums, read back from the device."""
    loss_right, loss_wrong, conf_right, conf_wrong = sums
    count, confidence, hits = bins
    n_right = sum(hits)
    n_wrong = images - n_right
    return {
        "loss": (loss_right + loss_wrong) / images, "acc": n_right / images,
        "loss_right": _mean(loss_right, n_right), "loss_wrong": _mean(loss_wrong, n_wrong),
        "conf_right": _mean(conf_right, n_right), "conf_wrong": _mean(conf_wrong, n_wrong),
        "ece": sum(abs(h - c) for h, c in zip(hits, confidence)) / images,
        "forgotten": transitions[0], "learned": transitions[1],
        "calibration": [[n, _mean(c, n), _mean(h, n)] for n, c, h in zip(count, confidence, hits)],
    }


def _mean(total: float, count: float) -> float:
    return total / count if count else math.nan
