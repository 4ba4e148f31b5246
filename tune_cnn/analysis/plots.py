"""A Sweep's plots: learning curves, the grouped views at the snapshot epochs, and the effects with their intervals.

They can be drawn by other processes (plot_workers), all at once, which a sweep starts with its trials.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tune_cnn.analysis.load import Sweep
from tune_cnn.analysis.stats import grouping_levels, select_rows

SPLIT_NAMES = {"val": "validation", "test": "test"}
PANELS = (("train_acc", "training accuracy (%)"), ("val_acc", "validation accuracy (%)"), ("val_loss", "validation loss (cross-entropy)"))
Drawings = dict[str, tuple[str, Callable[..., Any], tuple]]  # key -> (file name, plot function, its arguments)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: sweeps run on headless machines
    import matplotlib.pyplot as plt

    return plt


def _scaled(metric: str, values: pd.Series | np.ndarray) -> np.ndarray:
    """Accuracies in percent, as people read them; losses as they are; a diverged trial's infinite values as
    NaN, which plots leave out."""
    values = np.asarray(values, dtype=float) * (100 if metric.endswith("_acc") else 1)
    return np.where(np.isfinite(values), values, np.nan)


def value_label(value: Any) -> str:
    """A setting's value as a label: floats without trailing zeros."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _colours(values: Sequence[Any]) -> dict[Any, Any]:
    plt = _pyplot()
    palette = plt.get_cmap("tab10").colors
    return {value: palette[i % len(palette)] for i, value in enumerate(values)}


def plot_learning_curves(sweep: Sweep, colour_by: str | None = None) -> Any:
    """Training and validation accuracy and validation loss per epoch, a line per trial, coloured by a setting."""
    plt = _pyplot()
    colour_by = colour_by or next(iter(sweep.context.factors), None)
    frame = grouping_levels(sweep.frame, [colour_by] if colour_by else [], sweep.context.sampled)
    levels = sorted(frame[colour_by].unique(), key=str) if colour_by else [None]
    colours = _colours(levels)
    figure, axes = plt.subplots(1, len(PANELS), figsize=(16, 4.8), constrained_layout=True)
    for ax, (metric, axis_label) in zip(axes, PANELS):
        for _, trial in frame.sort_values("epoch").groupby("trial_id"):
            level = trial[colour_by].iloc[0] if colour_by else None
            ax.plot(trial["epoch"], _scaled(metric, trial[metric]), color=colours[level], alpha=0.75, linewidth=1.3, marker="." if len(trial) < 15 else None)
        ax.set(title=axis_label.split(" (")[0].capitalize(), xlabel="epoch", ylabel=axis_label)
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole: no tick at 2.5
        ax.grid(alpha=0.3)
    if colour_by:
        handles = [plt.Line2D([], [], color=colours[v], label=f"{colour_by} = {value_label(v)}") for v in levels]
        axes[-1].legend(handles=handles, title="colour", fontsize="small")
    trials = count(sweep.frame["trial_id"].nunique(), "trial")
    figure.suptitle(f"Learning curves: one line per trial ({trials}), coloured by {colour_by or 'nothing'}")
    return figure


def plot_grouped(sweep: Sweep, setting: str, at_epochs: Sequence[int] | None = None) -> Any:
    """The seed's grouped view: each panel's metric at the snapshot epochs, a box per value of `setting`
    (or per epoch when setting is 'epoch'), with every trial drawn as a dot."""
    plt = _pyplot()
    rows = grouping_levels(select_rows(sweep, "epochs", at_epochs), [] if setting == "epoch" else [setting], sweep.context.sampled)
    epochs = sorted(rows["epoch"].unique())
    levels = [None] if setting == "epoch" else sorted(rows[setting].unique(), key=str)
    colours = _colours(levels)
    width = 0.8 / len(levels)
    jitter = np.random.default_rng(0)
    figure, axes = plt.subplots(1, len(PANELS), figsize=(16, 4.8), constrained_layout=True)
    for ax, (metric, axis_label) in zip(axes, PANELS):
        for i, epoch in enumerate(epochs):
            for j, level in enumerate(levels):
                cell = rows[(rows["epoch"] == epoch) & ((rows[setting] == level) if level is not None else True)]
                values = _scaled(metric, cell[metric])
                values = values[~np.isnan(values)]
                if not len(values):
                    continue
                x = i + (j - (len(levels) - 1) / 2) * width
                box = ax.boxplot([values], positions=[x], widths=width * 0.8, patch_artist=True, showfliers=False,
                                 medianprops={"color": "black"})
                box["boxes"][0].set(facecolor=colours[level], alpha=0.35)
                ax.scatter(x + jitter.uniform(-width / 5, width / 5, len(values)), values, color=colours[level], s=16, zorder=3)
        ax.set_xticks(range(len(epochs)), [f"epoch {e}" for e in epochs])
        ax.set(title=axis_label.split(" (")[0].capitalize(), xlabel="snapshot epoch", ylabel=axis_label)
        ax.grid(alpha=0.3, axis="y")
    if setting != "epoch":
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[v], alpha=0.6, label=f"{setting} = {value_label(v)}") for v in levels]
        axes[-1].legend(handles=handles, fontsize="small")
    figure.suptitle(f"By {setting}: boxes over trials, one dot per trial ({count(sweep.frame['trial_id'].nunique(), 'trial')})")
    return figure


def plot_effects(effect_table: pd.DataFrame, importance_table: pd.DataFrame) -> Any:
    """Left: each difference in the mean of effects()'s metric between two values of a setting, with its 95%
    interval (a cross without one where the setting cannot be separated from the others). Right: the share of
    variance each setting explains."""
    plt = _pyplot()
    metric = effect_table["metric"].iloc[0]
    unit = "points" if metric.endswith("_acc") else ""
    figure, (left, right) = plt.subplots(1, 2, figsize=(16, max(3.5, 0.45 * len(effect_table) + 2)), constrained_layout=True)
    labels = [f"{r.setting}: {value_label(r.value_b)} vs {value_label(r.value_a)}" for r in effect_table.itertuples()]
    y = np.arange(len(effect_table))[::-1]
    difference = _scaled(metric, effect_table["difference"])
    errors = np.abs(_scaled(metric, effect_table[["low", "high"]].to_numpy().T) - difference)
    for row, (noise, separable) in enumerate(zip(effect_table["within_noise"], effect_table["separable"])):
        left.errorbar(difference[row], y[row], xerr=np.nan_to_num(errors[:, row : row + 1]) if separable else None,
                      fmt="o" if separable else "x", capsize=4, color="tab:grey" if noise else "tab:blue" if separable else "tab:red")
    left.axvline(0, color="black", linewidth=0.8)
    left.set_yticks(y, labels)
    left.set(title=f"Effect of each setting on {metric} (95% interval; grey: within noise;\n"
                   "red cross: not separable from the other settings, the difference of the means)",
             xlabel=f"difference in mean {metric} at each trial's best epoch ({unit or metric})")
    left.grid(alpha=0.3, axis="x")
    right.barh(importance_table["setting"][::-1], 100 * importance_table["variance_share"][::-1], color="tab:blue")
    right.set(title=f"Importance: share of the variance in {metric} across trials",
              xlabel="variance explained by the setting alone (%)", xlim=(0, 100))
    right.grid(alpha=0.3, axis="x")
    return figure


def plot_right_and_wrong(sweep: Sweep, split: str = "val") -> Any:
    """The learner's question in pictures: per epoch, the mean cross-entropy and the mean confidence over the images
    classified right and wrong, and the calibration error; a thin line per trial, the mean over trials bold."""
    plt = _pyplot()
    frame = sweep.frame.sort_values("epoch")
    panels = (("loss", "mean cross-entropy"), ("conf", "mean top-class probability"), ("ece", "expected calibration error"))
    figure, axes = plt.subplots(1, len(panels), figsize=(16, 4.8), constrained_layout=True)
    for ax, (kind, axis_label) in zip(axes, panels):
        groups = [("right", "tab:blue"), ("wrong", "tab:red")] if kind != "ece" else [(None, "tab:purple")]
        for group, colour in groups:
            column = f"{split}_{kind}" + (f"_{group}" if group else "")
            for _, trial in frame.groupby("trial_id"):
                ax.plot(trial["epoch"], _scaled(column, trial[column]), color=colour, alpha=0.25, linewidth=0.8)
            mean = frame.groupby("epoch")[column].mean()
            ax.plot(mean.index, _scaled(column, mean), color=colour, linewidth=2.2, label=f"{group} answers" if group else "all images")
        ax.set(title=axis_label.capitalize(), xlabel="epoch", ylabel=axis_label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(f"Right and wrong answers on the {SPLIT_NAMES[split]} split ({count(frame['trial_id'].nunique(), 'trial')}; "
                    f"bold: the mean over trials)")
    return figure


def plot_reliability(sweep: Sweep, epochs: dict[str, dict[str, int]], split: str = "val") -> Any:
    """Reliability diagrams: accuracy against mean confidence per confidence bin, pooled over the trials, at each
    trial's epoch of `epochs` (name -> trial id -> epoch, such as its lowest-loss epoch and its last)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(epochs), figsize=(6.5 * len(epochs), 5.6), constrained_layout=True, squeeze=False)
    bins = sweep.calibration[sweep.calibration["split"] == split]
    for ax, (name, chosen) in zip(axes[0], epochs.items()):
        at = bins[[epoch == chosen.get(trial) for trial, epoch in zip(bins["trial_id"], bins["epoch"])]]
        pooled = at.assign(confident=at["confidence"].fillna(0) * at["images"], right=at["accuracy"].fillna(0) * at["images"])
        pooled = pooled.groupby("bin")[["images", "confident", "right"]].sum()
        edges = np.linspace(0, 1, len(pooled) + 1) if len(pooled) else np.array([0.0, 1.0])
        shown = pooled[pooled["images"] > 0]
        accuracy, confidence = shown["right"] / shown["images"], shown["confident"] / shown["images"]
        ax.bar(edges[shown.index], accuracy, width=edges[1] - edges[0], align="edge", color="tab:blue", alpha=0.6, edgecolor="black",
               label="accuracy in the bin")
        ax.plot(confidence, accuracy, "o", color="tab:red", label="(mean confidence, accuracy)")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ece = (shown["right"] - shown["confident"]).abs().sum() / max(shown["images"].sum(), 1)
        ax.set(title=f"{name}: ECE {ece:.3f} ({int(shown['images'].sum()):,} image-trials)", xlabel="confidence (top-class probability)",
               ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    figure.suptitle(f"Reliability on the {SPLIT_NAMES[split]} split, pooled over {count(len(next(iter(epochs.values()), {})), 'trial')}")
    return figure


def plot_cost(costs: pd.DataFrame, metric: str, colour_by: str | None = None) -> Any:
    """The metric at each trial's best epoch against its training time: the cheapest good trials at a glance."""
    plt = _pyplot()
    levels = sorted(costs[colour_by].unique(), key=str) if colour_by else [None]
    colours = _colours(levels)
    figure, ax = plt.subplots(figsize=(8.5, 5.6), constrained_layout=True)
    others = [c for c in costs.columns if c not in ("trial_id", "seconds", metric, colour_by, "seed")]
    for level in levels:
        rows = costs[costs[colour_by] == level] if colour_by else costs
        x, y = rows["seconds"] / 60, _scaled(metric, rows[metric])
        ax.scatter(x, y, color=colours[level], s=40, label=f"{colour_by} = {value_label(level)}" if colour_by else None)
        for (_, row), xi, yi in zip(rows.iterrows(), x, y):  # the other settings beside each point
            ax.annotate(", ".join(f"{c}={value_label(row[c])}" for c in others), (xi, yi), textcoords="offset points", xytext=(5, 4),
                        fontsize="x-small", color=colours[level])
    ax.set(title=f"{metric} at each trial's best epoch against its training time", xlabel="training time (minutes, all its epochs)",
           ylabel=f"{metric}" + (" (%)" if metric.endswith("_acc") else ""))
    ax.grid(alpha=0.3)
    if colour_by:
        ax.legend(fontsize="small")
    return figure


def _save(figure: Any, path: Path) -> str:
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path.name


def _draw_and_save(plot: Callable[..., Any], args: tuple, path: Path) -> str:
    return _save(plot(*args), path)


def draw(drawings: Drawings, folder: Path, plotters: Executor | None) -> dict[str, str]:
    """Each plot's file name by key, drawn by `plotters` at once, or here one after another (also where one of
    those processes has died)."""
    if plotters is not None:
        try:
            drawn = {key: plotters.submit(_draw_and_save, plot, args, folder / name) for key, (name, plot, args) in drawings.items()}
            return {key: future.result() for key, future in drawn.items()}
        except BrokenExecutor:
            pass
    return {key: _draw_and_save(plot, args, folder / name) for key, (name, plot, args) in drawings.items()}


def prepare_plotting() -> None:
    """Load matplotlib and draw a first figure, which loads the fonts and the PNG writer: for a process that
    will draw plots later and should not spend that time then."""
    plt = _pyplot()
    figure = plt.figure()
    figure.savefig(io.BytesIO(), format="png")
    plt.close(figure)



def count(n: int, noun: str) -> str:
    """'1 trial', '2 trials'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


@contextmanager
def plot_workers(plots: int) -> Iterator[Executor]:
    """Processes that draw an analysis's plots all at once, one per plot up to one per core, for `draw`.

    Started with a sweep, they import pandas and matplotlib while the trials train, at low priority so the trials
    come first; they ignore Ctrl-C, which the sweep handles.
    """
    workers = max(1, min(plots, os.cpu_count() or 1))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_plot_worker)
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the processes started meanwhile
    try:
        for _ in range(workers):  # the pool starts a process for each task that finds none idle
            pool.submit(int)
    finally:
        signal.signal(signal.SIGINT, interrupt)
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def _start_plot_worker() -> None:
    os.nice(10)
    prepare_plotting()
