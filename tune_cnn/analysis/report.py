"""A Sweep's findings in sentences, its report.md, and the analysis folder: tables, plots and report together."""
from __future__ import annotations

import fnmatch
import math
import tempfile
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import pandas as pd

from tune_cnn.analysis.load import NOT_STARTED, Sweep, load
from tune_cnn.analysis.plots import (
    Drawings,
    count,
    draw,
    plot_cost,
    plot_effects,
    plot_grouped,
    plot_learning_curves,
    plot_reliability,
    plot_right_and_wrong,
    value_label,
)
from tune_cnn.analysis.questions import (
    cost_sentences,
    grok_sentence,
    has_diagnostics,
    late_rise,
    late_trend,
    learner_findings,
    loss_rise,
    overfitting_sentence,
    step_gains,
    trend_sentence,
    trial_costs,
)
from tune_cnn.analysis.stats import OVERFIT_RISE, check_settings, diagnose, effects, importance, select_rows, snapshot_epochs, summarize
from tune_cnn.errors import StorageError
from tune_cnn.experiment import ANALYSIS_FOLDER, Storage, experiment_name

BEST_ROWS = 5
# Every file an analysis writes; a rerun into the same folder removes those it does not write again.
ANALYSIS_FILES = ("results.csv", "results.parquet", "report.md", "trials.csv", "steps.csv", "effects.csv", "importance.csv", "summary_*.csv", "overfitting.csv",
                  "learning_curves.png", "effects.png", "by_*.png", "right_and_wrong.png", "reliability.png", "cost.png")


# --- Tables people read ------------------------------------------------------------------------------------


def best_trials(sweep: Sweep, rows: int = BEST_ROWS) -> pd.DataFrame:
    """The top trials by the sweep's metric, each at its best epoch."""
    ctx = sweep.context
    best = select_rows(sweep, "best").sort_values(ctx.metric, ascending=ctx.mode == "min").head(rows)
    return best[["trial_id", "status", *ctx.swept, "epoch", "train_acc", "val_acc", "val_loss", "test_acc"]]


def grouped_table(summary: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """A summary's mean ± std of the three seed metrics, for reading."""
    table = summary[list(keys)].copy()
    table["trials"] = summary["val_acc_count"]
    for metric, scale, unit in (("train_acc", 100, "%"), ("val_acc", 100, "%"), ("val_loss", 1, "")):
        means, stds = summary[f"{metric}_mean"] * scale, summary[f"{metric}_std"] * scale
        table[metric] = [_mean_and_spread(m, s, 1 if unit else 3) + unit for m, s in zip(means, stds)]
    return table


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracies and accuracy gaps in percent, for tables people read."""
    frame = frame.copy()
    for column in frame.columns:
        if column.endswith("_acc") or column.startswith("gap_at_") or column == "val_acc_at_best_epoch":
            frame[column] = [percent(v) for v in frame[column]]
    return frame


def markdown_table(frame: pd.DataFrame) -> str:
    """A frame as a Markdown table, each cell as `cell` writes it, unpadded."""
    cells = frame.map(cell).astype(str)
    return cells.to_markdown(index=False, tablefmt="pipe", stralign=None, numalign=None, disable_numparse=True)


def cell(value: Any) -> str:
    if value is pd.NA or (isinstance(value, float) and math.isnan(value)):  # no value, such as a diverged trial's best epoch
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def percent(value: float) -> str:
    return f"{100 * value:.1f}%" if not math.isnan(value) else "-"


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _value(metric: str, value: float) -> str:
    """A metric as people read it: accuracies in percent, losses to 4 significant digits."""
    return percent(value) if metric.endswith("_acc") else cell(float(value))


def _change(metric: str, value: float) -> str:
    """A difference in a metric: accuracies in percentage points, losses as they are."""
    return _points(value) if metric.endswith("_acc") else f"{value:+.3g}"


def _mean_and_spread(mean: float, std: float, digits: int) -> str:
    """'mean ± std'; the mean alone for one trial, whose spread is undefined (NaN); '-' where no trial has a value."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if not math.isnan(std) else "")


# --- Findings ----------------------------------------------------------------------------------------------


def findings(sweep: Sweep, effect_table: pd.DataFrame, importance_table: pd.DataFrame, diagnosis: pd.DataFrame) -> list[str]:
    """The seed's conclusions, computed: one plain sentence each, in the metric each table was computed on."""
    lines = [_effect_sentence(r) for r in effect_table.itertuples()]
    if len(importance_table):
        ranking = ", ".join(f"{r.setting} {percent(r.variance_share)}" for r in importance_table.itertuples())
        metric = importance_table["metric"].iloc[0]
        lines.append(f"Importance (share of the variance in {metric} across trials each setting explains alone): {ranking}.")
    diverged = diagnosis.loc[diagnosis["diverged"], "trial_id"].tolist()
    if diverged:
        lines.append(f"Diverged (validation loss NaN or infinite at the last epoch): {', '.join(diverged)}.")
    lowest = diagnosis["best_epoch"].dropna()  # none in a trial that diverged at once
    lines.append(
        f"Overfitting: {diagnosis['overfitting'].sum()} of {len(diagnosis)} trials (validation loss rose more than {OVERFIT_RISE:.0%} "
        f"above its minimum while training accuracy kept rising)"
        + (f"; validation loss was lowest at epoch {lowest.mean():.1f} on average." if len(lowest) else ".")
    )
    if has_diagnostics(sweep):
        lines.append(overfitting_sentence(loss_rise(sweep), loss_rise(sweep, "test")))
    gaps = [f"{_points(diagnosis[f'gap_at_{e}'].mean())} points at epoch {e}" for e in sweep.context.snapshot_epochs
            if f"gap_at_{e}" in diagnosis and diagnosis[f"gap_at_{e}"].notna().any()]
    if gaps:
        lines.append("Generalisation gap (training minus validation accuracy, mean over trials): " + ", ".join(gaps) + ".")
    lines += [line for line in (trend_sentence(late_trend(sweep)), grok_sentence(late_rise(sweep))) if line]
    return lines + cost_sentences(sweep, effect_table)


def _effect_sentence(row: Any) -> str:
    metric, a, b = row.metric, value_label(row.value_a), value_label(row.value_b)
    unit = " points" if metric.endswith("_acc") else ""
    means = f"{_value(metric, row.mean_b)} vs {_value(metric, row.mean_a)} mean {metric}, {row.n_b} and {row.n_a} trials"
    if not row.separable:
        return (f"{row.setting}: {b} vs {a} differ by {_change(metric, row.difference)}{unit} in their means ({means}); these trials "
                f"cannot separate {row.setting} from the other settings (it changed only together with them, or there are too few "
                f"trials), so the difference may be theirs.")
    # In an unbalanced sweep (optuna, ASHA, an interrupted grid) the model's difference is not that of the means.
    adjusted = " with the other settings held equal" if not math.isclose(row.difference, row.mean_b - row.mean_a, abs_tol=1e-9) else ""
    differ = f"{row.setting}: {b} vs {a} differ by {_change(metric, row.difference)}{unit}{adjusted} ({means})"
    if math.isnan(row.low):
        return f"{differ}; too few trials to tell noise from effect."
    verdict = "within noise" if row.within_noise else "larger than the trial-to-trial noise"
    return f"{differ}, {verdict} (95% interval {_change(metric, row.low)} to {_change(metric, row.high)})."


# --- report.md ---------------------------------------------------------------------------------------------


def _best_lines(sweep: Sweep) -> list[str]:
    """The best trial in a sentence, then the top trials' table."""
    ctx = sweep.context
    best = best_trials(sweep)
    if best.empty:  # every trial diverged
        return [f"No trial has a {ctx.metric} that is a number: there are no best trials, effects or importance.", ""]
    top = best.iloc[0]
    settings = f" ({', '.join(f'{s}={value_label(top[s])}' for s in ctx.swept)})" if ctx.swept else ""
    return [f"Best trial: **{top['trial_id']}**{settings}: {ctx.metric} {_value(ctx.metric, top[ctx.metric])} at epoch {top['epoch']}.",
            "", markdown_table(readable(best)), ""]


def _learner_lines(sweep: Sweep, effect_table: pd.DataFrame, diagnosis: pd.DataFrame) -> list[str]:
    """The seed's three findings, each reproduced or not, where this sweep varied what they are about."""
    lines = learner_findings(sweep, effect_table, diagnosis)
    return ["## The seed's findings, checked", "", *[f"- {line}" for line in lines], ""] if lines else []


def trial_statuses(sweep: Sweep) -> pd.Series:
    """How many trials of the sweep are in each status, every trial of its space counted: those with rows, those
    without (queued, unreadable, lost) and those Ray never made before the sweep was interrupted."""
    ctx = sweep.context
    with_rows = sweep.frame.groupby("trial_id")["status"].first()
    without_rows = [status for trial, status in ctx.incomplete.items() if trial not in with_rows.index]
    never_made = max(0, (ctx.space_trials or 0) - len(with_rows) - len(without_rows))
    return pd.Series([*with_rows, *without_rows, *[NOT_STARTED] * never_made], dtype=object).value_counts()


def _step_lines(steps: pd.DataFrame) -> list[str]:
    """A steps search's table of what each step bought, gains in points."""
    if steps.empty:
        return []
    table = readable(steps).assign(gain=[_points(v) if not math.isnan(v) else "-" for v in steps["gain"]])
    return ["## What each step bought", "", "Each step's trial has the changes of every step before it; accuracies at its last epoch, "
            "the gain in test accuracy over the step before in points, seconds of training:", "", markdown_table(table), ""]


def report_markdown(sweep: Sweep, summaries: dict[str, pd.DataFrame], effect_table: pd.DataFrame,
                    importance_table: pd.DataFrame, diagnosis: pd.DataFrame, plots: dict[str, str],
                    steps: pd.DataFrame | None = None) -> str:
    ctx, df = sweep.context, sweep.frame
    statuses = trial_statuses(sweep)
    counts = ", ".join(f"{n} {status}" for status, n in statuses.items())
    seeds = ", ".join(map(value_label, sorted(df["seed"].unique()))) if "seed" in ctx.swept else ""
    replicates = f"; seed ({seeds}) repeats each combination: its spread is the trial-to-trial noise, not an effect" if seeds else ""
    search = ctx.metadata.search if ctx.metadata else None
    lines = [
        f"# Analysis of {experiment_name(ctx.experiment)}",
        "",
        f"Experiment: `{experiment_name(ctx.experiment)}`. {count(int(statuses.sum()), 'trial')}: {counts}."
        + (f" Search: {search}." if search else "")
        + f" Swept: {', '.join(ctx.factors) or 'nothing'}{replicates}. Snapshot epochs: {', '.join(map(str, ctx.snapshot_epochs))}.",
    ]
    if ctx.incomplete:
        lines += ["", "**Incomplete trials:** " + ", ".join(f"{t} ({s})" for t, s in ctx.incomplete.items()) + "."]
    lines += [
        "", *_step_lines(steps if steps is not None else step_gains(sweep)),
        f"## Best trials by {ctx.metric} ({ctx.mode}), each at its best epoch", "", *_best_lines(sweep),
        *_learner_lines(sweep, effect_table, diagnosis), "## Findings", "",
        *[f"- {line}" for line in findings(sweep, effect_table, importance_table, diagnosis)],
        "", f"![Effects]({plots['effects']})" if "effects" in plots else "",
        "", "## Grouped views at the snapshot epochs", "",
    ]
    for key, summary in summaries.items():
        keys = ["epoch"] if key == "epoch" else [key, "epoch"]
        lines += [f"### By {key}", "", markdown_table(grouped_table(summary, keys)), "", f"![By {key}]({plots[key]})", ""]
    lines += ["## Learning curves", "", f"![Learning curves]({plots['learning_curves']})", ""]
    if "right_and_wrong" in plots:
        lines += ["## Right and wrong answers", "", "Mean loss and confidence over the validation images classified right and wrong, "
                  "epoch by epoch (overfitting.csv has each trial's figures):", "", f"![Right and wrong answers]({plots['right_and_wrong']})", ""]
    if "reliability" in plots:
        lines += [f"![Reliability]({plots['reliability']})", ""]
    if "cost" in plots:
        lines += ["## Cost", "", f"![Cost]({plots['cost']})", ""]
    lines += ["## Per-trial diagnosis", "", markdown_table(readable(diagnosis)), ""]
    return "\n".join(lines)


# --- Writing the analysis folder ---------------------------------------------------------------------------


def write_analysis(experiment: str | Path, out: str | Path | None = None, by: list[str] | None = None,
                   at_epochs: list[int] | None = None, plotters: Executor | None = None) -> Path | str:
    """Write results, summaries, plots and report.md; return the folder (EXPERIMENT/analysis by default).

    An analysis bound for cloud storage (`out`, or the experiment's folder) is written locally first, then
    copied there. With `plotters` (processes, such as `plots.plot_workers`), the plots are drawn there, all at once.
    """
    return analyse_into(load(experiment), out, by, at_epochs, plotters)


def analyse_into(sweep: Sweep, out: str | Path | None = None, by: list[str] | None = None,
                 at_epochs: list[int] | None = None, plotters: Executor | None = None) -> Path | str:
    """write_analysis for a sweep already loaded."""
    # Fails here, before any work.
    target = Storage.open(out) if out is not None else Storage.open(sweep.context.experiment).child(ANALYSIS_FOLDER)
    try:
        if not target.is_uri:
            _remove_stale(target, _write_files(sweep, Path(target.root), by, at_epochs, plotters))
            return Path(target.location)
        with tempfile.TemporaryDirectory(prefix="tune_cnn_analysis_") as folder:
            written = _write_files(sweep, Path(folder), by, at_epochs, plotters)
            target.upload(Path(folder))
        _remove_stale(target, written)
        return target.location
    except OSError as error:  # a read-only or full disk, or a bucket without write access
        raise StorageError(f"cannot write the analysis to {target.location} ({error.strerror or error}); choose a writable folder "
                           f"with --out") from None


def _write_files(sweep: Sweep, folder: Path, by: list[str] | None, at_epochs: list[int] | None, plotters: Executor | None) -> set[str]:
    """Write the analysis into `folder`; return the names of the files written. `by` chooses the groupings
    only: effects and importance always cover the swept settings (ExperimentContext.factors)."""
    df = sweep.frame
    groupings = list(dict.fromkeys(by)) if by is not None else sweep.context.factors  # a setting named twice is one grouping
    if len(df):  # a bad --by or --epochs fails before anything is written
        check_settings(sweep, groupings)
        snapshot_epochs(sweep, at_epochs)
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / "results.csv", index=False)
    df.to_parquet(folder / "results.parquet", index=False)
    written = {"results.csv", "results.parquet", "report.md"}
    if df.empty:
        (folder / "report.md").write_text(f"# Analysis of {sweep.context.experiment}\n\nNo trial has reported a result yet.\n")
        return written
    summaries = {key: summarize(sweep, key, at_epochs) for key in [*groupings, "epoch"]}
    diagnosis = diagnose(sweep, at_epochs)
    effect_table, importance_table = effects(sweep), importance(sweep)
    steps = step_gains(sweep)
    tables = {"trials.csv": diagnosis, "effects.csv": effect_table, "importance.csv": importance_table, **({"steps.csv": steps} if len(steps) else {}),
              **{f"summary_{key}.csv": summary for key, summary in summaries.items()}}
    if has_diagnostics(sweep):
        tables["overfitting.csv"] = loss_rise(sweep)
    for name, table in tables.items():
        table.to_csv(folder / name, index=False)
    drawings: Drawings = {key: (f"by_{key}.png", plot_grouped, (sweep, key, at_epochs)) for key in summaries}
    drawings["learning_curves"] = ("learning_curves.png", plot_learning_curves, (sweep, next(iter(groupings), None)))
    if len(effect_table):
        drawings["effects"] = ("effects.png", plot_effects, (effect_table, importance_table))
    if has_diagnostics(sweep):
        drawings["right_and_wrong"] = ("right_and_wrong.png", plot_right_and_wrong, (sweep,))
    if len(sweep.calibration) and "overfitting.csv" in tables:
        rises = tables["overfitting.csv"]
        epochs = {"At each trial's lowest validation loss": dict(zip(rises["trial_id"], rises["best_epoch"])),
                  "At each trial's last epoch": dict(zip(rises["trial_id"], rises["last_epoch"]))}
        drawings["reliability"] = ("reliability.png", plot_reliability, (sweep, epochs))
    if df["trial_id"].nunique() > 1:
        drawings["cost"] = ("cost.png", plot_cost, (trial_costs(sweep), sweep.context.metric, next(iter(groupings), None)))
    plots = draw(drawings, folder, plotters)
    (folder / "report.md").write_text(report_markdown(sweep, summaries, effect_table, importance_table, diagnosis, plots, steps))
    return written | set(tables) | set(plots.values())


def _remove_stale(target: Storage, written: set[str]) -> None:
    """Delete the files an earlier analysis wrote into the folder and this one did not (another --by's groupings,
    an effects plot this sweep has no effects for), so that none contradicts the report; other files stay."""
    for name in target.listing()[0]:
        if name not in written and any(fnmatch.fnmatchcase(name, pattern) for pattern in ANALYSIS_FILES):
            target.delete(name)
