"""A Sweep's numbers: grouped summaries, the per-trial diagnosis, each setting's effect with its interval, and
each setting's share of the variance."""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy.special import stdtrit

from tune_cnn.analysis.load import AnalysisError, Sweep, setting_columns
from tune_cnn.experiment import METRICS

STATS = ("mean", "std", "count", "min", "max")
At = Literal["epochs", "last", "best"]
# A setting with more distinct numeric values than this (an Optuna range) is split at its median: groups of
# one trial each would say nothing about trial-to-trial noise.
MAX_LEVELS = 6
# Validation loss wanders by a few percent from epoch to epoch; a smaller rise is not called overfitting.
OVERFIT_RISE = 0.05
EFFECT_COLUMNS = ["metric", "setting", "value_a", "value_b", "n_a", "n_b", "mean_a", "mean_b", "difference", "low", "high",
                  "within_noise", "separable"]


# --- Grouped views -----------------------------------------------------------------------------------------


def summarize(sweep: Sweep, by: str | Sequence[str], at_epochs: Sequence[int] | None = None, metrics: Sequence[str] | None = None,
              at: At = "epochs") -> pd.DataFrame:
    """Mean, std, count, min and max of each metric per group, one row per group, columns `<metric>_<stat>`.

    at="epochs" takes the snapshot epochs (default: the sweep's checkpoint epochs) and groups by epoch as
    well, since a mean over epochs 10 and 30 means nothing; "last" and "best" take one row per trial (its
    last epoch, or its best by the sweep's metric). `by` is settings, or "epoch" itself.
    """
    keys = [by] if isinstance(by, str) else list(by)
    metrics = list(metrics or [m for m in METRICS if m in sweep.frame])
    _check_columns(sweep.frame, keys + metrics)
    rows = grouping_levels(select_rows(sweep, at, at_epochs), [k for k in keys if k != "epoch"], sweep.context.sampled)
    if at == "epochs" and "epoch" not in keys:
        keys.append("epoch")
    table = rows.groupby(keys, dropna=False, sort=True)[metrics].agg(list(STATS))
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    return table.reset_index()


def _check_columns(frame: pd.DataFrame, names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in frame.columns]
    if unknown:
        known = [c for c in frame.columns if c not in ("trial_id", "status", *METRICS)]
        raise AnalysisError(f"unknown setting or metric {', '.join(unknown)}; choose from: {', '.join(known)}")


def check_settings(sweep: Sweep, names: Sequence[str]) -> None:
    """What the analysis may group by: the trials' settings, not their ids, seeds, statuses, epochs or metrics."""
    settings = setting_columns(sweep.frame)
    wrong = [n for n in names if n not in settings]
    if wrong:
        by_epoch = " (the analysis always writes summary_epoch.csv and by_epoch.png)" if "epoch" in wrong else ""
        raise AnalysisError(f"cannot group by {', '.join(wrong)}: not a setting; choose from: {', '.join(settings)}{by_epoch}")


def select_rows(sweep: Sweep, at: At = "epochs", at_epochs: Sequence[int] | None = None) -> pd.DataFrame:
    """The snapshot rows (at="epochs"), or one row per trial: its last epoch or its best by the sweep's metric."""
    df = sweep.frame
    if at == "epochs":
        return df[df["epoch"].isin(snapshot_epochs(sweep, at_epochs))]
    if at == "last":
        return df.loc[df.groupby("trial_id")["epoch"].idxmax()]
    if at == "best":
        metric, pick = sweep.context.metric, "idxmax" if sweep.context.mode == "max" else "idxmin"
        # A diverged trial's NaN or infinite values are no best: one that has no other has no best epoch, no row.
        finite = df[finite_values(df[metric])]
        return finite.loc[getattr(finite.groupby("trial_id")[metric], pick)()]
    raise AnalysisError(f"at '{at}' is unknown; use epochs, last or best")


def finite_values(values: pd.Series) -> pd.Series:
    """Where a metric is a number: a diverged trial reports NaN (or infinite) losses."""
    return pd.Series(np.isfinite(values.to_numpy(float)), index=values.index)


def snapshot_epochs(sweep: Sweep, at_epochs: Sequence[int] | None = None) -> list[int]:
    """The epochs asked for (each must have been reported), or the sweep's snapshot epochs."""
    if at_epochs is None:
        return sweep.context.snapshot_epochs
    epochs = sweep.frame["epoch"]
    missing = sorted(set(at_epochs) - set(epochs))
    if missing:
        reported = f"{epochs.min()} to {epochs.max()}" if len(epochs) else "none"
        raise AnalysisError(f"no trial reported epoch(s) {', '.join(map(str, missing))}; reported epochs: {reported}")
    return sorted(set(int(e) for e in at_epochs))


def grouping_levels(frame: pd.DataFrame, settings: Sequence[str], sampled: Sequence[str] = ()) -> pd.DataFrame:
    """A copy whose continuous settings read '<= median' / '> median': those with more than MAX_LEVELS numeric
    values, and those a sweep drew from a distribution (`sampled`; more than two values), whose values never repeat."""
    frame = frame.copy()
    for name in settings:
        values = frame.groupby("trial_id")[name].first()
        levels = MAX_LEVELS if name not in sampled else 2
        if values.nunique() > levels and pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            median = values.median()
            frame[name] = np.where(frame[name] <= median, f"<= {median:.3g}", f"> {median:.3g}")
    return frame


# --- Per-trial diagnosis, effects and importance -----------------------------------------------------------


def diagnose(sweep: Sweep, at_epochs: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per trial: its swept settings, best epoch by validation loss, the generalisation gap
    (train_acc - val_acc) at each snapshot epoch, whether it diverged (validation loss NaN or infinite at its
    last epoch; its best epoch is the best before that, none if there is none) and whether it overfitted:
    validation loss ended more than OVERFIT_RISE above its minimum while training accuracy kept rising past
    that epoch."""
    epochs = snapshot_epochs(sweep, at_epochs)
    rows = []
    for trial_id, trial in sweep.frame.sort_values("epoch").groupby("trial_id", sort=True):
        finite = trial[finite_values(trial["val_loss"])]
        best = finite.loc[finite["val_loss"].idxmin()] if len(finite) else pd.Series(np.nan, index=trial.columns)
        last = trial.iloc[-1]
        diverged = not np.isfinite(last["val_loss"])
        gaps = trial.set_index("epoch").reindex(epochs)
        rows.append({
            "trial_id": trial_id, "status": last["status"], **{s: last[s] for s in sweep.context.swept},
            "last_epoch": int(last["epoch"]), "best_epoch": best["epoch"], "min_val_loss": best["val_loss"],
            "val_acc_at_best_epoch": best["val_acc"], "final_val_acc": last["val_acc"],
            **{f"gap_at_{e}": gaps.at[e, "train_acc"] - gaps.at[e, "val_acc"] for e in epochs},
            "diverged": diverged,
            "overfitting": bool(not diverged and last["val_loss"] > best["val_loss"] * (1 + OVERFIT_RISE)
                                and last["train_acc"] > best["train_acc"]),
        })
    diagnosis = pd.DataFrame(rows)
    return diagnosis.astype({"best_epoch": "Int64"}) if rows else diagnosis  # whole epochs, or none for a trial that had none


def trial_values(sweep: Sweep, metric: str = "val_acc", at: At = "best") -> pd.DataFrame:
    """One row per trial with `metric` at its best (by the sweep's metric) or last epoch; a trial whose `metric`
    there is not a number (it diverged) is left out."""
    if at == "epochs":
        raise AnalysisError("effects and importance need one value per trial; use at='best' or at='last'")
    rows = select_rows(sweep, at)
    return rows[finite_values(rows[metric])].set_index("trial_id")


def effects(sweep: Sweep, settings: Sequence[str] | None = None, metric: str | None = None, at: At = "best") -> pd.DataFrame:
    """For each pair of values of each setting (default: the swept ones but a swept seed, see
    ExperimentContext.factors): the mean `metric` (default: the sweep's; in the `metric` column) of each, and the
    difference (b - a) with its 95% interval from an additive model of all the settings (see AdditiveModel): in a
    balanced grid the difference of the two means, otherwise adjusted for the other settings. An interval that
    spans 0 means the difference is within trial-to-trial noise; NaN bounds (and within_noise None) mean too few
    trials to tell. Where the trials cannot separate the setting from the others (separable False), the difference
    is that of the two means, without an interval."""
    metric, settings, trials = _trial_table(sweep, settings, metric, at)
    model = AdditiveModel.fit(trials, settings, metric)
    rows = []
    for name in settings:
        groups = {value: group[metric].to_numpy() for value, group in trials.groupby(name, sort=True)}
        for (a, xa), (b, xb) in itertools.combinations(groups.items(), 2):
            estimate = model.contrast(name, a, b)
            difference, half_width = estimate or (xb.mean() - xa.mean(), math.nan)
            rows.append({
                "metric": metric, "setting": name, "value_a": a, "value_b": b, "n_a": len(xa), "n_b": len(xb),
                "mean_a": xa.mean(), "mean_b": xb.mean(), "difference": difference,
                "low": difference - half_width, "high": difference + half_width,
                "within_noise": None if math.isnan(half_width) else bool(abs(difference) <= half_width),
                "separable": estimate is not None,
            })
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def _trial_table(sweep: Sweep, settings: Sequence[str] | None, metric: str | None, at: At) -> tuple[str, list[str], pd.DataFrame]:
    """What effects and importance work on: the metric, the settings (each once) and one row per trial."""
    metric = metric or sweep.context.metric
    settings = list(dict.fromkeys(settings if settings is not None else sweep.context.factors))  # a setting named twice is one
    _check_columns(sweep.frame, [*settings, metric])
    return metric, settings, grouping_levels(trial_values(sweep, metric, at), settings, sweep.context.sampled)


@dataclass
class AdditiveModel:
    """metric = intercept + an effect per value of each setting + noise, fitted by least squares.

    In a grid with one trial per combination, the spread within one setting's group is mostly the other
    settings' effects; this model takes every setting's effect out, so its residual variance is the
    trial-to-trial noise (interactions count as noise). In a balanced grid a difference equals the
    difference of the two groups' means; otherwise it is adjusted for the other settings.
    """

    columns: list[tuple[str, Any]]
    coefficients: np.ndarray
    covariance: np.ndarray
    residual_df: int
    row_space: np.ndarray  # projects a contrast onto the combinations of the trials' rows

    @classmethod
    def fit(cls, trials: pd.DataFrame, settings: Sequence[str], metric: str) -> AdditiveModel:
        # One indicator column per value but the first of each setting (the intercept carries it).
        columns = [(name, value) for name in settings for value in sorted(trials[name].unique(), key=str)[1:]]
        x = np.column_stack([np.ones(len(trials))] + [(trials[name] == value).to_numpy(float) for name, value in columns])
        y = trials[metric].to_numpy(float)
        coefficients = np.linalg.lstsq(x, y, rcond=None)[0]
        residual_df = len(y) - int(np.linalg.matrix_rank(x))
        variance = ((y - x @ coefficients) ** 2).sum() / residual_df if residual_df > 0 else math.nan
        return cls(columns, coefficients, np.linalg.pinv(x.T @ x) * variance, residual_df, np.linalg.pinv(x) @ x)

    def contrast(self, setting: str, a: Any, b: Any) -> tuple[float, float] | None:
        """The difference b - a and the half width of its 95% interval (NaN without residual degrees of freedom).

        None where the trials cannot separate it from the other settings' effects: a value that only ever ran
        together with a value of another setting, or fewer trials than the model has values. Many fits are then
        equally good, and lstsq's choice among them (the smallest coefficients) says nothing about the setting.
        The difference is estimable where its weights are a combination of the trials' rows.
        """
        weights = np.zeros(len(self.coefficients))
        for value, sign in ((b, 1.0), (a, -1.0)):
            if (setting, value) in self.columns:
                weights[1 + self.columns.index((setting, value))] += sign
        if not np.allclose(weights @ self.row_space, weights, atol=1e-6):
            return None
        difference = float(weights @ self.coefficients)
        if self.residual_df < 1:
            return difference, math.nan
        return difference, t_critical(self.residual_df) * math.sqrt(max(float(weights @ self.covariance @ weights), 0.0))


def t_critical(df: float, level: float = 0.95) -> float:
    """The two-sided Student-t critical value for `df` degrees of freedom: scipy's inverse of the t distribution
    function, which scipy.stats.t.ppf calls too, from scipy.special, which imports several times faster."""
    return float(stdtrit(df, (1 + level) / 2))


def importance(sweep: Sweep, settings: Sequence[str] | None = None, metric: str | None = None, at: At = "best") -> pd.DataFrame:
    """Settings (default: the swept ones but a swept seed) ranked by the share of the variance in `metric`
    (default: the sweep's; in the `metric` column) across trials that each explains alone (eta squared:
    between-group over total sum of squares); the rest is interactions and noise. No rows where no trial has a
    value."""
    metric, settings, trials = _trial_table(sweep, settings, metric, at)
    values = trials[metric]
    total = ((values - values.mean()) ** 2).sum()
    shares = {}
    for name in settings if len(trials) else []:
        means = trials.groupby(name)[metric].transform("mean")
        shares[name] = ((means - values.mean()) ** 2).sum() / total if total > 0 else 0.0
    table = pd.DataFrame({"metric": metric, "setting": list(shares), "variance_share": list(shares.values())}, columns=["metric", "setting", "variance_share"])
    table = table.sort_values("variance_share", ascending=False, ignore_index=True)
    table["rank"] = np.arange(1, len(table) + 1)
    return table
