"""The seed space end to end: its six trials as plain processes, and the whole sweep through Ray, command to
analysis, with the trials' timeline."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from tune_cnn.config import TrainConfig
from tune_cnn.data import load_data
from tune_cnn.experiment import json_reports
from tune_cnn.space import load_space
from tune_cnn.train import train


def time_seed_sweep(source: str, folder: Path, code: Path | None = None) -> dict[str, Any]:
    """Wall clock of `python -m tune_cnn.sweep seed` from the command's start to its analysis written and to its
    exit, with the trials' timeline and each line of the sweep's output stamped with when it came (progress
    tables left out). `code`: run the tune_cnn and search_spaces in that folder (an earlier commit's, from
    `git archive`) instead of the ones Python finds from here."""
    command = [sys.executable, "-u", "-m", "tune_cnn.sweep", "seed", "--data", source, "--storage", str(folder.resolve()), "--name", "bench_seed"]
    started_at, start = time.time(), time.perf_counter()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=code) as run:
        for line in run.stdout:
            lines.append((round(time.perf_counter() - start, 2), line.rstrip()))
    seconds = time.perf_counter() - start
    analysed = (folder / "bench_seed" / "analysis").is_dir()
    # The clock stops when the analysis is written (the sweep prints its folder then); ours also runs to exit.
    analysis_at = next((at for at, line in lines if line.startswith("analysis: ")), None)
    return {"command": " ".join(command[1:]), "seconds": seconds, "returncode": run.returncode, "analysis_written": analysed,
            "analysis_written_s": analysis_at,
            "timeline": sweep_timeline(folder / "bench_seed", started_at),
            "output": [(at, line[:200]) for at, line in lines if not line.startswith(("|", "+-"))],
            "output_tail": "\n".join(line for _, line in lines)[-2000:]}


def sweep_timeline(experiment: Path, started_at: float) -> dict[str, Any]:
    """Where a sweep's wall clock went, in seconds from the command's start (`started_at`, time.time()):
    when the trials started and ended (to within a second: Tune stamps each result in whole seconds), and per
    trial the time in its epochs (training and evaluation, as train() measures them) against the rest of the
    trial (set-up, reporting to Tune, checkpoints), and of that the set-up before the first epoch on its own."""
    trials = []
    for results in sorted(experiment.glob("*/result.json")):
        rows = json_reports(results.read_text())
        if not rows:
            continue
        ended = rows[-1]["timestamp"] - started_at
        total, in_epochs = rows[-1]["time_total_s"], sum(r["epoch_seconds"] for r in rows)
        trials.append({"started": ended - total, "ended": ended, "epochs": in_epochs, "outside_epochs": total - in_epochs,
                       "setup": rows[0]["time_total_s"] - rows[0]["epoch_seconds"]})
    if not trials:
        return {}
    span = lambda key: [min(t[key] for t in trials), max(t[key] for t in trials)]  # noqa: E731
    return {"trials_started_s": span("started"), "trials_ended_s": span("ended"), "trial_epochs_s": span("epochs"),
            "trial_outside_epochs_s": span("outside_epochs"), "trial_setup_s": span("setup")}


def time_seed_trials(source: str, at_once: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The seed space's trials as plain processes, `at_once` at a time, without Ray: the engine's share of
    the whole-sweep figure where Ray is missing (it is, on the lent GPU machines).

    Each trial is tune_cnn.train.train() as the sweep runs it (every epoch evaluated, checkpoints written);
    the clock runs from the first process's start to the last trial's end.
    """
    space = load_space("seed")
    trials = [TrainConfig.from_flat({**t, **(overrides or {})}).flat() for t in space.listed_trials()]
    context = mp.get_context("spawn")
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=at_once, mp_context=context) as pool:
        histories = list(pool.map(seed_trial, [source] * len(trials), [space.seed] * len(trials), [at_once] * len(trials), trials))
    return {"trials": len(trials), "at_once": at_once, "epochs": trials[0]["epochs"], "batch_size": trials[0]["batch_size"],
            "seconds": time.perf_counter() - start, "val_acc": [h[-1]["val_acc"] for h in histories],
            "trial_epochs_s": [sum(m["epoch_seconds"] for m in h) for h in histories],
            "epoch_seconds": [[round(m["epoch_seconds"], 3) for m in h] for h in histories]}


def seed_trial(source: str, split_seed: int, at_once: int, settings: dict[str, Any]) -> list[dict[str, float]]:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // at_once))
    data = load_data(source, seed=split_seed)
    return train(TrainConfig.from_flat(settings), data, report=lambda metrics, checkpoint: None)
