"""How much memory a trial and a sweep will need, estimated from the config and the images before anything trains,
and the one-line refusal where that cannot fit: a dense layer of billions of weights, or too many trials at once.

No torch here: the sweep's driver checks every distinct trial of a space. The estimate counts what grows with
the settings (weights, their gradients and the optimizer's state, the activations of a training batch and of an
evaluation batch, the images on the device) and adds what a trial's process holds whatever its settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tune_cnn.config import InputShape, TrainConfig
from tune_cnn.errors import ConfigError, byte_size
from tune_cnn.models import family
from tune_cnn.space import SearchSpace

FLOAT_BYTES = 4
# A trial's process before its model and images: Python, torch's libraries, a Ray worker (benchmarks/README.md).
RUNTIME_BYTES = 2**29
FIXES = "use fewer or smaller images (--subset), more pooling or fewer filters, fewer dense_units, a smaller batch_size"


@dataclass(frozen=True)
class MemoryEstimate:
    """A trial's memory in bytes, by what holds it."""

    weights: int  # the parameters, their gradients and the optimizer's state
    activations: int  # what a training batch keeps for backward, with its gradients; an evaluation batch
    data: int  # every split's images as uint8, on the device
    runtime: int  # the process, and the images as it loaded them

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.data + self.runtime

    def describe(self) -> str:
        process = f", the process and its loaded images {byte_size(self.runtime)}" if self.runtime else ""
        return (f"about {byte_size(self.total)} (weights and optimizer {byte_size(self.weights)}, activations {byte_size(self.activations)}, "
                f"images {byte_size(self.data)}{process})")


def trial_memory(config: TrainConfig, shape: InputShape, images: int) -> MemoryEstimate:
    """The estimate for `config` on `images` images (all splits) of `shape`."""
    size = family(config.model.model).size(config.model, shape)
    states = 2 if config.optimizer == "adam" else (1 if config.momentum else 0)  # Adam's two moments; SGD's momentum
    averaged = 1 if config.ema else 0  # the weight average's copy (engine.WeightAverage)
    weights = size.parameters * FLOAT_BYTES * (2 + states + averaged)
    training = 2 * size.activations * config.batch_size  # kept for backward, and their gradients
    evaluation = size.activations * min(config.eval_batch_size, images)
    data = images * shape.channels * shape.height * shape.width
    return MemoryEstimate(weights, (training + evaluation) * FLOAT_BYTES, data, RUNTIME_BYTES + data)


def largest_trial(space: SearchSpace, shape: InputShape, images: int) -> tuple[MemoryEstimate, str]:
    """The space's trial that needs the most memory, and its swept settings as text."""
    sized = []
    for settings in space.bounding_trials():
        swept = ", ".join(f"{name}={settings[name]}" for name in space.swept)
        sized.append((trial_memory(TrainConfig.from_flat(settings), shape, images), swept))
    return max(sized, key=lambda pair: pair[0].total)


def check_sweep_memory(space: SearchSpace, shape: InputShape, images: int, max_concurrent: int | None) -> str:
    """A ConfigError where the space's largest trial, as many times as trials run at once here, cannot fit this
    machine's memory; otherwise the line that says how much it needs."""
    estimate, swept = largest_trial(space, shape, images)
    at_once, available = space.trials_at_once(max_concurrent), available_memory()
    what = f"{space.source}: the largest trial" + (f" ({swept})" if swept else "")
    check_fits(estimate, available, what, at_once=at_once)
    room = f" of {byte_size(available)} available" if available is not None else ""
    return f"memory: the largest trial needs {estimate.describe()}; {at_once} at once {byte_size(estimate.total * at_once)}{room}"


def available_memory() -> int | None:
    """Bytes this machine can give without swapping (Linux's MemAvailable); None where that cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(estimate: MemoryEstimate, available: int | None, what: str, where: str = "this machine", at_once: int = 1) -> None:
    """A ConfigError where `at_once` trials of `estimate` need more than `available` bytes."""
    needed = estimate.total * at_once
    if available is None or needed <= available:
        return
    trials = f"{at_once} trials at once need {byte_size(needed)}: each {estimate.describe()}" if at_once > 1 else f"needs {estimate.describe()}"
    fewer = "; or fewer trials at once (--max-concurrent, or more CPUs per trial)" if at_once > 1 else ""
    raise ConfigError(f"{what}: {trials}, and {where} has {byte_size(available)} available; {FIXES}{fewer}")
