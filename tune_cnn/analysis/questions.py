"""The learner's questions, answered from a Sweep: why the validation loss rises while accuracy stays flat (losing
confidence on the right answers, or growing confident on the wrong ones?), whether longer training would still help
or "grok", and what each setting costs in time beside what it buys."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
from scipy.special import stdtrit

from tune_cnn.analysis.load import Sweep
from tune_cnn.analysis.plots import value_label
from tune_cnn.analysis.stats import OVERFIT_RISE, effects, finite_values
from tune_cnn.space import step_trials

LONG_EPOCHS = 100  # a trial this long can show accuracy rising again after it levelled off (the learner's "grok")
GROK_RISE = 0.02  # a later best this far above the best by mid-training is a rise again, not noise
SMOOTHING = 5  # epochs of the centred rolling mean that the late-rise check compares, so that one lucky epoch is no rise


# --- Why the loss rises ------------------------------------------------------------------------------------


def has_diagnostics(sweep: Sweep, split: str = "val") -> bool:
    """Whether the trials reported the prediction diagnostics (sweeps before them did not)."""
    return f"{split}_loss_wrong" in sweep.frame and bool(sweep.frame[f"{split}_conf_right"].notna().any())


def loss_rise(sweep: Sweep, split: str = "val") -> pd.DataFrame:
    """Per trial, from the epoch of its lowest validation loss (`best_epoch`) to its last: the split's loss at both,
    the rise, and how much of it came from the images classified wrong and right. loss = acc * loss_right + (1 - acc)
    * loss_wrong, so `from_wrong` + `from_right` = `rise`. Also both groups' mean confidence and loss, the accuracy and
    the calibration error at both epochs. Trials whose validation loss never was a number are left out."""
    rows = []
    for trial_id, trial in sweep.frame.sort_values("epoch").groupby("trial_id", sort=True):
        finite = trial[finite_values(trial["val_loss"])]
        if finite.empty:
            continue
        best, last = finite.loc[finite["val_loss"].idxmin()], trial.iloc[-1]
        row = {"trial_id": trial_id, **{s: last[s] for s in sweep.context.swept}, "split": split,
               "best_epoch": int(best["epoch"]), "last_epoch": int(last["epoch"])}
        for name in ("loss", "acc", "conf_right", "conf_wrong", "loss_right", "loss_wrong", "ece"):
            row[f"{name}_at_best"], row[f"{name}_at_last"] = best[f"{split}_{name}"], last[f"{split}_{name}"]
        row["rise"] = row["loss_at_last"] - row["loss_at_best"]
        for group in ("wrong", "right"):
            row[f"from_{group}"] = _group_loss(last, split, group) - _group_loss(best, split, group)
        rows.append(row)
    return pd.DataFrame(rows)


def _group_loss(row: pd.Series, split: str, group: str) -> float:
    """A group's share of the split's mean loss: its fraction of the images times its mean loss (0 with no images)."""
    acc = row[f"{split}_acc"]
    weight = acc if group == "right" else 1 - acc
    return 0.0 if weight == 0 else weight * row[f"{split}_loss_{group}"]


def overfitting_sentence(rises: pd.DataFrame, test_rises: pd.DataFrame | None = None) -> str:
    """Which of the learner's hypotheses the rise in validation loss supports, with the figures, over the trials
    whose validation loss rose more than OVERFIT_RISE above its minimum; with `test_rises` (loss_rise of the test
    split), the test loss's share from the wrong answers over the same trials and epochs too."""
    risen = rises[(rises["rise"] > OVERFIT_RISE * rises["loss_at_best"]) & rises["from_wrong"].notna()]
    if risen.empty:
        return (f"Why validation loss rises: in no trial did it rise more than {OVERFIT_RISE:.0%} above its minimum with its "
                f"right and wrong answers measured, so there is no rise to explain.")
    mean = risen.mean(numeric_only=True)
    share_wrong = risen["from_wrong"].sum() / risen["rise"].sum()
    wrong_bolder, right_bolder = mean["conf_wrong_at_last"] > mean["conf_wrong_at_best"], mean["conf_right_at_last"] > mean["conf_right_at_best"]
    if share_wrong >= 0.5 and wrong_bolder:
        verdict = ("The data supports the second hypothesis: the rise comes from the wrong answers, on which the model grows more "
                   "confident" + (", while the right answers grow more confident too." if right_bolder else "."))
    elif share_wrong < 0.5 and not right_bolder:
        verdict = "The data supports the first hypothesis: the rise comes from the right answers, on which the model loses confidence."
    else:
        verdict = ("Neither hypothesis alone: " + ("the wrong answers carry the rise, but the model's confidence on them did not grow."
                                                   if share_wrong >= 0.5 else "the right answers carry the rise, yet the model grew more confident on them."))
    return (f"Why validation loss rises ({len(risen)} of {len(rises)} trials, from their lowest-loss epoch, {mean['best_epoch']:.1f} on "
            f"average, to their last): by {mean['rise']:.3g} on average, of which the wrong answers add {mean['from_wrong']:+.3g} "
            f"({share_wrong:.0%}; their mean loss went from {mean['loss_wrong_at_best']:.2f} to {mean['loss_wrong_at_last']:.2f} and their "
            f"mean confidence from {mean['conf_wrong_at_best']:.2f} to {mean['conf_wrong_at_last']:.2f}) and the right answers "
            f"{mean['from_right']:+.3g} ({1 - share_wrong:.0%}; their confidence went from {mean['conf_right_at_best']:.2f} to "
            f"{mean['conf_right_at_last']:.2f}), while validation accuracy went from {100 * mean['acc_at_best']:.1f}% to "
            f"{100 * mean['acc_at_last']:.1f}%. {verdict} Calibration error (ECE) went from {mean['ece_at_best']:.3f} to "
            f"{mean['ece_at_last']:.3f}." + _test_share(risen, test_rises))


def _test_share(risen: pd.DataFrame, test_rises: pd.DataFrame | None) -> str:
    """The test split's rise over the same trials and epochs, and the wrong answers' share of it."""
    if test_rises is None or test_rises.empty:
        return ""
    test = test_rises[test_rises["trial_id"].isin(risen["trial_id"])]
    if test.empty or test["from_wrong"].isna().any() or test["rise"].sum() == 0:
        return ""
    return (f" On the test split, over the same epochs, the loss rose by {test['rise'].mean():.3g} on average, "
            f"{test['from_wrong'].sum() / test['rise'].sum():.0%} of it from the wrong answers.")


# --- Would longer training help? ---------------------------------------------------------------------------


def late_trend(sweep: Sweep, metric: str = "val_acc") -> pd.DataFrame:
    """Per trial: the least-squares slope of `metric` per epoch over the last third of its epochs (at least 3), with
    its standard error."""
    rows = []
    for trial_id, trial in sweep.frame.sort_values("epoch").groupby("trial_id", sort=True):
        tail = trial[trial["epoch"] > trial["epoch"].max() * 2 / 3]
        tail = tail[finite_values(tail[metric])]
        if len(tail) < 3:
            continue
        x, y = tail["epoch"].to_numpy(float), tail[metric].to_numpy(float)
        slope, intercept = np.polyfit(x, y, 1)
        residual = y - (slope * x + intercept)
        se = math.sqrt((residual @ residual) / (len(x) - 2) / ((x - x.mean()) @ (x - x.mean()))) if len(x) > 2 else math.nan
        rows.append({"trial_id": trial_id, "from_epoch": int(x[0]), "to_epoch": int(x[-1]), "points": len(x), "slope": slope, "se": se})
    return pd.DataFrame(rows)


def trend_summary(trends: pd.DataFrame) -> tuple[float, float, float, str] | None:
    """The mean slope over the trials with its 95% interval (from the trials' spread, or from one trial's own
    residuals) and the verdict: 'still rising', 'flat' or 'falling'; None without trends."""
    if trends.empty:
        return None
    slopes = trends["slope"].to_numpy()
    if len(slopes) > 1:
        mean, half = slopes.mean(), float(stdtrit(len(slopes) - 1, 0.975)) * slopes.std(ddof=1) / math.sqrt(len(slopes))
    else:
        mean, half = slopes[0], float(stdtrit(trends["points"].iloc[0] - 2, 0.975)) * trends["se"].iloc[0]
    low, high = mean - half, mean + half
    return mean, low, high, "still rising" if low > 0 else "falling" if high < 0 else "flat"


def trend_sentence(trends: pd.DataFrame, metric: str = "val_acc") -> str | None:
    """Whether `metric` was still rising at the end, in a sentence with the figures (see trend_summary)."""
    summary = trend_summary(trends)
    if summary is None:
        return None
    mean, low, high, verdict = summary
    scale, unit = (100, " points") if metric.endswith("_acc") else (1, "")
    meaning = {"still rising": "still rising: longer training should add more", "falling": "falling: longer training would cost accuracy",
               "flat": "flat, within noise: longer training at this setting buys nothing measurable"}[verdict]
    span = f"epochs {trends['from_epoch'].min()} to {trends['to_epoch'].max()}"
    return (f"Longer training: over the last third of the epochs ({span}), {metric} changed by {scale * mean:+.3f}{unit} per epoch "
            f"on average over {len(trends)} trial{'s' * (len(trends) > 1)} (95% interval {scale * low:+.3f} to {scale * high:+.3f}): {meaning}.")


def late_rise(sweep: Sweep, metric: str = "val_acc") -> pd.DataFrame:
    """Per trial of at least LONG_EPOCHS epochs: the best `metric` (a SMOOTHING-epoch rolling mean) by mid-training
    and the epoch it levelled off (first came within 1 point of it), the best after mid-training and its epoch, and
    whether that is a rise again (GROK_RISE or more above the first)."""
    rows = []
    for trial_id, trial in sweep.frame.sort_values("epoch").groupby("trial_id", sort=True):
        last = int(trial["epoch"].max())
        if last < LONG_EPOCHS:
            continue
        smooth = trial.set_index("epoch")[metric].rolling(SMOOTHING, center=True, min_periods=1).mean()
        early, late = smooth[smooth.index <= last // 2], smooth[smooth.index > last // 2]
        rows.append({"trial_id": trial_id, **{s: trial[s].iloc[0] for s in sweep.context.factors}, "epochs": last,
                     "early_best": early.max(), "levelled_at": int(early.index[early >= early.max() - 0.01][0]),
                     "late_best": late.max(), "late_best_at": int(late.idxmax()), "rose_again": bool(late.max() - early.max() >= GROK_RISE)})
    return pd.DataFrame(rows)


def grok_sentence(rises: pd.DataFrame, metric: str = "val_acc") -> str | None:
    """Whether a long trial's accuracy rose again after levelling off, a clause per trial."""
    if rises.empty:
        return None
    factors = [c for c in rises.columns if c not in ("trial_id", "epochs", "early_best", "levelled_at", "late_best", "late_best_at", "rose_again")]

    def clause(r: pd.Series) -> str:
        name = ", ".join(f"{f}={value_label(r[f])}" for f in factors) or r["trial_id"]
        return (f"{name}: {100 * r['early_best']:.1f}% by epoch {r['levelled_at']}, best after epoch {r['epochs'] // 2} "
                f"{100 * r['late_best']:.1f}% at epoch {r['late_best_at']} ({100 * (r['late_best'] - r['early_best']):+.1f} points)")

    clauses = "; ".join(clause(r) for _, r in rises.iterrows())
    risen = int(rises["rose_again"].sum())
    verdict = (f"{risen} of {len(rises)} long trials rose again after levelling off" if risen
               else f"no trial that ran {rises['epochs'].min()} epochs or more rose again after levelling off")
    return (f"Grokking ({metric}, {SMOOTHING}-epoch centred rolling mean; a rise again is {100 * GROK_RISE:.0f} points or more above the best "
            f"by mid-training): {verdict}. {clauses}.")


# --- What each setting costs --------------------------------------------------------------------------------


def cost_sentences(sweep: Sweep, effect_table: pd.DataFrame) -> list[str]:
    """Each swept setting's effect on seconds per epoch (each trial's median epoch, steadier than any one epoch on a
    shared machine) beside its effect on the sweep's metric, a sentence per pair of values that the effects table holds."""
    if effect_table.empty:
        return []
    medians = sweep.frame.assign(epoch_seconds=sweep.frame.groupby("trial_id")["epoch_seconds"].transform("median"))
    times = effects(replace(sweep, frame=medians), metric="epoch_seconds").set_index(["setting", "value_a", "value_b"])
    lines = []
    for r in effect_table.itertuples():
        if (r.setting, r.value_a, r.value_b) not in times.index:
            continue
        t = times.loc[(r.setting, r.value_a, r.value_b)]
        change = t["difference"] / t["mean_a"]
        unit = " points" if r.metric.endswith("_acc") else ""
        gain = 100 * r.difference if r.metric.endswith("_acc") else r.difference
        noise = ("; too few trials to tell it from timing noise" if pd.isna(t["within_noise"])
                 else "; within the timing noise of these trials" if t["within_noise"] else "")
        lines.append(f"Cost of {r.setting} {value_label(r.value_b)} against {value_label(r.value_a)}: {gain:+.1f}{unit} {r.metric}, epochs "
                     f"{abs(change):.0%} {'slower' if change > 0 else 'faster'} ({t['mean_b']:.1f} against {t['mean_a']:.1f} s{noise}).")
    return lines


def trial_costs(sweep: Sweep) -> pd.DataFrame:
    """Per trial: its swept settings, its training time (the sum of its epochs' seconds) and the sweep's metric at its
    best epoch."""
    ctx = sweep.context
    pick = "idxmax" if ctx.mode == "max" else "idxmin"
    rows = []
    for trial_id, trial in sweep.frame.groupby("trial_id", sort=True):
        finite = trial[finite_values(trial[ctx.metric])]
        best = finite.loc[getattr(finite[ctx.metric], pick)()] if len(finite) else None
        rows.append({"trial_id": trial_id, **{s: trial[s].iloc[0] for s in ctx.swept}, "seconds": trial["epoch_seconds"].sum(),
                     ctx.metric: best[ctx.metric] if best is not None else math.nan})
    return pd.DataFrame(rows)


def step_gains(sweep: Sweep) -> pd.DataFrame:
    """A steps search's trials in order: what each step changed, its trial's validation and test accuracy at its last
    epoch, the test accuracy's gain over the step before, and the trial's training seconds: what each step bought.
    Empty for other searches; a step whose trial has no rows has no figures."""
    metadata = sweep.context.metadata
    if not metadata or not metadata.steps:
        return pd.DataFrame()
    last = sweep.frame.sort_values("epoch").groupby("trial_id", sort=True).tail(1)
    rows = []
    for number, (step, settings) in enumerate(zip(metadata.steps, step_trials(metadata.fixed, metadata.steps)), 1):
        swept = {name: tuple(value) if isinstance(value, list) else value for name, value in settings.items() if name in sweep.context.swept}
        match = last[np.logical_and.reduce([last[name].map(lambda v, want=want: v == want) for name, want in swept.items()])]
        rows.append({"step": number, "change": ", ".join(f"{k}={value_label(v)}" for k, v in step.items()) or "(the first trial)",
                     "trial_id": match["trial_id"].iloc[0] if len(match) else None})
    table = pd.DataFrame(rows).merge(last[["trial_id", "epoch", "val_acc", "test_acc"]], on="trial_id", how="left")
    table["gain"] = table["test_acc"].diff()
    table["seconds"] = table["trial_id"].map(sweep.frame.groupby("trial_id")["epoch_seconds"].sum())
    return table


# --- The learner's own findings -------------------------------------------------------------------------------


def learner_findings(sweep: Sweep, effect_table: pd.DataFrame, diagnosis: pd.DataFrame) -> list[str]:
    """The seed sweep's three findings, each said to be reproduced or not by this sweep where it varied what the
    finding is about: training accuracy kept rising while validation loss rose and accuracy stayed flat; max against
    average pooling hardly mattered; smaller convolution windows did better."""
    lines = []
    if len(diagnosis):
        overfit, summary = int(diagnosis["overfitting"].sum()), trend_summary(late_trend(sweep))
        held = overfit > len(diagnosis) / 2 and (summary is None or summary[3] != "still rising")
        lines.append(f"Overfitting (training accuracy kept rising while validation loss rose and accuracy stayed flat): "
                     f"{'reproduced' if held else 'not reproduced'}: {overfit} of {len(diagnosis)} trials overfitted"
                     + (f", and over the last third of the epochs validation accuracy was {summary[3]} ({100 * summary[0]:+.2f} points "
                        f"per epoch, 95% interval {100 * summary[1]:+.2f} to {100 * summary[2]:+.2f})" if summary else "") + ".")
    if not sweep.context.metric.endswith("_acc"):  # the other two are about accuracy
        return lines
    rows = effect_table.set_index("setting") if len(effect_table) else pd.DataFrame()
    if "pooling" in rows.index:
        r = rows.loc[["pooling"]].iloc[0]
        small = r["within_noise"] or abs(r["difference"]) < 0.01
        lines.append(f"Pooling hardly matters: {'reproduced' if small else 'not reproduced'}: {r['value_b']} against {r['value_a']} differ by "
                     f"{100 * r['difference']:+.1f} points{_interval(r)}.")
    if "conv_width" in rows.index:
        widths = rows.loc[["conv_width"]]
        r = widths[(widths["value_a"] == widths["value_a"].min()) & (widths["value_b"] == widths["value_b"].max())].iloc[0]
        better = r["difference"] < 0 and r["within_noise"] is not None and not r["within_noise"]
        lines.append(f"Smaller windows do better: {'reproduced' if better else 'not reproduced'}: conv_width {r['value_b']} against "
                     f"{r['value_a']} differ by {100 * r['difference']:+.1f} points{_interval(r)}.")
    return lines


def _interval(row: pd.Series) -> str:
    if row["separable"] and not math.isnan(row["low"]):
        return f" (95% interval {100 * row['low']:+.1f} to {100 * row['high']:+.1f})"
    return " (too few trials, or too entangled with other settings, for an interval)"
