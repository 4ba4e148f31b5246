"""How far a sweep has come and how long it has left: a line under each of Ray's progress tables, and before a sweep
starts (its dry run) an estimate from a few timed steps of each distinct trial on this machine."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tune_cnn.config import TrainConfig
from tune_cnn.data import DataSplits
from tune_cnn.space import SearchSpace

TIMED_BATCHES, WARMUP_BATCHES = 20, 5  # training steps timed per distinct trial in a dry run, after untimed ones
EVAL_BATCHES = 2
# Settings that change nothing of a step's cost: trials differing only in these are timed once.
COST_FREE = ("epochs", "checkpoint_every", "seed", "lr", "momentum", "weight_decay", "dropout", "optimizer")


@dataclass(frozen=True)
class Plan:
    """What a sweep will run: its trials, their epochs in all, and whether early stopping (ASHA) may cut them."""

    trials: int
    epochs: int
    early_stopping: bool

    @classmethod
    def of(cls, space: SearchSpace) -> Plan:
        if space.lists_trials:
            epochs = sum(TrainConfig.from_flat(trial).epochs for trial in space.listed_trials())
        else:
            epochs = space.samples * space.epochs
        return cls(space.trial_count, epochs, space.scheduler.type == "asha")


def progress_line(plan: Plan, trials: Sequence[Any], now: float | None = None) -> str | None:
    """'progress: T of N trials done, E of M epochs; about X left at S s per epoch, K trials at a time', from Ray's
    trials (their status and last result); None before the first epoch is timed."""
    reported = [t.last_result for t in trials if t.last_result and "epoch_seconds" in t.last_result]
    if not reported:
        return None
    done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    epochs = sum(int(t.last_result.get("epoch", 0)) for t in trials if t.last_result)
    pace = sum(r["epoch_seconds"] for r in reported) / len(reported)
    at_once = max(1, sum(t.status == "RUNNING" for t in trials))
    left = max(0, plan.epochs - epochs) * pace / at_once
    most = "at most " if plan.early_stopping else ""
    return (f"progress: {done} of {plan.trials} trials done, {epochs} of {most}{plan.epochs} epochs; about {duration(left)} left at "
            f"{pace:.1f} s per epoch, {at_once} trial{'s' * (at_once > 1)} at a time")


def duration(seconds: float) -> str:
    """'45 s', '12 min', '3 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


def with_progress(reporter_class: type, plan: Plan) -> type:
    """A subclass of Ray's progress reporter that prints the progress line under each table, and at once when the
    first epoch has been timed. (Made here so that Ray loads only when a sweep runs.)"""

    class ProgressReporter(reporter_class):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.timed = False

        def should_report(self, trials: Sequence[Any], done: bool = False) -> bool:
            first = not self.timed and any(t.last_result and "epoch_seconds" in t.last_result for t in trials)
            return super().should_report(trials, done) or first

        def report(self, trials: Sequence[Any], done: bool, *sys_info: str) -> None:
            super().report(trials, done, *sys_info)
            line = progress_line(plan, trials)
            if line:
                self.timed = True
                print(line, flush=True)

    return ProgressReporter


# --- Before a sweep: an estimate ---------------------------------------------------------------------------


def estimate(space: SearchSpace, data: DataSplits, max_concurrent: int | None = None) -> str:
    """The sweep's time on this machine's CPUs, from TIMED_BATCHES training steps and EVAL_BATCHES evaluation
    batches of each distinct trial (alone on the machine, at the trial's threads); or why it cannot say."""
    import torch

    if torch.cuda.is_available():
        return "time estimate: none on a machine with a GPU, where trials share each GPU; a short sweep (--epochs 1) shows the pace"
    trials = space.listed_trials() if space.lists_trials else [_optuna_example(space)] * space.samples
    threads, at_once = max(1, int(space.resources.cpu)), space.trials_at_once(max_concurrent)
    timed: dict[tuple, float] = {}
    start = time.perf_counter()
    total = 0.0
    for settings in trials:
        config = TrainConfig.from_flat(settings)
        key = tuple(sorted((k, str(v)) for k, v in config.flat().items() if k not in COST_FREE))
        if key not in timed:
            timed[key] = epoch_seconds(config, data, threads)
        total += timed[key] * config.epochs
    rough = "; an Optuna search's trials are not drawn yet: each was timed at its settings' first values" if space.search == "optuna" else ""
    return (f"time estimate: about {duration(total / at_once)} for {len(trials)} trial(s), {at_once} at a time with {threads} CPU "
            f"thread(s) each; from {TIMED_BATCHES} timed steps of each of {len(timed)} distinct trial(s) alone on this machine "
            f"({time.perf_counter() - start:.0f} s){rough}")


def _optuna_example(space: SearchSpace) -> dict[str, Any]:
    """An Optuna space's trial at each swept setting's first value or its range's low end."""
    from tune_cnn.space import Distribution

    return {**space.fixed, **{name: (int(v.low) if v.kind == "int" else v.low) if isinstance(v, Distribution) else v[0]
                              for name, v in space.space.items()}}


def epoch_seconds(config: TrainConfig, data: DataSplits, threads: int) -> float:
    """One epoch of `config` on `data` (training over the training split, evaluating validation and test), at the
    pace of a few timed training steps and evaluation batches."""
    import torch

    from tune_cnn.engine import build_engine, eval_batch_size

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engine = build_engine(config, data.shape, data.mean, data.std, train_images=data.train.x)
        batch, eval_batch = config.batch_size, eval_batch_size(config, engine.device)
        sample = engine.put(data.train.take(list(range(min(len(data.train), (TIMED_BATCHES + WARMUP_BATCHES) * batch)))))
        engine.train_epoch(engine.put(data.train.take(list(range(min(len(data.train), WARMUP_BATCHES * batch))))))
        train_start = time.perf_counter()
        engine.train_epoch(sample)
        per_train_image = (time.perf_counter() - train_start) / len(sample)
        evaluated = engine.put(data.val.take(list(range(min(len(data.val), EVAL_BATCHES * eval_batch)))))
        engine.evaluate(evaluated)
        eval_start = time.perf_counter()
        engine.evaluate(evaluated)
        per_eval_image = (time.perf_counter() - eval_start) / len(evaluated)
    finally:
        torch.set_num_threads(previous)
    return len(data.train) * per_train_image + (len(data.val) + len(data.test)) * per_eval_image
