"""An experiment folder as a Sweep: one tidy DataFrame (a row per trial per reported epoch) and the context the
views need besides the rows (the swept settings, the snapshot epochs, the sweep's metric and mode).

It reads Ray Tune's files directly (tune_cnn.experiment knows them), so it needs neither a running Ray nor the
trainable, and reads interrupted sweeps as well as finished ones. Without the sweep's tune_cnn.json the swept
settings and the snapshot epochs are worked out from the trials.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tune_cnn.claim import is_held
from tune_cnn.config import TrainConfig
from tune_cnn.errors import TuneCnnError
from tune_cnn.experiment import CALIBRATION, METADATA_FILE, METRICS, ExperimentFolder, Metadata, Report, SavedState, Storage, is_state_file, made_at

FINISHED, STOPPED, ERRORED, RUNNING, INTERRUPTED, DIVERGED = "finished", "stopped early", "errored", "running", "interrupted", "diverged"
NOT_STARTED = "not started"
UNREADABLE = "settings unreadable"  # params.json and every checkpoint's copy cut short: left out of the rows
LOST = "lost when its driver was killed, not resumed"  # see _is_lost: left out of the rows
NOT_SETTINGS = ("trial_id", "status", "epoch", "trial_seed", *METRICS)  # the columns that are not a trial's settings
CALIBRATION_COLUMNS = ["trial_id", "epoch", "split", "bin", "images", "confidence", "accuracy"]


class AnalysisError(TuneCnnError):
    """The path is not an experiment folder, or the analysis was asked for something the sweep lacks."""


@dataclass(frozen=True)
class ExperimentContext:
    """What the grouped views need besides the rows."""

    experiment: str
    swept: list[str]
    snapshot_epochs: list[int]
    metric: str = "val_acc"
    mode: str = "max"
    incomplete: dict[str, str] = field(default_factory=dict)  # trial id -> status, for every trial that did not finish
    space_trials: int | None = None  # the trials of the sweep's space (tune_cnn.json), started or not
    metadata: Metadata | None = None  # tune_cnn.json, where the folder has one

    @property
    def factors(self) -> list[str]:
        """The swept settings whose effects the analysis estimates and groups by. A swept `seed` is not one:
        each trial's seed is a hash of all its settings, so seed values are replicates, and their spread is
        the trial-to-trial noise."""
        return [name for name in self.swept if name != "seed"]

    @property
    def sampled(self) -> list[str]:
        """The swept settings an optuna search drew from a distribution (their values never repeat)."""
        return self.metadata.sampled if self.metadata else []


@dataclass(frozen=True)
class Sweep:
    """A loaded sweep: `frame`, one row per trial per reported epoch (trial_id, status, epoch, every setting,
    trial_seed, every metric), its `context`, and `calibration`, one row per trial, epoch, split and confidence bin
    (images, mean confidence, accuracy), for reliability diagrams."""

    frame: pd.DataFrame
    context: ExperimentContext
    calibration: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CALIBRATION_COLUMNS))

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, experiment: str = "") -> Sweep:
        """A frame of load()'s columns from elsewhere (results.csv or results.parquet read back): its context worked
        out from the rows, with the default metric, val_acc (max). List settings (filters) become tuples again, as
        load() gives them, so that they group."""
        frame = frame.map(lambda value: tuple(value) if isinstance(value, (list, np.ndarray)) else value)
        return cls(frame, ExperimentContext(experiment, differing_settings(frame), snapshot_epochs_of(frame, None)))

    def where(self, rows: pd.Series) -> Sweep:
        """The same sweep with only the rows where `rows` is true, such as `sweep.frame["epoch"] <= 10` (and the
        calibration of those trials' epochs)."""
        frame = self.frame[rows]
        kept = self.calibration.set_index(["trial_id", "epoch"]).index.isin(frame.set_index(["trial_id", "epoch"]).index)
        return replace(self, frame=frame, calibration=self.calibration[kept])


@dataclass
class TrialRecord:
    trial_id: str
    settings: dict[str, Any]
    reports: list[Report]
    status: str


def load(path: str | Path) -> Sweep:
    """Read the experiment folder at `path` (local, or a URI such as s3://bucket/path/name).

    A restored trial reports some epochs twice; the latest report wins. `context.incomplete` names every trial
    that has not finished, any whose settings could not be read and any a killed driver lost (those two have no
    rows), and those Ray queued but never started.
    """
    folder = ExperimentFolder(Storage.open(path))
    with folder.storage.reaching():
        files, trial_folders = _experiment_listing(folder)
        state = folder.saved_state(files)
        driver_runs = is_held(folder.storage)
        records = {name: _read_trial(folder, name, state.trials.get(name), driver_runs) for name in trial_folders}
        metadata = folder.metadata() if METADATA_FILE in files else None
    lost = {name for name in trial_folders if _is_lost(name, state)}
    trials = [t for name, t in records.items() if t is not None and name not in lost]
    frame = _tidy_frame(trials)
    # Ray knows trials that never wrote params.json: queued ones, and ones whose worker failed to start.
    unstarted = {trial_id: ERRORED if status == "ERROR" else NOT_STARTED
                 for name, (trial_id, status) in state.trials.items() if name not in trial_folders}
    unreadable = {state.trials.get(name, (name,))[0]: UNREADABLE for name, record in records.items() if record is None and name not in lost}
    lost_ids = {(records[name].trial_id if records[name] else name): LOST for name in sorted(lost)}
    context = ExperimentContext(
        experiment=folder.location,
        swept=list((metadata.swept if metadata else None) or differing_settings(frame)),
        snapshot_epochs=snapshot_epochs_of(frame, metadata),
        metric=metadata.metric if metadata else "val_acc",
        mode=metadata.mode if metadata else "max",
        incomplete={**{t.trial_id: t.status for t in trials if t.status != FINISHED}, **unstarted, **unreadable, **lost_ids},
        metadata=metadata,
        space_trials=metadata.trials if metadata else None,
    )
    return Sweep(frame, context, _calibration_frame(trials))


def _experiment_listing(folder: ExperimentFolder) -> tuple[list[str], list[str]]:
    """The experiment's files and its trial folders; anything else is a one-line AnalysisError."""
    kind = folder.storage.kind()
    if kind == "missing":
        raise AnalysisError(f"{folder.location} does not exist; pass an experiment folder such as ./tune_results/seed")
    files, trial_folders = folder.top_level() if kind == "folder" else ([], [])
    if not trial_folders and not any(is_state_file(f) for f in files) and METADATA_FILE not in files:
        raise AnalysisError(
            f"{folder.location} is not a Ray Tune experiment folder (no experiment_state-*.json, {METADATA_FILE} "
            f"or trial folders with params.json); pass STORAGE/NAME of a sweep, such as ./tune_results/seed"
        )
    return files, trial_folders


def _is_lost(folder: str, state: SavedState) -> bool:
    """A trial started by an earlier driver that was killed before it saved the trial in its state: the resumed
    driver does not know the trial, so it never continues it, and a new trial took its place in the sweep.

    A folder the newest state does not list but made after that state's session began is a new trial the running
    driver has not saved yet.
    """
    made = made_at(folder)
    return bool(state.session and made and folder not in state.trials and made < state.session)


def _read_trial(folder: ExperimentFolder, name: str, state: tuple[str, str] | None, driver_runs: bool) -> TrialRecord | None:
    files = folder.trial(name)
    if files.params is None:
        return None
    trial_id = state[0] if state else next((r["trial_id"] for r in files.reports if "trial_id" in r), name)
    settings = _settings(files.params, files.reports)
    status = _status(files.reports, settings["epochs"], state[1] if state else None, files.has_error_file, driver_runs)
    return TrialRecord(trial_id, settings, files.reports, status)


def _status(reports: list[Report], epochs: int, state: str | None, has_error_file: bool, driver_runs: bool) -> str:
    """finished / stopped early / errored / diverged / running / interrupted, from Ray's state where it has one, else from the
    files; a trial that has not ended runs only while a driver holds the experiment (tune_cnn.claim).

    A trial that failed and then recovered keeps its error.txt, so the file alone means errored only
    where Ray's state does not say otherwise.
    """
    last_epoch = int(reports[-1]["epoch"]) if reports else 0
    if state == "ERROR":
        return ERRORED
    if reports and not np.isfinite(reports[-1].get("train_loss", 0.0)):
        return DIVERGED  # the trial stopped itself there (tune_cnn.train.Run.train)
    if last_epoch >= epochs:
        return FINISHED
    if state == "TERMINATED":
        return STOPPED
    if state is None and has_error_file:
        return ERRORED
    return RUNNING if driver_runs else INTERRUPTED


def _settings(params: dict[str, Any], reports: list[Report]) -> dict[str, Any]:
    """Every setting of the trial: its params over the training defaults, lists as tuples so they group, and
    trial_seed, the seed it trained with.

    A sweep derives each trial's seed from its --seed and the settings (tune_cnn.sweep.trial_seed) and reports
    it; `seed` stays the setting as swept, so replicates `seed: [0, 1, 2]` group by replicate, not by trial.
    """
    settings = {**TrainConfig().flat(), **params}
    seeds = [r["trial_seed"] for r in reports if "trial_seed" in r]
    settings["trial_seed"] = int(seeds[-1]) if seeds else settings["seed"]
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}


def _tidy_frame(trials: list[TrialRecord]) -> pd.DataFrame:
    names = list(dict.fromkeys(name for t in trials for name in t.settings))
    names = [n for n in names if n not in ("trial_id", "status", "epoch", *METRICS)]
    rows = [
        {"trial_id": t.trial_id, "status": t.status, "epoch": int(r["epoch"]),
         **{n: t.settings.get(n) for n in names}, **{m: r.get(m, np.nan) for m in METRICS}}
        for t in trials for r in t.reports
    ]
    frame = pd.DataFrame(rows, columns=["trial_id", "status", "epoch", *names, *METRICS])
    return frame.sort_values(["trial_id", "epoch"], ignore_index=True)


def _calibration_frame(trials: list[TrialRecord]) -> pd.DataFrame:
    """Every report's calibration bins, one row per trial, epoch, split and bin."""
    rows = [(t.trial_id, int(r["epoch"]), split, index, *bin_) for t in trials for r in t.reports
            for split, key in CALIBRATION.items() if isinstance(r.get(key), list) for index, bin_ in enumerate(r[key])]
    return pd.DataFrame(rows, columns=CALIBRATION_COLUMNS).astype({"images": int})


def setting_columns(frame: pd.DataFrame) -> list[str]:
    """The frame's columns that are a trial's settings: not its id, status, epoch, trial seed or metrics."""
    return [c for c in frame.columns if c not in NOT_SETTINGS]


def differing_settings(frame: pd.DataFrame) -> list[str]:
    """Settings whose values differ across trials; trial seeds differ by design and are the noise, not a setting."""
    settings = setting_columns(frame)
    per_trial = frame.groupby("trial_id")[settings].first() if settings else frame
    return [name for name in settings if per_trial[name].nunique(dropna=False) > 1]


def snapshot_epochs_of(frame: pd.DataFrame, metadata: Metadata | None) -> list[int]:
    """The sweep's checkpoint epochs that some trial reached, else its last reported epoch."""
    epochs = (metadata.checkpoint_epochs if metadata else None) or _checkpoint_epochs(frame)
    reached = set(frame["epoch"])
    snapshots = [int(e) for e in epochs if e in reached]
    return snapshots or ([int(frame["epoch"].max())] if len(frame) else [])


def _checkpoint_epochs(frame: pd.DataFrame) -> list[int]:
    if frame.empty:
        return []
    pairs = frame.groupby("trial_id")[["checkpoint_every", "epochs"]].first().drop_duplicates()
    epochs = {int(last) for last in pairs["epochs"]}
    for every, last in pairs.itertuples(index=False):
        epochs.update(range(int(every), int(last) + 1, int(every)))
    return sorted(epochs)
