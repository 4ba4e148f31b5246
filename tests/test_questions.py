"""The learner's questions answered from the data: which hypothesis the rise in validation loss supports, whether
accuracy was still rising, whether a long trial rose again after levelling off, and what each setting costs; on
synthetic experiment folders whose figures are known, and on a tiny real sweep."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tune_cnn import analysis
from tune_cnn.analysis import questions

from test_analysis import EPOCHS, SEED_METADATA, assert_png, curve, seed_params, write_grid, write_trial

LOSS_RIGHT, LOSS_WRONG = 0.3, 2.0


def diagnosed(report: dict, carried_by: str) -> dict:
    """A report with its validation diagnostics: the rise in loss after epoch 3 carried by the wrong answers (their
    confidence rising) or by the right ones (their confidence falling), so that loss = acc * loss_right + (1 - acc) *
    loss_wrong holds; calibration bins that hold every image."""
    epoch = report["epoch"]
    for split in ("val", "test"):
        acc, loss = report[f"{split}_acc"], report[f"{split}_loss"]
        if carried_by == "wrong":
            loss_right, conf_right, conf_wrong = LOSS_RIGHT, 0.80 + 0.01 * epoch, 0.50 + 0.03 * epoch
            loss_wrong = (loss - acc * loss_right) / (1 - acc)
        else:
            loss_wrong, conf_right, conf_wrong = LOSS_WRONG, 0.95 - 0.03 * epoch, 0.50
            loss_right = (loss - (1 - acc) * loss_wrong) / acc
        bins = [[0, math.nan, math.nan]] * 13 + [[4000, conf_wrong, acc - 0.1], [1000, conf_right, acc + 0.1]]
        report = {**report, f"{split}_loss_right": loss_right, f"{split}_loss_wrong": loss_wrong, f"{split}_conf_right": conf_right,
                  f"{split}_conf_wrong": conf_wrong, f"{split}_ece": 0.02 * epoch, f"{split}_forgotten": 10, f"{split}_learned": 20,
                  f"{split}_calibration": bins}
    return report


@pytest.mark.parametrize("carried_by, words", [
    ("wrong", "The data supports the second hypothesis: the rise comes from the wrong answers, on which the model grows more confident, "
              "while the right answers grow more confident too."),
    ("right", "The data supports the first hypothesis: the rise comes from the right answers, on which the model loses confidence."),
])
def test_the_rise_in_validation_loss_is_split_between_wrong_and_right_answers(tmp_path: Path, carried_by: str, words: str):
    experiment = write_grid(tmp_path / "diagnosed", change=lambda p, w, r: diagnosed(r, carried_by))
    sweep = analysis.load(experiment)
    rises = questions.loss_rise(sweep).set_index("trial_id")
    assert len(rises) == 6
    overfit = rises.drop(sweep.frame.loc[(sweep.frame["pooling"] == "avg") & (sweep.frame["conv_width"] == 7), "trial_id"].iloc[0])
    assert overfit["best_epoch"].tolist() == [3] * 5 and overfit["last_epoch"].tolist() == [EPOCHS] * 5
    assert (overfit["from_wrong"] + overfit["from_right"]).to_numpy() == pytest.approx(overfit["rise"].to_numpy())  # the identity
    # By hand: the rise is 0.7 -> 1.0; with loss_right fixed at 0.3, the right answers add 0.3 * (acc_6 - acc_3).
    acc = {e: np.array([curve(p, w, e)["val_acc"] for p in ("max", "avg") for w in (3, 5, 7) if (p, w) != ("avg", 7)]) for e in (3, EPOCHS)}
    if carried_by == "wrong":
        from_right = LOSS_RIGHT * (acc[EPOCHS] - acc[3]).mean()
    else:
        from_right = 0.3 - LOSS_WRONG * ((1 - acc[EPOCHS]) - (1 - acc[3])).mean()
    sentence = next(line for line in analysis.findings(sweep, analysis.effects(sweep), analysis.importance(sweep), analysis.diagnose(sweep))
                    if line.startswith("Why validation loss rises"))
    share_wrong = 1 - from_right / 0.3
    assert sentence.startswith("Why validation loss rises (5 of 6 trials, from their lowest-loss epoch, 3.0 on average, to their last): "
                               f"by 0.3 on average, of which the wrong answers add {0.3 - from_right:+.3g} ({share_wrong:.0%}; ")
    assert f"and the right answers {from_right:+.3g} ({1 - share_wrong:.0%}; their confidence went from " in sentence
    assert words in sentence and "Calibration error (ECE) went from 0.060 to 0.120." in sentence
    # The test split (loss 0.01 above validation's, accuracy 1 point below) over the same trials and epochs.
    test_from_right = (LOSS_RIGHT * ((acc[EPOCHS] - 0.01) - (acc[3] - 0.01)).mean() if carried_by == "wrong"
                       else 0.3 - LOSS_WRONG * ((1 - acc[EPOCHS] + 0.01) - (1 - acc[3] + 0.01)).mean())
    assert sentence.endswith(f" On the test split, over the same epochs, the loss rose by 0.3 on average, {1 - test_from_right / 0.3:.0%} "
                             f"of it from the wrong answers.")


def test_reliability_and_right_and_wrong_plots_are_written_where_the_trials_reported_their_diagnostics(tmp_path: Path):
    experiment = write_grid(tmp_path / "diagnosed", change=lambda p, w, r: diagnosed(r, "wrong"))
    folder = analysis.write_analysis(experiment)
    for name in ("right_and_wrong", "reliability", "cost"):
        assert_png(folder / f"{name}.png")
    report = (folder / "report.md").read_text()
    assert "## Right and wrong answers" in report and "](reliability.png)" in report and "](cost.png)" in report
    rises = (folder / "overfitting.csv").read_text().splitlines()
    assert len(rises) == 7 and rises[0].startswith("trial_id,pooling,conv_width,split,best_epoch,last_epoch")
    plain = analysis.write_analysis(write_grid(tmp_path / "plain"))  # a sweep from before the diagnostics
    assert not (plain / "reliability.png").exists() and not (plain / "overfitting.csv").exists()
    assert "Why validation loss rises" not in (plain / "report.md").read_text()


def test_the_trend_over_the_last_third_says_whether_accuracy_was_still_rising(tmp_path: Path):
    experiment = tmp_path / "trend"
    slopes = {3: 0.010, 5: 0.011, 7: 0.012}
    for index, (width, slope) in enumerate(slopes.items()):
        reports = [{**curve("max", width, e), "val_acc": 0.6 + slope * e + (0.002 if e % 2 else 0)} for e in range(1, 13)]
        write_trial(experiment, index, {**seed_params("max", width), "epochs": 12}, reports)
    sweep = analysis.load(experiment)
    trends = questions.late_trend(sweep)
    assert trends["from_epoch"].tolist() == [9, 9, 9] and trends["to_epoch"].tolist() == [12, 12, 12]
    fitted = [np.polyfit(range(9, 13), [0.6 + s * e + (0.002 if e % 2 else 0) for e in range(9, 13)], 1)[0] for s in slopes.values()]
    assert trends["slope"].tolist() == pytest.approx(fitted)
    mean, half = np.mean(fitted), stats.t.ppf(0.975, 2) * np.std(fitted, ddof=1) / math.sqrt(3)
    assert questions.trend_sentence(trends) == (
        f"Longer training: over the last third of the epochs (epochs 9 to 12), val_acc changed by {100 * mean:+.3f} points per epoch on "
        f"average over 3 trials (95% interval {100 * (mean - half):+.3f} to {100 * (mean + half):+.3f}): still rising: longer training "
        f"should add more.")
    one = questions.late_trend(sweep.where(sweep.frame["conv_width"] == 3))  # one trial: the interval from its own residuals
    fit = stats.linregress(range(9, 13), [0.6 + 0.01 * e + (0.002 if e % 2 else 0) for e in range(9, 13)])
    assert one["se"].iloc[0] == pytest.approx(fit.stderr)
    assert f"(95% interval {100 * (fit.slope - stats.t.ppf(0.975, 2) * fit.stderr):+.3f} to " in questions.trend_sentence(one)


def test_a_long_trial_that_rises_again_after_levelling_off_is_told_from_one_that_stays_flat(tmp_path: Path):
    experiment = tmp_path / "long"
    for index, decay in enumerate((0.0, 1.0)):
        reports = []
        for e in range(1, 201):
            plateau = min(0.6, 0.3 + 0.03 * e)  # levels off at 60% by epoch 10
            late = 0.08 * min(1.0, max(0.0, (e - 140) / 40)) if decay else 0.0  # from epoch 140 the decayed trial climbs 8 points
            reports.append({**curve("max", 3, e if e <= EPOCHS else EPOCHS), "epoch": e, "val_acc": plateau + late})
        write_trial(experiment, index, {**seed_params("max", 3), "epochs": 200, "weight_decay": decay}, reports)
    sweep = analysis.load(experiment)
    rises = questions.late_rise(sweep).set_index("weight_decay")
    assert rises["rose_again"].to_dict() == {0.0: False, 1.0: True}
    # 60% from epoch 10: the centred mean of epochs 9-13 is the first within a point of it
    assert rises.loc[0.0, "levelled_at"] == 11 and rises.loc[1.0, "late_best"] == pytest.approx(0.68)
    sentence = questions.grok_sentence(questions.late_rise(sweep))
    assert sentence == ("Grokking (val_acc, 5-epoch centred rolling mean; a rise again is 2 points or more above the best by mid-training): "
                        "1 of 2 long trials rose again after levelling off. weight_decay=0: 60.0% by epoch 11, best after epoch 100 "
                        "60.0% at epoch 101 (+0.0 points); weight_decay=1: 60.0% by epoch 11, best after epoch 100 68.0% at epoch 182 (+8.0 points).")
    assert questions.grok_sentence(questions.late_rise(sweep.where(sweep.frame["epoch"] <= 60))) is None  # no trial ran long


def test_each_settings_cost_in_time_stands_beside_what_it_buys(tmp_path: Path):
    experiment = write_grid(tmp_path / "cost", change=lambda p, w, r: {**r, "epoch_seconds": 2.0 * (1 + (w - 3) / 4) * (1.5 if p == "avg" else 1)})
    sweep = analysis.load(experiment)
    lines = questions.cost_sentences(sweep, analysis.effects(sweep))
    pooling = next(line for line in lines if line.startswith("Cost of pooling"))
    assert pooling == "Cost of pooling max against avg: +0.5 points val_acc, epochs 33% faster (3.0 against 4.5 s)."
    width = next(line for line in lines if line.startswith("Cost of conv_width 7 against 3"))
    assert width.endswith("epochs 100% slower (5.0 against 2.5 s).")
    costs = questions.trial_costs(sweep).set_index(["pooling", "conv_width"])
    assert costs.at[("avg", 7), "seconds"] == pytest.approx(6 * 6.0) and costs.at[("max", 3), "val_acc"] == curve("max", 3, EPOCHS)["val_acc"]


def test_a_cost_from_one_trial_of_each_value_says_its_timing_noise_is_unmeasured(tmp_path: Path):
    """One trial per value gives no spread: a trial that ran while the machine was less busy looks cheaper."""
    experiment = tmp_path / "single"
    for index, decay in enumerate((0.0, 1.0)):
        reports = [{**curve("max", 3, e), "epoch_seconds": 12.0 if decay == 0 else 4.0} for e in range(1, EPOCHS + 1)]
        write_trial(experiment, index, {**seed_params("max", 3), "weight_decay": decay}, reports)
    sweep = analysis.load(experiment)
    (line,) = questions.cost_sentences(sweep, analysis.effects(sweep))
    assert line.startswith("Cost of weight_decay 1 against 0: ") and line.endswith(
        "epochs 67% faster (4.0 against 12.0 s; too few trials to tell it from timing noise).")


def test_without_metadata_or_long_trials_the_questions_say_nothing_they_cannot_answer(tmp_path: Path):
    sweep = analysis.load(write_grid(tmp_path / "plain", metadata={**SEED_METADATA}))
    assert not questions.has_diagnostics(sweep)
    assert questions.late_rise(sweep).empty and questions.grok_sentence(questions.late_rise(sweep)) is None


def test_the_seeds_three_findings_are_each_said_to_be_reproduced_or_not(tmp_path: Path):
    sweep = analysis.load(write_grid(tmp_path / "mini-seed"))  # 5 of 6 overfit, max +0.5, each width step -1 point
    effect_table, diagnosis = analysis.effects(sweep), analysis.diagnose(sweep)
    overfitting, pooling, width = questions.learner_findings(sweep, effect_table, diagnosis)
    assert overfitting == ("Overfitting (training accuracy kept rising while validation loss rose and accuracy stayed flat): reproduced: "
                           "5 of 6 trials overfitted.")  # 6 epochs: too few for a trend over the last third
    row = effect_table.set_index("setting").loc["pooling"]
    assert pooling == (f"Pooling hardly matters: reproduced: max against avg differ by +0.5 points (95% interval {100 * row['low']:+.1f} to "
                       f"{100 * row['high']:+.1f}).")
    widest = effect_table[(effect_table["setting"] == "conv_width") & (effect_table["value_a"] == 3) & (effect_table["value_b"] == 7)].iloc[0]
    assert width == (f"Smaller windows do better: reproduced: conv_width 7 against 3 differ by {100 * widest['difference']:+.1f} points "
                     f"(95% interval {100 * widest['low']:+.1f} to {100 * widest['high']:+.1f}).")
    report = (analysis.write_analysis(tmp_path / "mini-seed") / "report.md").read_text()
    assert "## The seed's findings, checked" in report and f"- {pooling}" in report
    assert questions.learner_findings(analysis.load(tmp_path / "mini-seed").where(sweep.frame["conv_width"] == 3), analysis.effects(
        sweep.where(sweep.frame["conv_width"] == 3)), diagnosis)[1].startswith("Pooling hardly matters: ")
