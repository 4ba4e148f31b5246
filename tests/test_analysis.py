"""The analysis: loading experiment folders (synthetic ones written here and a tiny real Ray Tune sweep),
grouped means against hand computations, diagnosis, effects, plots and report.md."""
from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import statistics
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tune_cnn import analysis
from tune_cnn.analysis import METRICS, AnalysisError
from tune_cnn.analysis.__main__ import main as analysis_main
from tune_cnn.analysis.report import trial_statuses
from tune_cnn.claim import Claim
from tune_cnn.experiment import CHECKPOINT_REPORTS, METADATA_FILE, Metadata, Storage

from conftest import synthetic_splits

POOLINGS, WIDTHS, EPOCHS = ("max", "avg"), (3, 5, 7), 6
NOISE = {("max", 3): 0.004, ("max", 5): -0.003, ("max", 7): 0.0, ("avg", 3): -0.002, ("avg", 5): 0.005, ("avg", 7): -0.001}
SEED_METADATA = {"space": "mini-seed", "search": "grid", "metric": "val_acc", "mode": "max", "swept": ["pooling", "conv_width"],
                 "checkpoint_epochs": [2, 4, 6]}


# --- A synthetic experiment folder in Ray Tune's layout ----------------------------------------------------


def curve(pooling: str, width: int, epoch: int, overfits: bool = True) -> dict[str, float]:
    """Known metrics: validation accuracy falls 2 points per width step, is 0.5 points higher with max
    pooling, plus a fixed per-trial noise; validation loss is lowest at epoch 3 and rises after it (unless
    the trial does not overfit)."""
    val_acc = 0.5 + 0.02 * epoch - 0.01 * (width - 3) + (0.005 if pooling == "max" else 0.0) + NOISE[pooling, width]
    val_loss = 1.0 - 0.1 * epoch if epoch <= 3 or not overfits else 0.7 + 0.1 * (epoch - 3)
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": 0.4 + 0.1 * epoch, "val_loss": val_loss, "val_acc": val_acc,
            "test_loss": val_loss + 0.01, "test_acc": val_acc - 0.01, "epoch_seconds": 2.0, "images_per_second": 500.0, "lr": 0.001}


def write_trial(experiment: Path, index: int, params: dict, reports: list[dict], error: bool = False, made: str = "") -> tuple[Path, str]:
    """One trial folder as Ray writes it, its name ending in the time it was `made` where given; returns the folder
    and the trial id."""
    trial_id = f"abc12_{index:05d}"
    name = f"trainable_{trial_id}_{index}_" + ",".join(f"{k}={v}" for k, v in params.items() if k in ("pooling", "conv_width"))
    name += f"_{made}" if made else ""
    folder = experiment / name
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    lines = [json.dumps({**r, "trial_id": trial_id, "training_iteration": r["epoch"], "done": False, "config": params}) for r in reports]
    (folder / "result.json").write_text("".join(line + "\n" for line in lines))
    if error:
        (folder / "error.txt").write_text("Failure # 1 (occurred at 2026-01-01_00-00-00)\nRuntimeError: boom\n")
    return folder, trial_id


def write_state(experiment: Path, statuses: dict[str, tuple[str, str]], stamp: str = "2026-01-01_00-00-00") -> None:
    """experiment_state-<stamp>.json in Ray's format: trial_data holds [trial json, runtime json] pairs."""
    trial_data = [[json.dumps({"trial_id": trial_id, "status": status, "relative_logdir": folder}), json.dumps({})]
                  for folder, (trial_id, status) in statuses.items()]
    (experiment / f"experiment_state-{stamp}.json").write_text(json.dumps({"trial_data": trial_data, "runner_data": {}}))


def seed_params(pooling: str, width: int) -> dict:
    return {"model": "seed_cnn", "padding": "same", "epochs": EPOCHS, "checkpoint_every": 2, "pooling": pooling, "conv_width": width}


def write_grid(experiment: Path, metadata: dict = SEED_METADATA, change: Callable[[str, int, dict], dict] = lambda p, w, r: r) -> Path:
    """A finished 2 x 3 grid of 6 epochs; the (avg, 7) trial does not overfit. `change(pooling, width, report)`
    may alter each report."""
    statuses = {}
    for index, (pooling, width) in enumerate((p, w) for p in POOLINGS for w in WIDTHS):
        overfits = (pooling, width) != ("avg", 7)
        reports = [change(pooling, width, curve(pooling, width, e, overfits)) for e in range(1, EPOCHS + 1)]
        folder, trial_id = write_trial(experiment, index, seed_params(pooling, width), reports)
        statuses[folder.name] = (trial_id, "TERMINATED")
    write_state(experiment, statuses)
    (experiment / "tune_cnn.json").write_text(json.dumps(metadata))
    return experiment


@pytest.fixture
def seed_experiment(tmp_path: Path) -> Path:
    return write_grid(tmp_path / "mini-seed")


def hand_values(metric: str, epoch: int, pooling: str | None = None, width: int | None = None) -> list[float]:
    return [curve(p, w, epoch, (p, w) != ("avg", 7))[metric] for p in POOLINGS for w in WIDTHS
            if pooling in (None, p) and width in (None, w)]


# --- Loading -----------------------------------------------------------------------------------------------


def test_load_is_tidy_with_every_setting_and_metric(seed_experiment: Path):
    sweep = analysis.load(seed_experiment)
    df = sweep.frame
    assert len(df) == len(POOLINGS) * len(WIDTHS) * EPOCHS
    assert list(df.columns[:3]) == ["trial_id", "status", "epoch"]
    for name in ("pooling", "conv_width", "padding", "batch_norm", "dropout", "weight_decay", "lr", "batch_size", *METRICS):
        assert name in df.columns
    assert df.groupby("trial_id").size().eq(EPOCHS).all()
    assert set(df["status"]) == {"finished"}
    assert sweep.context.swept == ["pooling", "conv_width"] and sweep.context.snapshot_epochs == [2, 4, 6]
    assert sweep.context.incomplete == {}
    row = df[(df["pooling"] == "avg") & (df["conv_width"] == 5) & (df["epoch"] == 4)].iloc[0]
    assert row["val_acc"] == pytest.approx(curve("avg", 5, 4)["val_acc"])
    assert not row["batch_norm"] and row["dropout"] == 0.0  # defaults fill settings the sweep left alone


def test_without_metadata_swept_settings_and_snapshots_are_worked_out(seed_experiment: Path):
    (seed_experiment / "tune_cnn.json").unlink()
    sweep = analysis.load(seed_experiment)
    assert sorted(sweep.context.swept) == ["conv_width", "pooling"]
    assert sweep.context.snapshot_epochs == [2, 4, 6]  # from checkpoint_every 2 and epochs 6


def test_swept_seeds_group_by_replicate_and_each_trial_keeps_the_seed_it_trained_with(tmp_path: Path):
    experiment = tmp_path / "replicates"
    for index, (pooling, seed) in enumerate((p, s) for p in POOLINGS for s in (0, 1, 2)):
        reports = [{**curve(pooling, 3, e), "trial_seed": 1000 + index} for e in range(1, EPOCHS + 1)]  # as tune_cnn.sweep reports
        write_trial(experiment, index, {**seed_params(pooling, 3), "seed": seed}, reports)
    sweep = analysis.load(experiment)
    df = sweep.frame
    per_trial = df.groupby("trial_id")[["seed", "trial_seed"]].first()
    assert sorted(per_trial["seed"]) == [0, 0, 1, 1, 2, 2] and sorted(per_trial["trial_seed"]) == list(range(1000, 1006))
    assert sorted(sweep.context.swept) == ["pooling", "seed"]  # worked out without tune_cnn.json; trial seeds are noise
    table = analysis.summarize(sweep, "seed").set_index(["seed", "epoch"])
    assert table.at[(1, EPOCHS), "val_acc_count"] == 2  # one trial per pooling for each replicate
    assert table.at[(1, EPOCHS), "val_acc_mean"] == pytest.approx(statistics.mean(curve(p, 3, EPOCHS)["val_acc"] for p in POOLINGS))


def test_an_epoch_reported_twice_after_a_restore_appears_once_with_the_latest_report(tmp_path: Path):
    experiment = tmp_path / "restored"
    first = [curve("max", 3, e) for e in (1, 2, 3)]
    again = [{**curve("max", 3, e), "val_acc": 0.9} for e in (3, 4)]  # restored from the epoch-2 checkpoint
    write_trial(experiment, 0, {**seed_params("max", 3), "epochs": 4}, first + again)
    sweep = analysis.load(experiment)
    df = sweep.frame
    assert list(df["epoch"]) == [1, 2, 3, 4]
    assert df.set_index("epoch").at[3, "val_acc"] == 0.9
    assert df["status"].iloc[0] == "finished"


def test_epochs_lost_from_result_json_on_a_retry_come_from_progress_csv(tmp_path: Path):
    experiment = tmp_path / "retried"
    reports = [curve("max", 3, e) for e in (1, 2, 3)] + [{**curve("max", 3, e), "val_acc": 0.9} for e in (3, 4)]
    folder, _ = write_trial(experiment, 0, {**seed_params("max", 3), "epochs": 4}, reports[3:])  # Ray dropped the first lines
    pd.DataFrame(reports).to_csv(folder / "progress.csv", index=False)
    sweep = analysis.load(experiment)
    df = sweep.frame
    assert list(df["epoch"]) == [1, 2, 3, 4]
    assert df["val_acc"].tolist() == pytest.approx([curve("max", 3, 1)["val_acc"], curve("max", 3, 2)["val_acc"], 0.9, 0.9])


def test_what_a_killed_driver_cut_short_comes_from_the_newest_readable_checkpoint(tmp_path: Path):
    experiment = tmp_path / "killed"
    params, reports = {**seed_params("avg", 5), "epochs": 4}, [curve("avg", 5, e) for e in range(1, 5)]
    folder, _ = write_trial(experiment, 0, params, [{**reports[2], "val_acc": 0.9}, reports[3]])  # result.json lost 1-2
    (folder / "params.json").write_text('{"model": "seed_cnn", "pool')
    for index, (saved, text) in enumerate([(1, None), (2, None), (3, '{"params": {"model": "se'), (None, None)], start=1):
        checkpoint = folder / f"checkpoint_{index:06d}"  # the newest, cut short by a kill, and one without reports
        checkpoint.mkdir()
        if saved or text:
            (checkpoint / CHECKPOINT_REPORTS).write_text(text or json.dumps({"params": params, "reports": reports[:saved]}))
    unreadable, _ = write_trial(experiment, 1, seed_params("max", 3), [curve("max", 3, 1)])
    (unreadable / "params.json").write_text("{")
    sweep = analysis.load(experiment)  # the second trial, with nothing to read its settings from, is left out, and said to be
    df = sweep.frame
    assert list(df["epoch"]) == [1, 2, 3, 4] and df["trial_id"].nunique() == 1
    assert sweep.context.incomplete == {unreadable.name: "settings unreadable"}
    assert df["val_acc"].tolist() == pytest.approx([reports[0]["val_acc"], reports[1]["val_acc"], 0.9, reports[3]["val_acc"]])
    assert (df["pooling"] == "avg").all() and (df["conv_width"] == 5).all() and df["status"].iloc[0] == "finished"


def test_a_trial_with_only_a_checkpoint_so_far_loads_from_it(tmp_path: Path):
    # A driver killed early: the trial saved its first checkpoint, with its params and reports, before the driver
    # uploaded the trial's params.json, result.json or progress.csv.
    experiment = tmp_path / "killed-early"
    params = {**seed_params("avg", 5), "epochs": 4}
    checkpoint = experiment / "trainable_abc12_00000_0" / "checkpoint_000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / CHECKPOINT_REPORTS).write_text(json.dumps({"params": params, "reports": [curve("avg", 5, 1)]}))
    write_state(experiment, {"trainable_abc12_00000_0": ("abc12_00000", "RUNNING"), "trainable_abc12_00001_1": ("abc12_00001", "PENDING")})
    sweep = analysis.load(experiment)
    df = sweep.frame
    assert df[["trial_id", "epoch", "pooling", "conv_width"]].values.tolist() == [["abc12_00000", 1, "avg", 5]]
    assert df["val_acc"].tolist() == [curve("avg", 5, 1)["val_acc"]]
    assert sweep.context.incomplete == {"abc12_00000": "interrupted", "abc12_00001": "not started"}
    (experiment / "tune_cnn.json").write_text(json.dumps(SEED_METADATA))  # swept pooling, conv_width
    for checkpoint in experiment.glob("*/checkpoint_*"):
        shutil.rmtree(checkpoint)
    analysis_main([str(experiment)])  # no trial has reported yet: a report that says so
    assert "No trial has reported a result yet." in (experiment / "analysis" / "report.md").read_text()


def test_an_interrupted_sweep_loads_with_each_trials_status(tmp_path: Path):
    experiment = tmp_path / "interrupted"
    plans = {  # (epochs reported, Ray's status, error.txt)
        "finished": (6, "TERMINATED", False),
        "recovered": (6, "TERMINATED", True),  # failed once, retried from its checkpoint: error.txt stays behind
        "stopped": (2, "TERMINATED", False),  # stopped by ASHA
        "errored": (3, "ERROR", True),
        "running": (4, "RUNNING", False),
        "retrying": (3, "RUNNING", True),
    }
    statuses, ids = {}, {}
    for index, (label, (reported, state, error)) in enumerate(plans.items()):
        folder, ids[label] = write_trial(experiment, index, seed_params("max", 3), [curve("max", 3, e) for e in range(1, reported + 1)], error)
        statuses[folder.name] = (ids[label], state)
    statuses["trainable_abc12_00098_98"] = ("abc12_00098", "ERROR")  # its worker failed before writing params.json
    statuses["trainable_abc12_00099_99"] = ("abc12_00099", "PENDING")  # queued: no folder yet
    write_state(experiment, {"old": ("x", "RUNNING")}, stamp="2025-12-31_00-00-00")  # an older session's state
    write_state(experiment, statuses)
    for driver_runs, unended in ((False, "interrupted"), (True, "running")):
        with Claim(Storage.open(experiment)).take() if driver_runs else nullcontext():
            sweep = analysis.load(experiment)
        df = sweep.frame
        status = df.groupby("trial_id")["status"].first()
        expected = {"finished": "finished", "recovered": "finished", "stopped": "stopped early", "errored": "errored",
                    "running": unended, "retrying": unended}
        assert {label: status[ids[label]] for label in plans} == expected
        assert sweep.context.incomplete == {ids["stopped"]: "stopped early", ids["errored"]: "errored", ids["running"]: unended,
                                          ids["retrying"]: unended, "abc12_00098": "errored", "abc12_00099": "not started"}
        assert len(df) == sum(reported for reported, _, _ in plans.values())


def test_a_trial_that_stopped_itself_on_a_loss_that_is_not_a_number_reads_as_diverged(tmp_path: Path):
    experiment = tmp_path / "diverging"
    reports = [curve("max", 3, 1), {**curve("max", 3, 2), "train_loss": float("nan"), "val_loss": float("nan")}]
    folder, diverging = write_trial(experiment, 0, seed_params("max", 3), reports)
    write_state(experiment, {folder.name: (diverging, "TERMINATED")})
    sweep = analysis.load(experiment)
    assert sweep.frame["status"].unique().tolist() == ["diverged"] and sweep.context.incomplete == {diverging: "diverged"}


def test_the_report_counts_every_trial_of_the_space_started_or_not(tmp_path: Path):
    """An interrupted 4-trial grid whose driver died: two trials finished, one was cut short, one never started."""
    experiment = tmp_path / "interrupted-grid"
    for index, (pooling, epochs) in enumerate((("max", EPOCHS), ("avg", EPOCHS), ("max", 1))):
        write_trial(experiment, index, seed_params(pooling, 3), [curve(pooling, 3, e) for e in range(1, epochs + 1)])
    (experiment / METADATA_FILE).write_text(Metadata(swept=["pooling", "conv_width"], epochs=EPOCHS, trials=4).to_json())
    sweep = analysis.load(experiment)
    assert sweep.context.space_trials == 4
    assert trial_statuses(sweep).to_dict() == {"finished": 2, "interrupted": 1, "not started": 1}
    analysis_main([str(experiment)])
    assert "4 trials: 2 finished, 1 interrupted, 1 not started." in (experiment / "analysis" / "report.md").read_text()


def test_a_trial_a_killed_driver_never_saved_is_lost_once_the_sweep_resumes(tmp_path: Path):
    # The driver made the second trial after its last save, then was killed; the resumed driver does not know it.
    experiment = tmp_path / "resumed"
    saved, saved_id = write_trial(experiment, 0, seed_params("max", 3), [curve("max", 3, e) for e in (1, 2)], made="2026-01-01_00-00-00")
    unsaved, unsaved_id = write_trial(experiment, 1, seed_params("avg", 3), [curve("avg", 3, 1)], made="2026-01-01_00-00-09")
    write_state(experiment, {saved.name: (saved_id, "RUNNING")}, stamp="2026-01-01_00-00-00")
    before_the_resume = analysis.load(experiment)
    assert before_the_resume.context.incomplete == {saved_id: "interrupted", unsaved_id: "interrupted"}

    write_state(experiment, {saved.name: (saved_id, "RUNNING")}, stamp="2026-01-01_00-01-00")  # the resumed driver's
    _, new_id = write_trial(experiment, 2, seed_params("avg", 5), [curve("avg", 5, 1)], made="2026-01-01_00-01-00")  # not saved yet
    sweep = analysis.load(experiment)
    df = sweep.frame
    assert df.groupby("trial_id")["epoch"].max().to_dict() == {saved_id: 2, new_id: 1}
    assert sweep.context.incomplete == {saved_id: "interrupted", new_id: "interrupted", unsaved_id: "lost when its driver was killed, not resumed"}


def test_without_rays_state_an_error_file_means_errored(tmp_path: Path):
    experiment = tmp_path / "no-state"
    _, errored = write_trial(experiment, 0, seed_params("max", 3), [curve("max", 3, 1)], error=True)
    folder, interrupted = write_trial(experiment, 1, seed_params("avg", 3), [curve("avg", 3, 1)])
    with (folder / "result.json").open("a") as result:
        result.write('{"epoch": 2, "val_')
    sweep = analysis.load(experiment)
    df = sweep.frame
    assert df.groupby("trial_id")["status"].first().to_dict() == {errored: "errored", interrupted: "interrupted"}
    assert len(df) == 2  # the half-written last line of a killed driver is skipped


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p, lambda p: (p / "file.txt").write_text("x") and p / "file.txt"])
def test_a_path_that_is_not_an_experiment_folder_is_a_one_line_error(tmp_path: Path, make):
    (tmp_path / "some_folder").mkdir()
    with pytest.raises(AnalysisError) as error:
        analysis.load(make(tmp_path))
    assert "\n" not in str(error.value) and "experiment folder" in str(error.value)


def test_the_command_line_reports_a_bad_path_in_one_line_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_:
        analysis_main([str(tmp_path / "nowhere")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("uri, says", [("foo://x/quick", "Unrecognized filesystem type"), ("s3://no-such-bucket/x", "cannot reach")])
def test_a_location_that_cannot_be_opened_is_one_line_with_exit_code_2(uri: str, says: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_:  # offline, s3 fails resolving the bucket's region; online, listing it
        analysis_main([uri])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err and uri in err


def test_a_file_uri_reads_like_a_local_path(seed_experiment: Path):
    sweep = analysis.load(seed_experiment.as_uri())
    df = sweep.frame
    assert len(df) == len(POOLINGS) * len(WIDTHS) * EPOCHS
    folder = analysis.write_analysis(seed_experiment.as_uri())
    assert folder == seed_experiment.as_uri() + "/analysis"
    assert (seed_experiment / "analysis" / "report.md").exists()


# --- Grouped views -----------------------------------------------------------------------------------------


def test_grouped_means_equal_a_hand_computation(seed_experiment: Path):
    sweep = analysis.load(seed_experiment)
    table = analysis.summarize(sweep, "pooling").set_index(["pooling", "epoch"])
    assert len(table) == len(POOLINGS) * 3  # every pooling at each snapshot epoch 2, 4, 6
    for pooling in POOLINGS:
        for epoch in (2, 4, 6):
            values = hand_values("val_acc", epoch, pooling=pooling)
            row = table.loc[(pooling, epoch)]
            assert row["val_acc_mean"] == pytest.approx(statistics.mean(values))
            assert row["val_acc_std"] == pytest.approx(statistics.stdev(values))
            assert (row["val_acc_count"], row["val_acc_min"], row["val_acc_max"]) == (3, pytest.approx(min(values)), pytest.approx(max(values)))
    by_epoch = analysis.summarize(sweep, "epoch", metrics=["val_loss"]).set_index("epoch")
    assert list(by_epoch.index) == [2, 4, 6]
    assert by_epoch.at[6, "val_loss_mean"] == pytest.approx(statistics.mean(hand_values("val_loss", 6)))
    both = analysis.summarize(sweep, ["pooling", "conv_width"], at_epochs=[5]).set_index(["pooling", "conv_width", "epoch"])
    assert both.at[("max", 7, 5), "train_acc_mean"] == pytest.approx(0.9) and both.at[("max", 7, 5), "train_acc_count"] == 1


def test_summaries_at_each_trials_last_and_best_epoch(seed_experiment: Path):
    sweep = analysis.load(seed_experiment)
    last = analysis.summarize(sweep, "conv_width", at="last", metrics=["val_acc"]).set_index("conv_width")
    assert last.at[7, "val_acc_mean"] == pytest.approx(statistics.mean(hand_values("val_acc", EPOCHS, width=7)))
    assert "epoch" not in last.columns
    best = analysis.select_rows(sweep, "best")
    assert len(best) == 6 and set(best["epoch"]) == {EPOCHS}  # val_acc rises every epoch in the synthetic curves
    with pytest.raises(AnalysisError, match="epoch"):
        analysis.summarize(sweep, "pooling", at_epochs=[50])
    with pytest.raises(AnalysisError, match="colour"):
        analysis.summarize(sweep, "colour")


def test_diagnosis_finds_the_best_epoch_the_gap_and_overfitting(seed_experiment: Path):
    diagnosis = analysis.diagnose(analysis.load(seed_experiment)).set_index(["pooling", "conv_width"])
    assert set(diagnosis.drop(("avg", 7))["best_epoch"]) == {3} and diagnosis.at[("avg", 7), "best_epoch"] == EPOCHS
    assert diagnosis.at[("avg", 7), "overfitting"] == False  # noqa: E712 (a numpy bool)
    assert diagnosis["overfitting"].sum() == 5
    gap = curve("max", 5, 4)["train_acc"] - curve("max", 5, 4)["val_acc"]
    assert diagnosis.at[("max", 5), "gap_at_4"] == pytest.approx(gap)


def test_t_critical_values_match_the_tables():
    for df, table in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert analysis.t_critical(df) == pytest.approx(table, abs=2e-3)


def test_effects_and_importance_match_a_hand_computation(seed_experiment: Path):
    sweep = analysis.load(seed_experiment)
    table = analysis.effects(sweep).set_index(["setting", "value_a", "value_b"])
    assert len(table) == 1 + 3  # pooling: one pair; conv_width: three pairs
    cells = {(p, w): curve(p, w, EPOCHS)["val_acc"] for p in POOLINGS for w in WIDTHS}  # best epoch = last
    row_mean = {p: statistics.mean(cells[p, w] for w in WIDTHS) for p in POOLINGS}
    column_mean = {w: statistics.mean(cells[p, w] for p in POOLINGS) for w in WIDTHS}
    grand = statistics.mean(cells.values())
    # Two-way layout, one trial per cell: the noise is what is left after both main effects, on 2 df.
    noise = math.sqrt(sum((y - row_mean[p] - column_mean[w] + grand) ** 2 for (p, w), y in cells.items()) / 2)
    pooling = table.loc[("pooling", "avg", "max")]
    assert pooling["difference"] == pytest.approx(row_mean["max"] - row_mean["avg"])
    assert pooling["high"] - pooling["difference"] == pytest.approx(4.303 * noise * math.sqrt(1 / 3 + 1 / 3), rel=1e-3)
    assert pooling["within_noise"]
    widths = table.loc[("conv_width", 3, 7)]
    assert widths["difference"] == pytest.approx(column_mean[7] - column_mean[3])
    assert widths["high"] - widths["difference"] == pytest.approx(4.303 * noise, rel=1e-3)
    assert not widths["within_noise"]
    ranking = analysis.importance(sweep).set_index("setting")
    assert list(ranking.index) == ["conv_width", "pooling"] and list(ranking["rank"]) == [1, 2]
    total = sum((y - grand) ** 2 for y in cells.values())
    assert ranking.at["pooling", "variance_share"] == pytest.approx(3 * sum((m - grand) ** 2 for m in row_mean.values()) / total)


def test_a_continuous_setting_is_split_at_its_median(tmp_path: Path):
    experiment = tmp_path / "optuna"
    rates = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2]
    for index, lr in enumerate(rates):
        write_trial(experiment, index, {"epochs": 1, "lr": lr}, [{**curve("max", 3, 1), "val_acc": 0.5 + index / 100}])
    table = analysis.effects(analysis.load(experiment), ["lr"])
    assert len(table) == 1
    assert (table.at[0, "n_a"], table.at[0, "n_b"]) == (4, 4)
    assert table.at[0, "difference"] == pytest.approx(0.04)


def test_a_setting_drawn_from_a_distribution_is_split_at_its_median_however_few_trials(tmp_path: Path):
    experiment = tmp_path / "optuna"
    for index, lr in enumerate([3e-4, 1e-3, 2e-3, 7e-3]):
        write_trial(experiment, index, {"epochs": 1, "lr": lr}, [{**curve("max", 3, 1), "val_acc": 0.5 + index / 100}])
    (experiment / "tune_cnn.json").write_text(json.dumps({"swept": ["lr"], "sampled": ["lr"], "checkpoint_epochs": [1]}))
    table = analysis.effects(analysis.load(experiment))
    assert table[["value_a", "value_b", "n_a", "n_b"]].values.tolist() == [["<= 0.0015", "> 0.0015", 2, 2]]


def test_an_unbalanced_sweeps_difference_is_said_to_hold_the_other_settings_equal(tmp_path: Path):
    experiment = tmp_path / "interrupted"
    for index, (pooling, width) in enumerate([("max", 3), ("max", 5), ("avg", 3), ("avg", 5), ("max", 7)]):
        write_trial(experiment, index, seed_params(pooling, width), [curve(pooling, width, e) for e in range(1, EPOCHS + 1)])
    sweep = analysis.load(experiment)
    effect_table = analysis.effects(sweep, ["pooling", "conv_width"])
    lines = analysis.findings(sweep, effect_table, analysis.importance(sweep, ["pooling", "conv_width"]), analysis.diagnose(sweep))
    pooling = next(line for line in lines if line.startswith("pooling:"))
    row = effect_table.set_index("setting").loc["pooling"]
    assert row["difference"] != pytest.approx(row["mean_b"] - row["mean_a"])  # (max, 7) pulls max's mean down
    assert pooling.startswith(f"pooling: max vs avg differ by {row['difference'] * 100:+.1f} points with the other settings held equal (")


def test_a_setting_confounded_with_another_gets_its_raw_difference_and_no_interval(tmp_path: Path):
    experiment = tmp_path / "confounded"  # batch norm was on exactly where pooling was avg: no trial tells them apart
    for index, (pooling, width) in enumerate((p, w) for p in POOLINGS for w in WIDTHS):
        params = {**seed_params(pooling, width), "batch_norm": pooling == "avg"}
        write_trial(experiment, index, params, [curve(pooling, width, e) for e in range(1, EPOCHS + 1)])
    sweep = analysis.load(experiment)
    effect_table = analysis.effects(sweep, ["pooling", "batch_norm", "conv_width"])
    table = effect_table.set_index("setting")
    for name in ("pooling", "batch_norm"):
        row = table.loc[name]
        assert not row["separable"] and row["difference"] == pytest.approx(row["mean_b"] - row["mean_a"])
        assert math.isnan(row["low"]) and math.isnan(row["high"]) and row["within_noise"] is None
    widths = table.loc["conv_width"]
    assert widths["separable"].all() and np.isfinite(widths[["low", "high"]].to_numpy(float)).all()
    lines = analysis.findings(sweep, effect_table, analysis.importance(sweep, ["pooling"]), analysis.diagnose(sweep))
    pooling = next(line for line in lines if line.startswith("pooling:"))
    assert pooling.startswith(f"pooling: max vs avg differ by {table.at['pooling', 'difference'] * 100:+.1f} points in their means (")
    assert "cannot separate" in pooling and "held equal" not in pooling and "interval" not in pooling


def test_with_fewer_trials_than_the_model_has_values_only_separable_differences_are_estimated(tmp_path: Path):
    experiment = tmp_path / "three"  # the reviewer's case: optuna's first trials, each differing in several settings
    for index, (pooling, width) in enumerate([("max", 3), ("avg", 5), ("max", 7)]):
        write_trial(experiment, index, seed_params(pooling, width), [curve(pooling, width, e) for e in range(1, EPOCHS + 1)])
    table = analysis.effects(analysis.load(experiment), ["pooling", "conv_width"])
    separable = {(r.setting, r.value_a, r.value_b): r.separable for r in table.itertuples()}
    # avg only ever ran with width 5: only 3 vs 7, both with max pooling, is a difference with the rest held equal
    assert separable == {("pooling", "avg", "max"): False, ("conv_width", 3, 5): False, ("conv_width", 3, 7): True,
                         ("conv_width", 5, 7): False}
    widths = table.set_index(["value_a", "value_b"]).loc[(3, 7)]
    assert widths["difference"] == pytest.approx(curve("max", 7, EPOCHS)["val_acc"] - curve("max", 3, EPOCHS)["val_acc"])
    assert (table["difference"] == table["mean_b"] - table["mean_a"])[~table["separable"]].all()


def test_a_setting_named_twice_counts_once(seed_experiment: Path, tmp_path: Path):
    sweep = analysis.load(seed_experiment)
    pd.testing.assert_frame_equal(analysis.effects(sweep, ["pooling", "pooling"]), analysis.effects(sweep, ["pooling"]))
    assert analysis.importance(sweep, ["pooling", "pooling"])["setting"].tolist() == ["pooling"]
    analysis_main([str(seed_experiment), "--by", "pooling", "pooling", "--out", str(tmp_path / "out")])
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.count("### By pooling") == 1 and report.count("- pooling: max vs avg differ by +0.5 points (") == 1


def test_a_val_loss_sweep_ranks_explains_and_reports_val_loss(tmp_path: Path):
    experiment = write_grid(tmp_path / "by-loss", {**SEED_METADATA, "metric": "val_loss", "mode": "min"})
    sweep = analysis.load(experiment)
    # Each trial's lowest val_loss: 0.7 at epoch 3, but 0.4 at epoch 6 for (avg, 7), which does not overfit.
    ranking = analysis.importance(sweep).set_index("setting")["variance_share"]
    assert ranking.to_dict() == {"conv_width": pytest.approx(0.4), "pooling": pytest.approx(0.2)}  # on val_acc: 0.95 and 0.01
    pooling = analysis.effects(sweep).set_index("setting").loc["pooling"]
    assert (pooling["mean_b"], pooling["mean_a"], pooling["difference"]) == (pytest.approx(0.7), pytest.approx(0.6), pytest.approx(0.1))
    report = (analysis.write_analysis(experiment) / "report.md").read_text()
    best = analysis.best_trials(sweep).iloc[0]
    assert f"Best trial: **{best['trial_id']}** (pooling=avg, conv_width=7): val_loss 0.4 at epoch 6." in report
    assert "Importance (share of the variance in val_loss across trials each setting explains alone): conv_width 40.0%, pooling 20.0%." in report
    assert "- pooling: max vs avg differ by +0.1 (0.7 vs 0.6 mean val_loss, 3 and 3 trials), within noise (95% interval " in report


def test_a_swept_seed_is_replication_not_a_setting(tmp_path: Path):
    experiment = tmp_path / "replicates"
    for index, (pooling, seed) in enumerate((p, s) for p in POOLINGS for s in (0, 1, 2)):
        reports = [{**curve(pooling, 3, e), "val_acc": curve(pooling, 3, e)["val_acc"] + 0.02 * (seed - 1)} for e in range(1, EPOCHS + 1)]
        write_trial(experiment, index, {**seed_params(pooling, 3), "seed": seed}, reports)
    (experiment / "tune_cnn.json").write_text(json.dumps({**SEED_METADATA, "swept": ["pooling", "seed"]}))
    sweep = analysis.load(experiment)
    effect_table = analysis.effects(sweep)
    assert effect_table["setting"].tolist() == ["pooling"] and analysis.importance(sweep)["setting"].tolist() == ["pooling"]
    # The replicates' spread is the noise: +-0.02 around each pooling's mean, on 6 - 2 degrees of freedom.
    row = effect_table.iloc[0]
    assert row["difference"] == pytest.approx(curve("max", 3, EPOCHS)["val_acc"] - curve("avg", 3, EPOCHS)["val_acc"])
    assert row["high"] - row["difference"] == pytest.approx(2.776 * math.sqrt(4 * 0.02 ** 2 / 4) * math.sqrt(2 / 3), rel=1e-3)
    folder = analysis.write_analysis(experiment)
    report = (folder / "report.md").read_text()
    assert "- seed:" not in report and "### By seed" not in report and "seed 0.0%" not in report and not (folder / "summary_seed.csv").exists()
    assert "seed (0, 1, 2) repeats each combination" in report
    assert sorted(pd.read_csv(folder / "trials.csv")["seed"]) == [0, 0, 1, 1, 2, 2]  # per trial, seed stays


# --- Exports, plots and report -----------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()


def test_write_analysis_writes_tables_plots_and_a_report(seed_experiment: Path):
    folder = analysis.write_analysis(seed_experiment)
    assert folder == seed_experiment / "analysis"
    results = pd.read_csv(folder / "results.csv")
    assert len(results) == 36 and list(results.columns[:3]) == ["trial_id", "status", "epoch"]
    assert pd.read_parquet(folder / "results.parquet")["val_acc"].tolist() == pytest.approx(results["val_acc"].tolist())
    by_width = pd.read_csv(folder / "summary_conv_width.csv").set_index(["conv_width", "epoch"])
    assert by_width.at[(5, 4), "val_acc_mean"] == pytest.approx(statistics.mean(hand_values("val_acc", 4, width=5)))
    assert (folder / "summary_pooling.csv").exists() and (folder / "summary_epoch.csv").exists()
    for name in ("learning_curves", "by_pooling", "by_conv_width", "by_epoch", "effects"):
        assert_png(folder / f"{name}.png")
    report = (folder / "report.md").read_text()
    best = analysis.best_trials(analysis.load(seed_experiment)).iloc[0]
    assert (best["pooling"], best["conv_width"]) == ("max", 3)
    assert f"Best trial: **{best['trial_id']}**" in report
    for setting in ("pooling", "conv_width"):
        assert f"### By {setting}" in report and f"]({'by_' + setting}.png)" in report
    assert "pooling: max vs avg differ by +0.5 points (" in report and "within noise" in report  # balanced: the means' difference
    assert report.startswith("# Analysis of mini-seed\n")
    analysis_main([str(seed_experiment), "--by", "pooling"])  # a regrouping replaces the earlier groupings' files
    assert sorted(p.name for p in folder.glob("summary_*")) == ["summary_epoch.csv", "summary_pooling.csv"]
    assert sorted(p.name for p in folder.glob("by_*")) == ["by_epoch.png", "by_pooling.png"]
    assert "Overfitting: 5 of 6 trials" in report and "lowest at epoch 3.5 on average" in report


DIVERGED = ("avg", 5)


def diverge(how: str) -> Callable[[str, int, dict], dict]:
    """A change for write_grid: the (avg, 5) trial diverged, as SGD with lr 50 does. Its loss becomes NaN (or
    infinite) and, its outputs NaN, it predicts one class: accuracy at chance (or NaN)."""
    def change(pooling: str, width: int, report: dict) -> dict:
        if (pooling, width) != DIVERGED or (how == "inf from epoch 3" and report["epoch"] < 3):
            return report
        loss, accuracy = (math.inf if how == "inf from epoch 3" else math.nan), (math.nan if how == "nan accuracy" else 0.1)
        return {**report, **{f"{split}_loss": loss for split in ("train", "val", "test")},
                **{f"{split}_acc": accuracy for split in ("train", "val", "test")}}
    return change


@pytest.mark.parametrize("metric, how", [("val_acc", "nan loss"), ("val_loss", "nan accuracy"), ("val_loss", "inf from epoch 3")])
def test_a_diverged_trial_is_reported_and_the_whole_analysis_is_written(tmp_path: Path, metric: str, how: str):
    metadata = {**SEED_METADATA, "metric": metric, "mode": "max" if metric == "val_acc" else "min"}
    experiment = write_grid(tmp_path / "diverged", metadata, diverge(how))
    analysis_main([str(experiment)])
    folder = experiment / "analysis"
    for name in ("learning_curves", "by_pooling", "by_conv_width", "by_epoch", "effects"):
        assert_png(folder / f"{name}.png")
    sweep = analysis.load(experiment)
    df = sweep.frame
    diverged = df.loc[(df["pooling"] == DIVERGED[0]) & (df["conv_width"] == DIVERGED[1]), "trial_id"].iloc[0]
    diagnosis = pd.read_csv(folder / "trials.csv").set_index("trial_id")
    assert diagnosis["diverged"].to_dict() == {t: t == diverged for t in diagnosis.index}
    best_epoch = diagnosis.at[diverged, "best_epoch"]  # none where val_loss never was a number
    assert best_epoch == 2 if how == "inf from epoch 3" else math.isnan(best_epoch)
    report = (folder / "report.md").read_text()
    assert f"- Diverged (validation loss NaN or infinite at the last epoch): {diverged}." in report
    best = analysis.best_trials(sweep)
    assert best["trial_id"].iloc[0] != diverged and np.isfinite(best[metric]).all()
    assert f"Best trial: **{best['trial_id'].iloc[0]}**" in report
    values = analysis.trial_values(sweep, metric)
    # Its best epoch by a metric that is never a number does not exist: only then is the trial left out.
    assert (diverged in values.index) == (how != "nan accuracy") and np.isfinite(values[metric]).all()
    assert np.isfinite(pd.read_csv(folder / "effects.csv")[["difference", "low", "high"]].to_numpy()).all()
    assert np.isfinite(pd.read_csv(folder / "importance.csv")["variance_share"]).all()


def test_when_every_trial_diverged_the_report_says_so(tmp_path: Path):
    metadata = {**SEED_METADATA, "metric": "val_loss", "mode": "min"}
    experiment = write_grid(tmp_path / "all-diverged", metadata, lambda p, w, report: {**report, "val_loss": math.nan, "val_acc": 0.1})
    analysis_main([str(experiment)])
    report = (experiment / "analysis" / "report.md").read_text()
    assert "No trial has a val_loss that is a number: there are no best trials, effects or importance." in report
    assert "Diverged (validation loss NaN or infinite at the last epoch): " in report and "lowest at epoch" not in report
    assert not (experiment / "analysis" / "effects.png").exists()
    assert_png(experiment / "analysis" / "learning_curves.png")


def test_a_rerun_replaces_every_file_an_earlier_analysis_wrote_and_keeps_the_rest(seed_experiment: Path, tmp_path: Path):
    out = tmp_path / "out"
    analysis.write_analysis(seed_experiment, out=out)
    (out / "notes.md").write_text("mine")
    single = tmp_path / "single"  # nothing swept: no groupings but by epoch, no effects plot
    write_trial(single, 0, {**seed_params("max", 3), "epochs": 2}, [curve("max", 3, e) for e in (1, 2)])
    analysis.write_analysis(single, out=out)
    assert sorted(p.name for p in out.iterdir()) == ["by_epoch.png", "effects.csv", "importance.csv", "learning_curves.png", "notes.md",
                                                     "report.md", "results.csv", "results.parquet", "summary_epoch.csv", "trials.csv"]


def test_by_changes_the_groupings_not_the_effects_or_importance(seed_experiment: Path, tmp_path: Path):
    whole = analysis.write_analysis(seed_experiment, out=tmp_path / "whole")
    grouped = analysis.write_analysis(seed_experiment, out=tmp_path / "by", by=["conv_width"])
    for name in ("effects.csv", "importance.csv"):
        assert (grouped / name).read_text() == (whole / name).read_text()
    assert not (grouped / "summary_pooling.csv").exists() and (grouped / "summary_conv_width.csv").exists()


def test_one_trial_reads_as_one_without_a_spread(tmp_path: Path):
    experiment = tmp_path / "single"
    write_trial(experiment, 0, {**seed_params("max", 3), "epochs": 2}, [curve("max", 3, e) for e in (1, 2)])
    report = (analysis.write_analysis(experiment) / "report.md").read_text()
    assert "1 trial: 1 finished." in report
    assert "| 2 | 1 | 60.0% | 54.9% | 0.800 |" in report and "±" not in report  # the spread of one value is undefined


def test_the_analysis_goes_to_an_out_uri(seed_experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    out = (tmp_path / "elsewhere").as_uri()
    analysis_main([str(seed_experiment), "--out", out])
    assert capsys.readouterr().out.strip() == f"analysis: {out}"
    assert_png(tmp_path / "elsewhere" / "effects.png")
    with pytest.raises(SystemExit) as exit_:
        analysis_main([str(seed_experiment), "--out", "s3://no-such-bucket/x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: cannot reach s3://no-such-bucket/x") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "mini-seed"]  # not a folder named s3: here


def test_each_plot_has_its_panels(seed_experiment: Path):
    sweep = analysis.load(seed_experiment)
    df = sweep.frame
    curves = analysis.plot_learning_curves(sweep.where(df["epoch"] <= 3), "pooling")
    assert len(curves.axes) == 3
    curves.canvas.draw()
    assert all(tick == int(tick) for ax in curves.axes for tick in ax.get_xticks())  # epochs 1-3: no tick at 1.5
    assert len(analysis.plot_grouped(sweep, "conv_width").axes) == 3
    assert len(analysis.plot_grouped(sweep, "epoch").axes) == 3
    assert len(analysis.plot_effects(analysis.effects(sweep), analysis.importance(sweep)).axes) == 2


def test_plots_drawn_by_other_processes_are_those_drawn_here(seed_experiment: Path, tmp_path: Path):
    here = analysis.write_analysis(seed_experiment, out=tmp_path / "here")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as plotters:
        there = analysis.write_analysis(seed_experiment, out=tmp_path / "there", plotters=plotters)
    assert sorted(p.name for p in here.iterdir()) == sorted(p.name for p in there.iterdir())
    assert (there / "report.md").read_text() == (here / "report.md").read_text()
    pngs = sorted(here.glob("*.png"))
    assert len(pngs) == 6 and all((there / png.name).read_bytes() == png.read_bytes() for png in pngs)


def refuse_to_start() -> None:
    raise RuntimeError("this process cannot draw")


def test_plots_are_drawn_here_when_the_plotting_processes_have_died(seed_experiment: Path, tmp_path: Path):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=refuse_to_start) as broken:
        folder = analysis.write_analysis(seed_experiment, out=tmp_path / "analysis", plotters=broken)
    for name in ("learning_curves", "by_pooling", "by_conv_width", "by_epoch", "effects"):
        assert_png(folder / f"{name}.png")


def test_the_command_line_writes_where_asked_and_warns_about_incomplete_trials(tmp_path: Path, capsys: pytest.CaptureFixture):
    experiment = tmp_path / "partial"
    for index, pooling in enumerate(POOLINGS):
        write_trial(experiment, index, seed_params(pooling, 3), [curve(pooling, 3, e) for e in range(1, 5 - 2 * index)])
    analysis_main([str(experiment), "--by", "pooling", "--epochs", "1", "2", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert out.strip() == f"analysis: {tmp_path / 'out'}"
    assert err.startswith("warning: 2 trial(s) incomplete") and "interrupted" in err
    summary = pd.read_csv(tmp_path / "out" / "summary_pooling.csv")
    assert sorted(summary["epoch"].unique()) == [1, 2] and len(summary) == 4
    assert "**Incomplete trials:**" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("by", ["trial_id", "val_acc", "status", "epoch"])
def test_grouping_by_what_is_not_a_setting_is_one_line_and_writes_nothing(seed_experiment: Path, tmp_path: Path, by: str,
                                                                         capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as stop:
        analysis_main([str(seed_experiment), "--by", by, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"error: cannot group by {by}: not a setting; choose from: ") and err.count("\n") == 1
    assert "pooling" in err and not (tmp_path / "out").exists()
    assert ("summary_epoch.csv" in err) == (by == "epoch")


# --- A tiny real Ray Tune sweep ----------------------------------------------------------------------------


def failing_trainable(params: dict, data, marker_folder: str) -> None:
    """Train for real; (max, 5) fails after epoch 3 every time, (avg, 5) once, so Ray retries from the
    epoch-2 checkpoint and epoch 3 is reported twice."""
    import torch
    from ray import tune

    from tune_cnn.config import TrainConfig
    from tune_cnn.train import load_checkpoint, train

    torch.set_num_threads(1)
    resume = None
    if tune.get_checkpoint() is not None:
        with tune.get_checkpoint().as_directory() as folder:
            resume = load_checkpoint(Path(folder))
    marker = Path(marker_folder) / f"failed_{params['pooling']}_{params['conv_width']}"

    def report(metrics: dict, folder: Path | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)
        if params["conv_width"] == 5 and metrics["epoch"] == 3 and (params["pooling"] == "max" or not marker.exists()):
            marker.touch()
            raise RuntimeError("injected failure")

    train(TrainConfig.from_flat(params), data, report, resume)


@pytest.fixture(scope="module")
def real_experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import ray
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner

    storage = tmp_path_factory.mktemp("ray")
    # Ray's workers cannot import a test module: send the trainable's code along with it.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        trainable = tune.with_parameters(failing_trainable, data=synthetic_splits(train=120, val=60, test=60), marker_folder=str(storage))
        Tuner(
            trainable,
            param_space={"pooling": tune.grid_search(list(POOLINGS)), "conv_width": tune.grid_search([3, 5]), "padding": "same",
                         "epochs": 4, "checkpoint_every": 2, "batch_size": 32, "lr": 0.003},
            tune_config=TuneConfig(metric="val_acc", mode="max"),
            run_config=RunConfig(name="tiny", storage_path=str(storage), verbose=0, failure_config=FailureConfig(max_failures=1),
                                 checkpoint_config=CheckpointConfig(num_to_keep=None)),
        ).fit()
    finally:
        ray.shutdown()
    return storage / "tiny"


def test_a_real_sweep_loads_with_retries_errors_and_duplicates_resolved(real_experiment: Path):
    sweep = analysis.load(real_experiment)
    df = sweep.frame
    status = df.groupby(["pooling", "conv_width"])["status"].first().to_dict()
    assert status == {("max", 3): "finished", ("max", 5): "errored", ("avg", 3): "finished", ("avg", 5): "finished"}
    epochs = df.groupby(["pooling", "conv_width"])["epoch"].apply(list).to_dict()
    assert epochs[("max", 5)] == [1, 2, 3] and epochs[("avg", 5)] == [1, 2, 3, 4]
    assert len(df) == 15 and not df.duplicated(["trial_id", "epoch"]).any()
    retried = next(p for p in real_experiment.iterdir() if "conv_width=5,pooling=avg" in p.name)
    reports = pd.read_csv(retried / "progress.csv")  # Ray's retry can drop lines of result.json, but not of both
    assert reports["epoch"].tolist() == [1, 2, 3, 3, 4] or sum(1 for _ in (retried / "result.json").open()) == 5
    retry = [json.loads(line) for line in (retried / "result.json").read_text().splitlines()][-2]
    row = df[(df["pooling"] == "avg") & (df["conv_width"] == 5) & (df["epoch"] == 3)].iloc[0]
    assert retry["epoch"] == 3 and row["epoch_seconds"] == retry["epoch_seconds"]  # the retry's report, not the first one
    assert sorted(sweep.context.swept) == ["conv_width", "pooling"] and sweep.context.snapshot_epochs == [2, 4]
    assert list(sweep.context.incomplete.values()) == ["errored"]
    always = [m for m in METRICS if not m.endswith(("_right", "_wrong"))]  # those are NaN where no image is right, or none wrong
    assert np.isfinite(df[always].to_numpy()).all()


def test_a_real_sweep_gets_its_analysis(real_experiment: Path):
    folder = analysis.write_analysis(real_experiment)
    summary = pd.read_csv(folder / "summary_pooling.csv").set_index(["pooling", "epoch"])
    sweep = analysis.load(real_experiment)
    df = sweep.frame
    at_4 = df[(df["epoch"] == 4) & (df["pooling"] == "max")]["val_acc"]
    assert summary.at[("max", 4), "val_acc_mean"] == pytest.approx(at_4.mean()) and summary.at[("max", 4), "val_acc_count"] == 1
    report = (folder / "report.md").read_text()
    assert "pooling" in report and "conv_width" in report and "errored" in report
    assert_png(folder / "learning_curves.png")
    for name in ("right_and_wrong", "reliability", "cost"):  # real trials report their prediction diagnostics
        assert_png(folder / f"{name}.png")
    sweep = analysis.load(real_experiment)
    per_epoch = sweep.calibration.groupby(["trial_id", "epoch"]).size()  # two splits of 15 bins, from result.json's reports
    assert len(per_epoch) >= 10 and per_epoch.eq(2 * 15).all() and set(per_epoch.index) <= set(zip(sweep.frame["trial_id"], sweep.frame["epoch"]))


def test_a_frame_read_back_from_results_csv_gives_the_same_tables(seed_experiment: Path):
    folder = analysis.write_analysis(seed_experiment)
    for read in (pd.read_csv, pd.read_parquet):
        again = analysis.Sweep.from_frame(read(folder / f"results.{'csv' if read is pd.read_csv else 'parquet'}"))
        assert sorted(again.context.swept) == ["conv_width", "pooling"] and again.context.snapshot_epochs == [2, 4, 6]
        pd.testing.assert_frame_equal(analysis.effects(again, ["pooling", "conv_width"]), analysis.effects(analysis.load(seed_experiment)))
