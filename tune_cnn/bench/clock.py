"""The benchmark's clock: timed passes, the load other processes put on the machine meanwhile, and the timed
images as a file that other processes load."""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tune_cnn.config import TrainConfig
from tune_cnn.data import Arrays

EPOCH_IMAGES = 50_000  # the "seconds per epoch" column is for a 50,000-image epoch, as the issue states targets
REPORTED = ("images_per_second", "epoch_seconds")
PROCESS_TIMEOUT_S = 900  # a trial or reference process that stops answering fails the benchmark instead of hanging it
WARMUP_BATCHES = 10  # untimed steps before timing: first-call allocations, cuDNN/oneDNN choices, compilation


@dataclass
class Timing:
    """One pipeline's timed passes: `images` per pass (all trials together), `seconds` per pass."""

    name: str
    images: int
    seconds: list[float]
    trials: int = 1
    warmup_seconds: float = 0.0
    others_cores: list[float] = field(default_factory=list)  # per pass: cores that other processes kept busy

    @property
    def images_per_second(self) -> float:
        return self.images / statistics.median(self.seconds)

    @property
    def epoch_seconds(self) -> float:
        return EPOCH_IMAGES / self.images_per_second

    def as_dict(self, reference: Timing | None) -> dict[str, Any]:
        ratio = self.images_per_second / reference.images_per_second if reference else None
        return {**dataclasses.asdict(self), **{k: getattr(self, k) for k in REPORTED}, "ratio_to_reference": ratio,
                "images_per_second_by_pass": [self.images / s for s in self.seconds],
                "ratio_to_reference_by_pass": self.ratios_by_pass(reference)}

    def ratios_by_pass(self, reference: Timing | None) -> list[float] | None:
        """Each pass's images/s over the reference pass of the same round, timed just before it: the ratio with
        the machine's drift between rounds taken out (a shared machine's speed can change within a minute)."""
        if reference is None or len(reference.seconds) != len(self.seconds) or self.trials != 1:
            return None
        return [(self.images / mine) / (reference.images / theirs) for mine, theirs in zip(self.seconds, reference.seconds)]


@dataclass
class Plan:
    """What to time: the config, the timed images, passes per pipeline and the concurrent-trial counts."""

    config: TrainConfig
    images: int
    rounds: int
    workers: int
    concurrency: list[int] = field(default_factory=list)
    variants: list[str] | None = None  # keys of VARIANTS on CUDA; None: all

    @property
    def warmup_images(self) -> int:
        """Untimed images first; they end on a batch as short as a timed pass's last, so compiled code meets
        both batch shapes before the clock runs."""
        batch = self.config.batch_size
        return min(WARMUP_BATCHES * batch + self.images % batch, self.images)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def measured(run: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """One timed pass: its seconds, and the cores other processes kept busy meanwhile."""
    with OtherLoad() as load:
        seconds = timed(run, device)
    return seconds, load.cores


class OtherLoad:
    """How many cores other processes kept busy while a pass ran: on a shared machine, the noise to report.

    Machine-wide busy time from /proc/stat less this process's and its reaped children's (DataLoader
    workers end with their epoch); None where /proc/stat is missing.
    """

    def __enter__(self) -> OtherLoad:
        self.start = (machine_busy_seconds(), own_cpu_seconds(), time.perf_counter())
        return self

    def __exit__(self, *_) -> None:
        machine, own, wall = self.start
        after = machine_busy_seconds()
        self.cores = None if machine is None or after is None else max(0.0, (after - machine - (own_cpu_seconds() - own)) / (time.perf_counter() - wall))


def machine_busy_seconds() -> float | None:
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def save_sample(sample: Arrays, folder: Path) -> Path:
    """The timed images as a file that the other processes load."""
    path = folder / "sample.npz"
    if not path.exists():
        np.savez(path, x=sample.x, y=sample.y)
    return path


def load_sample(path: str) -> Arrays:
    with np.load(path) as stored:
        return Arrays(stored["x"], stored["y"])
