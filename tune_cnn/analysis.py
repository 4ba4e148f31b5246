"""Read a sweep's experiment folder into one tidy DataFrame and turn it into tables, findings, plots and a report.

    python -m tune_cnn.analysis EXPERIMENT [--by SETTING ...] [--epochs 10 20 30] [--out DIR]

`load()` reads Ray Tune's files directly (params.json, result.json, progress.csv and error.txt in each trial
folder, the reports the trial saved with its newest checkpoint, and the newest experiment_state-*.json), so it
needs neither a running Ray nor the trainable, and reads interrupted sweeps as well as finished ones. The
sweep's `tune_cnn.json` names the swept settings and the snapshot epochs; without it both are worked out from
the trials.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import itertools
import json
import math
import posixpath
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from tune_cnn.config import CHECKPOINT_REPORTS, TrainConfig
from tune_cnn.errors import CommandParser, TuneCnnError, exit_on_user_error, first_line

METADATA_FILE = "tune_cnn.json"
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "epoch_seconds", "images_per_second")
FINISHED, STOPPED, ERRORED, RUNNING = "finished", "stopped early", "errored", "running"
UNREADABLE = "settings unreadable"  # params.json and every checkpoint's copy cut short: left out of the rows
LOST = "lost when its driver was killed, not resumed"  # see _is_lost: left out of the rows
STATS = ("mean", "std", "count", "min", "max")
At = Literal["epochs", "last", "best"]
# A setting with more distinct numeric values than this (an Optuna range) is split at its median: groups of
# one trial each would say nothing about trial-to-trial noise.
MAX_LEVELS = 6
# Validation loss wanders by a few percent from epoch to epoch; a smaller rise is not called overfitting.
OVERFIT_RISE = 0.05
PANELS = (("train_acc", "training accuracy (%)"), ("val_acc", "validation accuracy (%)"), ("val_loss", "validation loss (cross-entropy)"))
BEST_ROWS = 5
# Every file an analysis writes; a rerun into the same folder removes those it does not write again.
ANALYSIS_FILES = ("results.csv", "results.parquet", "report.md", "trials.csv", "effects.csv", "importance.csv", "summary_*.csv",
                  "learning_curves.png", "effects.png", "by_*.png")


class AnalysisError(TuneCnnError):
    """The path is not an experiment folder, or the analysis was asked for something the sweep lacks."""


# --- Reading an experiment folder --------------------------------------------------------------------------


@dataclass
class Storage:
    """A folder on a local disk or on anything pyarrow's file systems read (s3://, gs://, file://)."""

    fs: Any
    root: str
    location: str

    @classmethod
    def open(cls, location: str | Path) -> Storage:
        import pyarrow
        import pyarrow.fs

        text = str(location)
        if "://" not in text:
            local = Path(text).expanduser().resolve()
            return cls(pyarrow.fs.LocalFileSystem(), local.as_posix(), str(local))
        try:
            fs, root = pyarrow.fs.FileSystem.from_uri(text)
        except pyarrow.ArrowInvalid as error:  # a scheme pyarrow has no file system for, or a malformed URI
            raise AnalysisError(f"cannot open {text} ({first_line(error)}); give a local folder or a URI such as "
                                f"s3://BUCKET/PATH, gs://BUCKET/PATH or file:///PATH") from None
        except OSError as error:  # s3:// asks for the bucket's region here
            raise unreachable(text, error) from None
        return cls(fs, root.rstrip("/"), text.rstrip("/"))

    def kind(self, relative: str = "") -> str:
        import pyarrow.fs

        kind = self.fs.get_file_info(self._path(relative)).type
        return {pyarrow.fs.FileType.Directory: "folder", pyarrow.fs.FileType.File: "file"}.get(kind, "missing")

    def listing(self, relative: str = "") -> tuple[list[str], list[str]]:
        """Names of the files and of the folders directly inside `relative`."""
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self._path(relative)))
        files = sorted(posixpath.basename(i.path) for i in infos if i.type == pyarrow.fs.FileType.File)
        folders = sorted(posixpath.basename(i.path) for i in infos if i.type == pyarrow.fs.FileType.Directory)
        return files, folders

    def read_text(self, relative: str) -> str | None:
        try:
            with self.fs.open_input_stream(self._path(relative)) as stream:
                return stream.read().decode()
        except (FileNotFoundError, OSError):
            return None

    def upload(self, local: Path, relative: str = "") -> None:
        import pyarrow.fs

        self.fs.create_dir(self._path(relative), recursive=True)
        pyarrow.fs.copy_files(str(local), self._path(relative), destination_filesystem=self.fs)

    def delete(self, relative: str) -> None:
        self.fs.delete_file(self._path(relative))

    def _path(self, relative: str) -> str:
        return posixpath.join(self.root, relative) if relative else self.root


def unreachable(location: str, error: OSError) -> AnalysisError:
    """Cloud storage that does not answer (no such bucket, no network) or refuses these credentials."""
    return AnalysisError(f"cannot reach {location} ({first_line(error)}); check the URI, the network and the credentials")


@dataclass
class TrialRecord:
    trial_id: str
    settings: dict[str, Any]
    reports: list[dict[str, Any]]
    status: str


@dataclass
class ExperimentContext:
    """What the grouped views need besides the rows: kept in DataFrame.attrs by load()."""

    experiment: str
    swept: list[str]
    snapshot_epochs: list[int]
    metric: str = "val_acc"
    mode: str = "max"
    incomplete: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def factors(self) -> list[str]:
        """The swept settings whose effects the analysis estimates and groups by. A swept `seed` is not one:
        each trial's seed is a hash of all its settings, so seed values are replicates, and their spread is
        the trial-to-trial noise."""
        return [name for name in self.swept if name != "seed"]


def load(path: str | Path) -> pd.DataFrame:
    """One row per trial per reported epoch: trial_id, status, epoch, every setting, every metric.

    A restored trial reports some epochs twice; the latest report wins. `df.attrs` holds the experiment,
    the swept settings, the snapshot epochs, the sweep's metric and mode, and `incomplete`: trial id ->
    status for every trial that has not finished, whose settings could not be read, or that a killed driver
    lost (those two have no rows).
    """
    storage = Storage.open(path)
    try:
        files, folders = _experiment_listing(storage)
        states, session = _trial_states(storage, files)
        records = {name: _read_trial(storage, name, states.get(name)) for name in folders}
    except OSError as error:  # a bucket that refuses these credentials, or a network lost while reading
        raise unreachable(storage.location, error) from None
    metadata = json.loads(storage.read_text(METADATA_FILE) or "{}") if METADATA_FILE in files else {}
    lost = {name for name in folders if _is_lost(name, states, session)}
    trials = [t for name, t in records.items() if t is not None and name not in lost]
    frame = _tidy_frame(trials)
    # Ray knows trials that never wrote params.json: queued ones, and ones whose worker failed to start.
    unstarted = {trial_id: ERRORED if state == "ERROR" else "not started" for name, (trial_id, state) in states.items() if name not in folders}
    unreadable = {states.get(name, (name,))[0]: UNREADABLE for name, record in records.items() if record is None and name not in lost}
    lost_ids = {(records[name].trial_id if records[name] else name): LOST for name in sorted(lost)}
    context = ExperimentContext(
        experiment=storage.location,
        swept=list(metadata.get("swept") or _differing_settings(frame)),
        snapshot_epochs=_snapshot_epochs(frame, metadata),
        metric=metadata.get("metric", "val_acc"),
        mode=metadata.get("mode", "max"),
        incomplete={**{t.trial_id: t.status for t in trials if t.status != FINISHED}, **unstarted, **unreadable, **lost_ids},
        metadata=metadata,
    )
    frame.attrs = context.__dict__.copy()
    return frame


def _experiment_listing(storage: Storage) -> tuple[list[str], list[str]]:
    """The experiment's files and its trial folders; anything else is a one-line AnalysisError."""
    kind = storage.kind()
    if kind == "missing":
        raise AnalysisError(f"{storage.location} does not exist; pass an experiment folder such as ./tune_results/seed")
    files, folders = storage.listing() if kind == "folder" else ([], [])
    trial_folders = [name for name in folders if _is_trial_folder(storage, name)]
    if not trial_folders and not any(_is_state_file(f) for f in files) and METADATA_FILE not in files:
        raise AnalysisError(
            f"{storage.location} is not a Ray Tune experiment folder (no experiment_state-*.json, {METADATA_FILE} "
            f"or trial folders with params.json); pass STORAGE/NAME of a sweep, such as ./tune_results/seed"
        )
    return files, trial_folders


def _is_trial_folder(storage: Storage, name: str) -> bool:
    """A folder with params.json, or only a checkpoint so far: a driver killed early may not have uploaded the
    trial's files yet, while the trial saved its params and reports with the checkpoint (sweep.saved_reports)."""
    if storage.kind(f"{name}/params.json") == "file":
        return True
    return any(sub.startswith("checkpoint_") for sub in storage.listing(name)[1])


def _is_state_file(name: str) -> bool:
    return name.startswith("experiment_state-") and name.endswith(".json")


def _trial_states(storage: Storage, files: list[str]) -> tuple[dict[str, tuple[str, str]], str | None]:
    """Trial folder -> (trial id, Ray's status) from the newest experiment state, and the start of the driver's
    session that wrote it (as in its name, 2026-11-27_08-51-13); {} and None where there is none."""
    newest = max((f for f in files if _is_state_file(f)), default=None)  # names end in a sortable timestamp
    if newest is None:
        return {}, None
    try:
        trial_data = json.loads(storage.read_text(newest) or "{}")["trial_data"]
        trials = [json.loads(entry[0]) for entry in trial_data]
        states = {t["relative_logdir"]: (t["trial_id"], t["status"]) for t in trials}
    except (KeyError, TypeError, IndexError, ValueError):  # Ray's private format changed: read the trials alone
        return {}, None
    return states, newest.removeprefix("experiment_state-").removesuffix(".json")


def _is_lost(folder: str, states: dict[str, tuple[str, str]], session: str | None) -> bool:
    """A trial started by an earlier driver that was killed before it saved the trial in its state: the resumed
    driver does not know the trial, so it never continues it, and a new trial took its place in the sweep.

    Ray ends a trial folder's name with the time the trial was made, in its sessions' format. A folder the newest
    state does not list but made after that session began is a new trial the running driver has not saved yet.
    """
    made = re.search(r"_(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)$", folder)
    return bool(session and made and folder not in states and made.group(1) < session)


def _read_trial(storage: Storage, folder: str, state: tuple[str, str] | None) -> TrialRecord | None:
    files, subfolders = storage.listing(folder)
    saved = _checkpoint_record(storage, folder, subfolders)
    # params.json is rewritten with every upload too: one cut short by a killed driver is read from the checkpoint.
    params = _json_object(storage.read_text(f"{folder}/params.json")) or saved.get("params")
    if not isinstance(params, dict):
        return None
    reports = _merge_reports(storage.read_text(f"{folder}/result.json") or "", storage.read_text(f"{folder}/progress.csv") or "",
                             saved.get("reports", []))
    trial_id = state[0] if state else next((r["trial_id"] for r in reports if "trial_id" in r), folder)
    settings = _settings(params, reports)
    has_error_file = bool({"error.txt", "error.pkl"} & set(files))
    status = _status(reports, settings["epochs"], state[1] if state else None, has_error_file)
    return TrialRecord(trial_id, settings, reports, status)


def _json_object(text: str | None) -> dict[str, Any] | None:
    """A JSON object's text as a dict; None for no text, a file cut short, or anything but an object."""
    try:
        value = json.loads(text or "null")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _merge_reports(result_json: str, progress_csv: str, checkpointed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One report per epoch, in epoch order: the latest report of an epoch reported twice (after a restore).

    Ray's driver uploads result.json and progress.csv by rewriting them whole, so a driver killed during an
    upload leaves them cut short, and a resumed sweep carries on from those copies. Each file fills the other's
    gaps, and the reports the trial saved with its newest checkpoint (tune_cnn.sweep.saved_reports) fill what
    both lost.
    """
    merged = {**_latest_per_epoch(checkpointed), **_latest_per_epoch(_csv_reports(progress_csv)),
              **_latest_per_epoch(json_reports(result_json))}
    return sorted(merged.values(), key=lambda r: r["epoch"])


def _checkpoint_record(storage: Storage, folder: str, subfolders: list[str]) -> dict[str, Any]:
    """The params and reports saved with the trial's newest checkpoint that has readable ones (see
    tune_cnn.sweep.saved_reports); {} where none has, as in checkpoints written outside tune_cnn's sweeps."""
    for name in sorted((f for f in subfolders if f.startswith("checkpoint_")), reverse=True):  # zero-padded indices
        record = _json_object(storage.read_text(f"{folder}/{name}/{CHECKPOINT_REPORTS}"))  # None: cut short by a kill
        if record and isinstance(record.get("reports"), list):
            return {"params": record.get("params"), "reports": [r for r in record["reports"] if isinstance(r, dict) and "epoch" in r]}
    return {}


def _latest_per_epoch(reports: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(r["epoch"]): {**r, "epoch": int(r["epoch"])} for r in reports}


def json_reports(text: str) -> list[dict[str, Any]]:
    """The epoch reports in a trial's result.json text, skipping a line a killed driver left half-written."""
    reports = []
    for line in text.splitlines():
        try:
            report = json.loads(line)
        except ValueError:  # a driver killed mid-write leaves half a line
            continue
        if isinstance(report, dict) and "epoch" in report:
            reports.append(report)
    return reports


def _csv_reports(text: str) -> list[dict[str, Any]]:
    reports = []
    for row in csv.DictReader(io.StringIO(text)):
        try:
            numbers = {k: float(row[k]) for k in ("epoch", *METRICS, "trial_seed") if row.get(k)}
        except ValueError:  # a half-written row
            continue
        if "epoch" in numbers:
            reports.append({**numbers, **({"trial_id": row["trial_id"]} if row.get("trial_id") else {})})
    return reports


def _status(reports: list[dict[str, Any]], epochs: int, state: str | None, has_error_file: bool) -> str:
    """finished / stopped early / errored / running, from Ray's state where it has one, else from the files.

    A trial that failed and then recovered keeps its error.txt, so the file alone means errored only
    where Ray's state does not say otherwise.
    """
    last_epoch = int(reports[-1]["epoch"]) if reports else 0
    if state == "ERROR":
        return ERRORED
    if last_epoch >= epochs:
        return FINISHED
    if state == "TERMINATED":
        return STOPPED
    if state is None and has_error_file:
        return ERRORED
    return RUNNING


def _settings(params: dict[str, Any], reports: list[dict[str, Any]]) -> dict[str, Any]:
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


def _differing_settings(frame: pd.DataFrame) -> list[str]:
    """Settings whose values differ across trials; trial seeds differ by design and are the noise, not a setting."""
    settings = [c for c in frame.columns if c not in ("trial_id", "status", "epoch", "trial_seed", *METRICS)]
    per_trial = frame.groupby("trial_id")[settings].first() if settings else frame
    return [name for name in settings if per_trial[name].nunique(dropna=False) > 1]


def _snapshot_epochs(frame: pd.DataFrame, metadata: dict[str, Any]) -> list[int]:
    """The sweep's checkpoint epochs that some trial reached, else its last reported epoch."""
    epochs = metadata.get("checkpoint_epochs") or _checkpoint_epochs(frame)
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


def context(df: pd.DataFrame) -> ExperimentContext:
    """The experiment's context from load()'s attrs, or worked out from the rows for any other frame."""
    attrs = dict(df.attrs)
    if "swept" not in attrs:
        return ExperimentContext("", _differing_settings(df), _snapshot_epochs(df, {}))
    return ExperimentContext(**attrs)


# --- Grouped views -----------------------------------------------------------------------------------------


def summarize(
    df: pd.DataFrame,
    by: str | Sequence[str],
    at_epochs: Sequence[int] | None = None,
    metrics: Sequence[str] | None = None,
    at: At = "epochs",
) -> pd.DataFrame:
    """Mean, std, count, min and max of each metric per group, one row per group, columns `<metric>_<stat>`.

    at="epochs" takes the snapshot epochs (default: the sweep's checkpoint epochs) and groups by epoch as
    well, since a mean over epochs 10 and 30 means nothing; "last" and "best" take one row per trial (its
    last epoch, or its best by the sweep's metric). `by` is settings, or "epoch" itself.
    """
    keys = [by] if isinstance(by, str) else list(by)
    metrics = list(metrics or [m for m in METRICS if m in df])
    _check_columns(df, keys + metrics)
    rows = grouping_levels(select_rows(df, at, at_epochs), [k for k in keys if k != "epoch"])
    if at == "epochs" and "epoch" not in keys:
        keys.append("epoch")
    table = rows.groupby(keys, dropna=False, sort=True)[metrics].agg(list(STATS))
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    return table.reset_index()


def _check_columns(df: pd.DataFrame, names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in df.columns]
    if unknown:
        settings = [c for c in df.columns if c not in ("trial_id", "status", *METRICS)]
        raise AnalysisError(f"unknown setting or metric {', '.join(unknown)}; choose from: {', '.join(settings)}")


def _check_settings(df: pd.DataFrame, names: Sequence[str]) -> None:
    """What the analysis may group by: the trials' settings, not their ids, seeds, statuses, epochs or metrics."""
    settings = [c for c in df.columns if c not in ("trial_id", "status", "epoch", "trial_seed", *METRICS)]
    wrong = [n for n in names if n not in settings]
    if wrong:
        by_epoch = " (the analysis always writes summary_epoch.csv and by_epoch.png)" if "epoch" in wrong else ""
        raise AnalysisError(f"cannot group by {', '.join(wrong)}: not a setting; choose from: {', '.join(settings)}{by_epoch}")


def select_rows(df: pd.DataFrame, at: At = "epochs", at_epochs: Sequence[int] | None = None) -> pd.DataFrame:
    """The snapshot rows (at="epochs"), or one row per trial: its last epoch or its best by the sweep's metric."""
    if at == "epochs":
        return df[df["epoch"].isin(snapshot_epochs(df, at_epochs))]
    if at == "last":
        return df.loc[df.groupby("trial_id")["epoch"].idxmax()]
    if at == "best":
        ctx = context(df)
        pick = "idxmax" if ctx.mode == "max" else "idxmin"
        # A diverged trial's NaN or infinite values are no best: one that has no other has no best epoch, no row.
        finite = df[_finite(df[ctx.metric])]
        return finite.loc[getattr(finite.groupby("trial_id")[ctx.metric], pick)()]
    raise AnalysisError(f"at '{at}' is unknown; use epochs, last or best")


def _finite(values: pd.Series) -> pd.Series:
    """Where a metric is a number: a diverged trial reports NaN (or infinite) losses."""
    return pd.Series(np.isfinite(values.to_numpy(float)), index=values.index)


def snapshot_epochs(df: pd.DataFrame, at_epochs: Sequence[int] | None = None) -> list[int]:
    """The epochs asked for (each must have been reported), or the sweep's snapshot epochs."""
    if at_epochs is None:
        return context(df).snapshot_epochs
    missing = sorted(set(at_epochs) - set(df["epoch"]))
    if missing:
        reported = f"{df['epoch'].min()} to {df['epoch'].max()}" if len(df) else "none"
        raise AnalysisError(f"no trial reported epoch(s) {', '.join(map(str, missing))}; reported epochs: {reported}")
    return sorted(set(int(e) for e in at_epochs))


def grouping_levels(df: pd.DataFrame, settings: Sequence[str]) -> pd.DataFrame:
    """A copy whose continuous settings read '<= median' / '> median': those with more than MAX_LEVELS numeric
    values, and those a sweep drew from a distribution (more than two values), whose values never repeat."""
    sampled = context(df).metadata.get("sampled", [])
    df = df.copy()
    for name in settings:
        values = df.groupby("trial_id")[name].first()
        levels = MAX_LEVELS if name not in sampled else 2
        if values.nunique() > levels and pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            median = values.median()
            df[name] = np.where(df[name] <= median, f"<= {median:.3g}", f"> {median:.3g}")
    return df


# --- Per-trial diagnosis, effects and importance -----------------------------------------------------------


def diagnose(df: pd.DataFrame, at_epochs: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per trial: its swept settings, best epoch by validation loss, the generalisation gap
    (train_acc - val_acc) at each snapshot epoch, whether it diverged (validation loss NaN or infinite at its
    last epoch; its best epoch is the best before that, none if there is none) and whether it overfitted:
    validation loss ended more than OVERFIT_RISE above its minimum while training accuracy kept rising past
    that epoch."""
    ctx = context(df)
    epochs = snapshot_epochs(df, at_epochs)
    rows = []
    for trial_id, trial in df.sort_values("epoch").groupby("trial_id", sort=True):
        finite = trial[_finite(trial["val_loss"])]
        best = finite.loc[finite["val_loss"].idxmin()] if len(finite) else pd.Series(np.nan, index=trial.columns)
        last = trial.iloc[-1]
        diverged = not np.isfinite(last["val_loss"])
        gaps = trial.set_index("epoch").reindex(epochs)
        rows.append({
            "trial_id": trial_id, "status": last["status"], **{s: last[s] for s in ctx.swept},
            "last_epoch": int(last["epoch"]), "best_epoch": best["epoch"], "min_val_loss": best["val_loss"],
            "val_acc_at_best_epoch": best["val_acc"], "final_val_acc": last["val_acc"],
            **{f"gap_at_{e}": gaps.at[e, "train_acc"] - gaps.at[e, "val_acc"] for e in epochs},
            "diverged": diverged,
            "overfitting": bool(not diverged and last["val_loss"] > best["val_loss"] * (1 + OVERFIT_RISE)
                                and last["train_acc"] > best["train_acc"]),
        })
    diagnosis = pd.DataFrame(rows)
    return diagnosis.astype({"best_epoch": "Int64"}) if rows else diagnosis  # whole epochs, or none for a trial that had none


def trial_values(df: pd.DataFrame, metric: str = "val_acc", at: At = "best") -> pd.DataFrame:
    """One row per trial with `metric` at its best (by the sweep's metric) or last epoch; a trial whose `metric`
    there is not a number (it diverged) is left out."""
    if at == "epochs":
        raise AnalysisError("effects and importance need one value per trial; use at='best' or at='last'")
    rows = select_rows(df, at)
    return rows[_finite(rows[metric])].set_index("trial_id")


def effects(df: pd.DataFrame, settings: Sequence[str] | None = None, metric: str | None = None, at: At = "best") -> pd.DataFrame:
    """For each pair of values of each setting (default: the swept ones but a swept seed, see
    ExperimentContext.factors): the mean `metric` (default: the sweep's) of each, and the difference (b - a)
    with its 95% interval from an additive model of all the settings (see AdditiveModel): in a balanced grid
    the difference of the two means, otherwise adjusted for the other settings. An interval that spans 0 means
    the difference is within trial-to-trial noise; NaN bounds (and within_noise None) mean too few trials to
    tell. Where the trials cannot separate the setting from the others (separable False), the difference is
    that of the two means, without an interval. `attrs["metric"]` names the metric."""
    metric, settings, trials = _trial_table(df, settings, metric, at)
    model = AdditiveModel.fit(trials, settings, metric)
    rows = []
    for name in settings:
        groups = {value: group[metric].to_numpy() for value, group in trials.groupby(name, sort=True)}
        for (a, xa), (b, xb) in itertools.combinations(groups.items(), 2):
            estimate = model.contrast(name, a, b)
            difference, half_width = estimate or (xb.mean() - xa.mean(), math.nan)
            rows.append({
                "setting": name, "value_a": a, "value_b": b, "n_a": len(xa), "n_b": len(xb),
                "mean_a": xa.mean(), "mean_b": xb.mean(), "difference": difference,
                "low": difference - half_width, "high": difference + half_width,
                "within_noise": None if math.isnan(half_width) else bool(abs(difference) <= half_width),
                "separable": estimate is not None,
            })
    table = pd.DataFrame(rows, columns=["setting", "value_a", "value_b", "n_a", "n_b", "mean_a", "mean_b", "difference", "low", "high",
                                        "within_noise", "separable"])
    table.attrs["metric"] = metric
    return table


def _trial_table(df: pd.DataFrame, settings: Sequence[str] | None, metric: str | None, at: At) -> tuple[str, list[str], pd.DataFrame]:
    """What effects and importance work on: the metric, the settings (each once) and one row per trial."""
    ctx = context(df)
    metric = metric or ctx.metric
    settings = list(dict.fromkeys(settings if settings is not None else ctx.factors))  # a setting named twice is one setting
    _check_columns(df, [*settings, metric])
    return metric, settings, grouping_levels(trial_values(df, metric, at), settings)


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
    """The two-sided Student-t critical value, for any df >= 1 (no scipy in the dependencies).

    With t = sqrt(df) tan(theta) the t density becomes proportional to cos(theta)^(df-1) on [0, pi/2), a
    bounded integrand that a fine trapezoid sum integrates accurately.
    """
    theta = np.linspace(0.0, np.pi / 2, 20001)
    density = np.cos(theta) ** (max(df, 1.0) - 1)
    cumulative = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2)])
    return math.sqrt(df) * math.tan(float(np.interp(level, cumulative / cumulative[-1], theta)))


def importance(df: pd.DataFrame, settings: Sequence[str] | None = None, metric: str | None = None, at: At = "best") -> pd.DataFrame:
    """Settings (default: the swept ones but a swept seed) ranked by the share of the variance in `metric`
    (default: the sweep's) across trials that each explains alone (eta squared: between-group over total sum
    of squares); the rest is interactions and noise. No rows where no trial has a value; `attrs["metric"]`
    names the metric."""
    metric, settings, trials = _trial_table(df, settings, metric, at)
    values = trials[metric]
    total = ((values - values.mean()) ** 2).sum()
    shares = {}
    for name in settings if len(trials) else []:
        means = trials.groupby(name)[metric].transform("mean")
        shares[name] = ((means - values.mean()) ** 2).sum() / total if total > 0 else 0.0
    table = pd.DataFrame({"setting": list(shares), "variance_share": list(shares.values())})
    table = table.sort_values("variance_share", ascending=False, ignore_index=True)
    table["rank"] = np.arange(1, len(table) + 1)
    table.attrs["metric"] = metric
    return table


# --- Plots -------------------------------------------------------------------------------------------------


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


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _colours(values: Sequence[Any]) -> dict[Any, Any]:
    plt = _pyplot()
    palette = plt.get_cmap("tab10").colors
    return {value: palette[i % len(palette)] for i, value in enumerate(values)}


def plot_learning_curves(df: pd.DataFrame, colour_by: str | None = None) -> Any:
    """Training and validation accuracy and validation loss per epoch, a line per trial, coloured by a setting."""
    plt = _pyplot()
    colour_by = colour_by or next(iter(context(df).factors), None)
    frame = grouping_levels(df, [colour_by] if colour_by else [])
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
        handles = [plt.Line2D([], [], color=colours[v], label=f"{colour_by} = {_label(v)}") for v in levels]
        axes[-1].legend(handles=handles, title="colour", fontsize="small")
    trials = _count(df["trial_id"].nunique(), "trial")
    figure.suptitle(f"Learning curves: one line per trial ({trials}), coloured by {colour_by or 'nothing'}")
    return figure


def plot_grouped(df: pd.DataFrame, setting: str, at_epochs: Sequence[int] | None = None) -> Any:
    """The seed's grouped view: each panel's metric at the snapshot epochs, a box per value of `setting`
    (or per epoch when setting is 'epoch'), with every trial drawn as a dot."""
    plt = _pyplot()
    rows = grouping_levels(select_rows(df, "epochs", at_epochs), [] if setting == "epoch" else [setting])
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
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[v], alpha=0.6, label=f"{setting} = {_label(v)}") for v in levels]
        axes[-1].legend(handles=handles, fontsize="small")
    figure.suptitle(f"By {setting}: boxes over trials, one dot per trial ({_count(df['trial_id'].nunique(), 'trial')})")
    return figure


def plot_effects(effect_table: pd.DataFrame, importance_table: pd.DataFrame) -> Any:
    """Left: each difference in the mean of effects()'s metric between two values of a setting, with its 95%
    interval (a cross without one where the setting cannot be separated from the others). Right: the share of
    variance each setting explains."""
    plt = _pyplot()
    metric = effect_table.attrs.get("metric", "val_acc")
    unit = "points" if metric.endswith("_acc") else ""
    figure, (left, right) = plt.subplots(1, 2, figsize=(16, max(3.5, 0.45 * len(effect_table) + 2)), constrained_layout=True)
    labels = [f"{r.setting}: {_label(r.value_b)} vs {_label(r.value_a)}" for r in effect_table.itertuples()]
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
    right.set(title=f"Importance: share of the variance in {importance_table.attrs.get('metric', metric)} across trials",
              xlabel="variance explained by the setting alone (%)", xlim=(0, 100))
    right.grid(alpha=0.3, axis="x")
    return figure


def _save(figure: Any, path: Path) -> str:
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path.name


def _draw_and_save(plot: Callable[..., Any], args: tuple, path: Path) -> str:
    return _save(plot(*args), path)


def _draw(drawings: dict[str, tuple[str, Callable[..., Any], tuple]], folder: Path, plotters: Executor | None) -> dict[str, str]:
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


# --- Report ------------------------------------------------------------------------------------------------


def _readable(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracies and accuracy gaps in percent, for tables people read."""
    frame = frame.copy()
    for column in frame.columns:
        if column.endswith("_acc") or column.startswith("gap_at_") or column == "val_acc_at_best_epoch":
            frame[column] = [_percent(v) for v in frame[column]]
    return frame


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _cell(value: Any) -> str:
    if value is pd.NA or (isinstance(value, float) and math.isnan(value)):  # no value, such as a diverged trial's best epoch
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%" if not math.isnan(value) else "-"


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _value(metric: str, value: float) -> str:
    """A metric as people read it: accuracies in percent, losses to 4 significant digits."""
    return _percent(value) if metric.endswith("_acc") else _cell(float(value))


def _change(metric: str, value: float) -> str:
    """A difference in a metric: accuracies in percentage points, losses as they are."""
    return _points(value) if metric.endswith("_acc") else f"{value:+.3g}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def best_trials(df: pd.DataFrame, rows: int = BEST_ROWS) -> pd.DataFrame:
    """The top trials by the sweep's metric, each at its best epoch."""
    ctx = context(df)
    best = select_rows(df, "best").sort_values(ctx.metric, ascending=ctx.mode == "min").head(rows)
    return best[["trial_id", "status", *ctx.swept, "epoch", "train_acc", "val_acc", "val_loss", "test_acc"]]


def grouped_table(summary: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """A summary's mean ± std of the three seed metrics, for reading."""
    table = summary[list(keys)].copy()
    table["trials"] = summary["val_acc_count"]
    for metric, scale, unit in (("train_acc", 100, "%"), ("val_acc", 100, "%"), ("val_loss", 1, "")):
        means, stds = summary[f"{metric}_mean"] * scale, summary[f"{metric}_std"] * scale
        table[metric] = [_mean_and_spread(m, s, 1 if unit else 3) + unit for m, s in zip(means, stds)]
    return table


def _mean_and_spread(mean: float, std: float, digits: int) -> str:
    """'mean ± std'; the mean alone for one trial, whose spread is undefined (NaN); '-' where no trial has a value."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if not math.isnan(std) else "")


def findings(df: pd.DataFrame, effect_table: pd.DataFrame, importance_table: pd.DataFrame, diagnosis: pd.DataFrame) -> list[str]:
    """The seed's conclusions, computed: one plain sentence each, in the metric each table was computed on."""
    ctx = context(df)
    lines = [_effect_sentence(r, effect_table.attrs.get("metric", ctx.metric)) for r in effect_table.itertuples()]
    if len(importance_table):
        ranking = ", ".join(f"{r.setting} {_percent(r.variance_share)}" for r in importance_table.itertuples())
        metric = importance_table.attrs.get("metric", ctx.metric)
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
    gaps = [f"{_points(diagnosis[f'gap_at_{e}'].mean())} points at epoch {e}" for e in ctx.snapshot_epochs
            if f"gap_at_{e}" in diagnosis and diagnosis[f"gap_at_{e}"].notna().any()]
    if gaps:
        lines.append("Generalisation gap (training minus validation accuracy, mean over trials): " + ", ".join(gaps) + ".")
    return lines


def _effect_sentence(row: Any, metric: str) -> str:
    a, b = _label(row.value_a), _label(row.value_b)
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


def _best_lines(df: pd.DataFrame) -> list[str]:
    """The best trial in a sentence, then the top trials' table."""
    ctx = context(df)
    best = best_trials(df)
    if best.empty:  # every trial diverged
        return [f"No trial has a {ctx.metric} that is a number: there are no best trials, effects or importance.", ""]
    top = best.iloc[0]
    settings = f" ({', '.join(f'{s}={_label(top[s])}' for s in ctx.swept)})" if ctx.swept else ""
    return [f"Best trial: **{top['trial_id']}**{settings}: {ctx.metric} {_value(ctx.metric, top[ctx.metric])} at epoch {top['epoch']}.",
            "", _markdown_table(_readable(best)), ""]


def report_markdown(df: pd.DataFrame, summaries: dict[str, pd.DataFrame], effect_table: pd.DataFrame,
                    importance_table: pd.DataFrame, diagnosis: pd.DataFrame, plots: dict[str, str]) -> str:
    ctx = context(df)
    statuses = df.groupby("trial_id")["status"].first().value_counts()
    counts = ", ".join(f"{n} {status}" for status, n in statuses.items())
    meta = ctx.metadata
    seeds = ", ".join(map(_label, sorted(df["seed"].unique()))) if "seed" in ctx.swept else ""
    replicates = f"; seed ({seeds}) repeats each combination: its spread is the trial-to-trial noise, not an effect" if seeds else ""
    lines = [
        f"# Analysis of {Path(ctx.experiment).name}",
        "",
        f"Experiment: `{ctx.experiment}`. {_count(df['trial_id'].nunique(), 'trial')}: {counts}."
        + (f" Search: {meta['search']}." if "search" in meta else "")
        + f" Swept: {', '.join(ctx.factors) or 'nothing'}{replicates}. Snapshot epochs: {', '.join(map(str, ctx.snapshot_epochs))}.",
    ]
    if ctx.incomplete:
        lines += ["", "**Incomplete trials:** " + ", ".join(f"{t} ({s})" for t, s in ctx.incomplete.items()) + "."]
    lines += [
        "", f"## Best trials by {ctx.metric} ({ctx.mode}), each at its best epoch", "", *_best_lines(df), "## Findings", "",
        *[f"- {line}" for line in findings(df, effect_table, importance_table, diagnosis)],
        "", f"![Effects]({plots['effects']})" if "effects" in plots else "",
        "", "## Grouped views at the snapshot epochs", "",
    ]
    for key, summary in summaries.items():
        keys = ["epoch"] if key == "epoch" else [key, "epoch"]
        lines += [f"### By {key}", "", _markdown_table(grouped_table(summary, keys)), "", f"![By {key}]({plots[key]})", ""]
    lines += ["## Learning curves", "", f"![Learning curves]({plots['learning_curves']})", "",
              "## Per-trial diagnosis", "", _markdown_table(_readable(diagnosis)), ""]
    return "\n".join(lines)


# --- Writing the analysis folder ---------------------------------------------------------------------------


def write_analysis(experiment: str | Path, out: str | Path | None = None, by: list[str] | None = None,
                   at_epochs: list[int] | None = None, plotters: Executor | None = None) -> Path | str:
    """Write results, summaries, plots and report.md; return the folder (EXPERIMENT/analysis by default).

    An analysis bound for cloud storage (`out`, or the experiment's folder) is written locally first, then
    copied there. With `plotters` (processes, such as `sweep.plot_workers`), the plots are drawn there, all at once.
    """
    return analyse_into(load(experiment), experiment, out, by, at_epochs, plotters)


def analyse_into(df: pd.DataFrame, experiment: str | Path, out: str | Path | None = None, by: list[str] | None = None,
                 at_epochs: list[int] | None = None, plotters: Executor | None = None) -> Path | str:
    """write_analysis for an experiment already loaded as `df`."""
    location = str(out) if out is not None else f"{Storage.open(experiment).location}/analysis"
    target = Storage.open(location)  # a URI that does not answer fails here, before any work
    try:
        if "://" not in location:
            _remove_stale(target, _write_files(df, Path(target.root), by, at_epochs, plotters))
            return Path(target.location)
        with tempfile.TemporaryDirectory(prefix="tune_cnn_analysis_") as folder:
            written = _write_files(df, Path(folder), by, at_epochs, plotters)
            target.upload(Path(folder))
        _remove_stale(target, written)
        return target.location
    except OSError as error:  # a read-only or full disk, or a bucket without write access
        raise AnalysisError(f"cannot write the analysis to {location} ({error.strerror or error}); choose a writable folder with --out") from None


def _write_files(df: pd.DataFrame, folder: Path, by: list[str] | None, at_epochs: list[int] | None,
                 plotters: Executor | None) -> set[str]:
    """Write the analysis into `folder`; return the names of the files written. `by` chooses the groupings
    only: effects and importance always cover the swept settings (ExperimentContext.factors)."""
    groupings = list(dict.fromkeys(by)) if by is not None else context(df).factors  # a setting named twice is one grouping
    if len(df):  # a bad --by or --epochs fails before anything is written
        _check_settings(df, groupings)
        snapshot_epochs(df, at_epochs)
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / "results.csv", index=False)
    df.to_parquet(folder / "results.parquet", index=False)
    written = {"results.csv", "results.parquet", "report.md"}
    if df.empty:
        (folder / "report.md").write_text(f"# Analysis of {context(df).experiment}\n\nNo trial has reported a result yet.\n")
        return written
    summaries = {key: summarize(df, key, at_epochs) for key in [*groupings, "epoch"]}
    diagnosis = diagnose(df, at_epochs)
    effect_table, importance_table = effects(df), importance(df)
    tables = {"trials.csv": diagnosis, "effects.csv": effect_table, "importance.csv": importance_table,
              **{f"summary_{key}.csv": summary for key, summary in summaries.items()}}
    for name, table in tables.items():
        table.to_csv(folder / name, index=False)
    drawings = {key: (f"by_{key}.png", plot_grouped, (df, key, at_epochs)) for key in summaries}
    drawings["learning_curves"] = ("learning_curves.png", plot_learning_curves, (df, next(iter(groupings), None)))
    if len(effect_table):
        drawings["effects"] = ("effects.png", plot_effects, (effect_table, importance_table))
    plots = _draw(drawings, folder, plotters)
    (folder / "report.md").write_text(report_markdown(df, summaries, effect_table, importance_table, diagnosis, plots))
    return written | set(tables) | set(plots.values())


def _remove_stale(target: Storage, written: set[str]) -> None:
    """Delete the files an earlier analysis wrote into the folder and this one did not (another --by's groupings,
    an effects plot this sweep has no effects for), so that none contradicts the report; other files stay."""
    for name in target.listing()[0]:
        if name not in written and any(fnmatch.fnmatchcase(name, pattern) for pattern in ANALYSIS_FILES):
            target.delete(name)


# --- Command line ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(prog="python -m tune_cnn.analysis", description="Analyse a sweep: tables, findings, plots and report.md.")
    parser.add_argument("experiment", help="the experiment folder (STORAGE/NAME), local or a URI such as s3://bucket/path/name")
    parser.add_argument("--by", nargs="+", default=None, metavar="SETTING", help="settings to group by (default: the swept settings but seed)")
    parser.add_argument("--epochs", nargs="+", type=int, default=None, metavar="EPOCH", help="snapshot epochs (default: the sweep's checkpoint epochs)")
    parser.add_argument("--out", default=None, help="output folder, local or a URI such as s3://bucket/path (default: EXPERIMENT/analysis)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    df = load(args.experiment)
    folder = analyse_into(df, args.experiment, args.out, args.by, args.epochs)
    incomplete = df.attrs["incomplete"]
    if incomplete:
        listed = ", ".join(f"{t} ({s})" for t, s in incomplete.items())
        print(f"warning: {len(incomplete)} trial(s) incomplete: {listed}", file=sys.stderr)
    print(f"analysis: {folder}")


if __name__ == "__main__":
    main()
