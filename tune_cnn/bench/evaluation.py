"""What the per-epoch prediction diagnostics cost: the epoch's evaluation of the validation and test splits as
every epoch runs it (engine.evaluate) against loss and accuracy alone, as it ran before the diagnostics."""
from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tune_cnn.bench.clock import Plan, timed
from tune_cnn.data import DataSplits
from tune_cnn.engine import NO_AUTOCAST, DeviceData, build_engine, eval_batch_size, evaluate

MIN_ROUNDS = 5  # evaluations are short: more alternating rounds than the training passes' for a steady median


@torch.inference_mode()
def loss_and_accuracy(model: nn.Module, data: DeviceData, batch_size: int, autocast: Any = NO_AUTOCAST) -> tuple[float, float]:
    """The evaluation before the diagnostics, the baseline they are timed against: mean cross-entropy and accuracy."""
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


def time_evaluation(plan: Plan, data: DataSplits) -> dict[str, Any]:
    """Seconds of one epoch's evaluation (validation and test) each way, alternating, medians of the rounds."""
    engine = build_engine(plan.config, data.shape, data.mean, data.std)
    splits = [engine.put(data.val), engine.put(data.test)]
    batch = eval_batch_size(plan.config, engine.device)
    runs = {"with_diagnostics": lambda: [evaluate(engine.model, s, batch, engine.autocast) for s in splits],
            "loss_and_accuracy": lambda: [loss_and_accuracy(engine.model, s, batch, engine.autocast) for s in splits]}
    for run in runs.values():  # warm-up: first-call allocations and kernel choices
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(max(plan.rounds, MIN_ROUNDS)):
        for name, run in runs.items():
            seconds[name].append(timed(run, engine.device))
    return {"images": sum(len(s) for s in splits), "rounds": len(seconds["with_diagnostics"]),
            **{f"{name}_s": statistics.median(values) for name, values in seconds.items()},
            **{f"{name}_s_by_round": values for name, values in seconds.items()}}


def epoch_overhead(evaluation: dict[str, Any], training_epoch_s: float) -> float:
    """The diagnostics' share of an epoch: the evaluation's extra seconds over the epoch without them (the training
    pass over the whole training split, at the engine's measured rate, and the plain evaluation)."""
    extra = evaluation["with_diagnostics_s"] - evaluation["loss_and_accuracy_s"]
    return extra / (training_epoch_s + evaluation["loss_and_accuracy_s"])
