"""The experiment folder: one sweep's files on a local disk or any file system pyarrow opens (s3://, gs://,
file://), and the one place that knows their names and formats.

    STORAGE/NAME/
        tune_cnn.json                  Metadata: the sweep as tune_cnn ran it, and the folder's format version
        driver.json                    the claim of the driver that runs the sweep now (tune_cnn.claim)
        tuner.pkl                      Ray Tune's Tuner, which a resume restores
        experiment_state-<start>.json  Ray Tune's saved state, one per driver session, named by the session's start
        <trial>_<made>/                a folder per trial, named by Ray, ending in the time the trial was made
            params.json, result.json, progress.csv, error.txt   written by Ray's driver
            checkpoint_NNNNNN/                                   written by the trial: checkpoint.pt and reports.json
        analysis/                      written by tune_cnn.analysis

tune_cnn.sweep writes tune_cnn.json and each checkpoint's reports.json (the trial's params and reports so far);
tune_cnn.analysis reads it all. Format 1: folders written before tune_cnn.json recorded a format (it may lack
`samples`); format 2: tune_cnn.json records `format`.
"""
from __future__ import annotations

import csv
import io
import json
import posixpath
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tune_cnn.errors import ConfigError, StorageError, check_folder_can_be_made, first_line

FORMAT_VERSION = 2
METADATA_FILE = "tune_cnn.json"
CLAIM_FILE = "driver.json"
CHECKPOINT_REPORTS = "reports.json"
PARAMS_FILE, RESULT_FILE, PROGRESS_FILE, TUNER_FILE = "params.json", "result.json", "progress.csv", "tuner.pkl"
ERROR_FILES = ("error.txt", "error.pkl")
ANALYSIS_FOLDER = "analysis"
WRITE_PROBE = ".tune_cnn_write_test"
# What every epoch of a trial reports besides `epoch`, `lr` and each evaluated split's calibration bins
# (tune_cnn.train), as result.json and progress.csv hold it: the numbers, and for the validation and test splits
# the prediction diagnostics of tune_cnn.engine.evaluate.
DIAGNOSTICS = ("loss_right", "loss_wrong", "conf_right", "conf_wrong", "ece", "forgotten", "learned")
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "epoch_seconds", "images_per_second",
           *(f"{split}_{name}" for split in ("val", "test") for name in DIAGNOSTICS))
# What a resume must run as the experiment did (Metadata's fields), in the words of the options that set each.
RESUME_MUST_MATCH = {"space_yaml": "its search space file", "data": "--data", "subset": "subset", "sweep_seed": "seed",
                     "fixed": "fixed", "samples": "samples"}
# Each evaluated split's calibration bins in a report: per bin [images, mean confidence, accuracy] (engine.evaluate).
CALIBRATION = {"val": "val_calibration", "test": "test_calibration"}
MADE_AT = re.compile(r"_(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)$")  # the time Ray ends a trial folder's name with
Report = dict[str, Any]


# --- Storage -----------------------------------------------------------------------------------------------


@dataclass
class Storage:
    """A folder on a local disk or on anything pyarrow's file systems open. `label` is how errors name it and
    `option` what they tell the user to check."""

    fs: Any
    root: str
    location: str
    label: str
    option: str

    @classmethod
    def open(cls, location: str | Path, label: str | None = None, option: str = "the URI") -> Storage:
        """A local path (made absolute) or a URI; one StorageError where pyarrow cannot open it or its server does
        not answer (s3:// asks for the bucket's region here)."""
        import pyarrow
        import pyarrow.fs

        text = str(location)
        if "://" not in text:
            local = Path(text).expanduser().resolve()
            return cls(pyarrow.fs.LocalFileSystem(), local.as_posix(), str(local), label or str(local), option)
        path, options = split_options(text)
        text = path + options
        try:
            fs, root = pyarrow.fs.FileSystem.from_uri(text)
        except pyarrow.ArrowInvalid as error:  # a scheme pyarrow has no file system for, or a malformed URI
            raise StorageError(f"{option} {text} is neither a folder nor a URI that pyarrow opens ({first_line(error)}); give a "
                               f"local folder or a URI such as s3://BUCKET/PATH, gs://BUCKET/PATH or file:///PATH") from None
        except OSError as error:
            raise _unreachable(label or text, option, error) from None
        return cls(fs, root.rstrip("/"), text, label or text, option)

    @property
    def is_uri(self) -> bool:
        return "://" in self.location

    def child(self, name: str, label: str | None = None) -> Storage:
        """The folder `name` inside this one; a URI keeps its options (s3://b/p?endpoint_override=... gives s3://b/p/name?...)."""
        location = join_location(self.location, name)
        return Storage(self.fs, posixpath.join(self.root, name), location, label or location, self.option)

    @property
    def parent_and_name(self) -> tuple[str, str]:
        """The location of the folder this one is in (with a URI's options) and this folder's name, as Ray Tune's
        storage_path and name."""
        path, query = split_options(self.location)
        parent, name = path.rsplit("/", 1)
        return parent + query, name

    @contextmanager
    def reaching(self) -> Iterator[None]:
        """An OSError inside the block (a bucket that refuses these credentials, a network lost) as one StorageError."""
        try:
            yield
        except OSError as error:
            raise _unreachable(self.label, self.option, error) from None

    @contextmanager
    def lost_mid_sweep(self) -> Iterator[None]:
        """Cloud storage that stops answering while a sweep runs (its server or the network gone) as one StorageError
        saying what stays; a local folder's errors are ExperimentFolder.writing's to word."""
        try:
            yield
        except OSError as error:
            if not self.is_uri:
                raise
            raise StorageError(f"lost {self.label} during the sweep ({first_line(error)}); what was saved before is kept: "
                               f"continue with --resume once it answers") from None

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
        """A file's text; None where it is missing or cannot be read."""
        try:
            with self.fs.open_input_stream(self._path(relative)) as stream:
                return stream.read().decode()
        except (FileNotFoundError, OSError):
            return None

    def write_text(self, relative: str, text: str) -> None:
        self.fs.create_dir(self.root, recursive=True)
        with self.fs.open_output_stream(self._path(relative)) as stream:
            stream.write(text.encode())

    def upload(self, local: Path, relative: str = "") -> None:
        import pyarrow.fs

        self.fs.create_dir(self._path(relative), recursive=True)
        pyarrow.fs.copy_files(str(local), self._path(relative), destination_filesystem=self.fs)

    def delete(self, relative: str) -> None:
        self.fs.delete_file(self._path(relative))

    def _path(self, relative: str) -> str:
        return posixpath.join(self.root, relative) if relative else self.root


def experiment_name(location: str) -> str:
    """The experiment's name in its location: the last folder, without a URI's options."""
    return split_options(location)[0].rsplit("/", 1)[-1]


def join_location(location: str, name: str) -> str:
    """The location of the folder `name` inside `location`, before a URI's options."""
    path, options = split_options(location)
    return f"{path}/{name}{options}"


def split_options(location: str) -> tuple[str, str]:
    """A location and the options a URI ends with ("?endpoint_override=...&scheme=http"), or "" where it has none."""
    path, mark, options = location.partition("?")
    return path.rstrip("/"), mark + options


def _unreachable(label: str, option: str, error: OSError) -> StorageError:
    """Cloud storage that does not answer (no network), lacks its bucket or refuses these credentials."""
    return missing_bucket(label, option, error) or StorageError(
        f"cannot reach {label} ({first_line(error)}); check {option}, the network and the credentials")


MISSING_BUCKET = re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|[Bb]ucket '[^']*' not found|bucket does not exist")
BUCKET_NAMED = re.compile(r"[Bb]ucket '([^']+)'")


def missing_bucket(label: str, option: str, error: OSError) -> StorageError | None:
    """The one error for a bucket that does not exist, however pyarrow's S3 and GCS clients word it; None for others.
    pyarrow's own advice (its allow_bucket_creation option) is not the user's to take, so it is not quoted."""
    if not MISSING_BUCKET.search(str(error)):
        return None
    named = BUCKET_NAMED.search(str(error))
    bucket = f"the bucket {named.group(1)}" if named else "its bucket"
    return StorageError(f"{label}: {bucket} does not exist; create it (for example with `aws s3 mb`), or correct the bucket in {option}")


# --- The sweep's own record --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metadata:
    """tune_cnn.json: what the analysis needs to read the folder without the trainable, and what a resume must
    match. Fields a format-1 folder (or a hand-written file) lacks keep their defaults: None where the analysis
    then works the value out from the trials."""

    space: str | None = None
    space_path: str | None = None
    space_yaml: str | None = None
    search: str | None = None
    metric: str = "val_acc"
    mode: str = "max"
    swept: list[str] | None = None
    sampled: list[str] = field(default_factory=list)  # swept settings an optuna search drew from a distribution
    fixed: dict[str, Any] = field(default_factory=dict)
    checkpoint_epochs: list[int] | None = None
    epochs: int | None = None
    data: str | None = None
    subset: int | None = None
    samples: int | None = None
    trials: int | None = None  # the space's trials, grid or drawn: what the analysis counts, started or not
    steps: list[dict[str, Any]] | None = None  # a steps search's steps in order: what each changes
    sweep_seed: int | None = None
    format: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, text: str, location: str) -> Metadata:
        """The record in `text`; format 1 where it names none. One StorageError where it is not a JSON object or
        was written by a newer tune_cnn."""
        try:
            raw = json.loads(text)
        except ValueError:
            raw = None
        if not isinstance(raw, dict):
            raise StorageError(f"{location}/{METADATA_FILE} is not a JSON object; restore it, or delete it to read the trials alone")
        version = raw.setdefault("format", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StorageError(f"{location} was written by a newer tune_cnn (format {version!r}; this one reads formats 1 to "
                               f"{FORMAT_VERSION}); upgrade tune_cnn")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def change_from(self, stored: Metadata) -> str | None:
        """How this run differs from the `stored` one where a resume must match it, in words; None where it does
        not. A record without samples (format 1) matches any."""
        for key, option in RESUME_MUST_MATCH.items():
            was, now = getattr(stored, key), getattr(self, key)
            if key == "samples" and was is None:
                continue
            if _comparable(key, was) == _comparable(key, now):
                continue
            if key == "space_yaml":
                return "its search space file has changed"
            if key == "fixed":
                changed = [k for k in sorted(set(was) | set(now), key=str) if was.get(k) != now.get(k)]
                return ", ".join(f"{k} {was.get(k)!r}, now {now.get(k)!r}" for k in changed)
            return f"{option} {was!r}, now {now!r}"
        return None


def comparable_data(source: str) -> str:
    """A local --data path as the absolute path it names, so a resume may spell it otherwise (relative, ~)."""
    return str(Path(source).expanduser().resolve()) if Path(source).expanduser().exists() else source


def _comparable(key: str, value: Any) -> Any:
    return comparable_data(value) if key == "data" and isinstance(value, str) else value


# --- The experiment folder ---------------------------------------------------------------------------------


@dataclass
class TrialFiles:
    """What a trial folder holds: its params (None where neither params.json nor a checkpoint's copy is readable),
    one report per epoch in epoch order, and whether Ray left an error file."""

    params: dict[str, Any] | None
    reports: list[Report]
    has_error_file: bool


@dataclass
class SavedState:
    """Ray's newest saved state: trial folder -> (trial id, status), and when the driver that saved it started."""

    trials: dict[str, tuple[str, str]] = field(default_factory=dict)
    session: str | None = None


class ExperimentFolder:
    """STORAGE/NAME: what the sweep checks and writes there, and what the analysis reads."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @classmethod
    def for_sweep(cls, storage: str, name: str) -> ExperimentFolder:
        """The sweep's --storage and --name; one ConfigError for a name that is not a folder's, or a local storage
        folder that cannot be made, and one StorageError where pyarrow cannot open a URI or its server does not answer."""
        if not storage.strip():
            raise ConfigError("--storage is empty; pass a folder for the experiments or a URI such as s3://bucket/path")
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ConfigError(f"--name '{name}' is not a folder name; name the experiment only and choose its place with --storage")
        root = storage if "://" in storage else str(Path(storage).expanduser().resolve())
        if "://" not in storage:
            check_folder_can_be_made(Path(root), f"--storage {storage}", "pass a folder for the experiments (it is made if missing)")
        label = f"the experiment folder {join_location(root, name)}"
        return cls(Storage.open(root, label=label, option="--storage").child(name, label=label))

    def check_start(self, resume: bool, metadata: Metadata) -> None:
        """A new sweep needs a fresh name; a resumed one needs its experiment, run with the same inputs."""
        if not resume:
            if self.holds_a_sweep():
                raise ConfigError(f"experiment {self.location} already exists; add --resume to continue it or choose another --name")
            return
        if not self.holds_a_sweep() or not self.can_resume():
            raise ConfigError(f"no experiment to resume at {self.location}; check --storage and --name, or drop --resume")
        change = metadata.change_from(self.metadata() or Metadata(format=1))
        if change:
            raise ConfigError(f"experiment {self.location} was started otherwise ({change}); resume it with the same space and options")

    @property
    def location(self) -> str:
        return self.storage.location

    def top_level(self) -> tuple[list[str], list[str]]:
        """The folder's files and its trial folders: those with params.json, or only a checkpoint so far (a driver
        killed early may not have uploaded the trial's files, while the trial saved its params and reports with it)."""
        files, folders = self.storage.listing()
        return files, [name for name in folders if self.storage.kind(f"{name}/{PARAMS_FILE}") == "file"
                       or any(sub.startswith("checkpoint_") for sub in self.storage.listing(name)[1])]

    def holds_a_sweep(self) -> bool:
        """True where the folder exists and holds more than this tool's metadata and a driver's claim (Ctrl-C before
        Tune's first save leaves only those: a new run may take the name again, and --resume has nothing to resume)."""
        with self.storage.reaching():
            if self.storage.kind() == "missing":
                return False
            files, folders = self.storage.listing()
            return bool(set(files + folders) - {METADATA_FILE, CLAIM_FILE})

    def can_resume(self) -> bool:
        """Ray Tune's saved Tuner is there to restore the sweep from (what Tuner.can_restore looks for)."""
        with self.storage.reaching():
            return self.storage.kind(TUNER_FILE) == "file"

    def metadata(self) -> Metadata | None:
        text = self.storage.read_text(METADATA_FILE)
        return None if text is None else Metadata.from_json(text, self.location)

    def write_metadata(self, metadata: Metadata) -> None:
        with self.writing(started=False):
            self.storage.write_text(METADATA_FILE, metadata.to_json())

    def check_writable(self) -> None:
        """After a sweep: storage that stopped taking writes is why trials errored, so it is the one error."""
        with self.writing(started=True):
            self.storage.write_text(WRITE_PROBE, "ok")
            self.storage.delete(WRITE_PROBE)

    @contextmanager
    def writing(self, started: bool) -> Iterator[None]:
        """A write that fails (permissions, a full disk) is one line; a started sweep keeps what it saved."""
        try:
            yield
        except OSError as error:
            kept = "; what was saved before is kept, continue with --resume once it is fixed" if started else ""
            label = f"the experiment folder {self.location}"
            raise missing_bucket(label, self.storage.option, error) or StorageError(
                f"cannot write to {label} ({error.strerror or error}); free space or fix its permissions{kept}") from None

    def saved_state(self, files: list[str]) -> SavedState:
        """The newest experiment_state-*.json among `files` (their names end in a sortable time); empty where there
        is none, or where Ray's private format has changed (the trials are then read alone)."""
        newest = max((f for f in files if is_state_file(f)), default=None)
        if newest is None:
            return SavedState()
        try:
            trials = [json.loads(entry[0]) for entry in json.loads(self.storage.read_text(newest) or "{}")["trial_data"]]
            states = {t["relative_logdir"]: (t["trial_id"], t["status"]) for t in trials}
        except (KeyError, TypeError, IndexError, ValueError):
            return SavedState()
        return SavedState(states, newest.removeprefix("experiment_state-").removesuffix(".json"))

    def trial(self, folder: str) -> TrialFiles:
        """A trial folder's params and reports. Ray's driver rewrites params.json, result.json and progress.csv whole
        with every upload, so a driver killed meanwhile leaves them cut short, and a resumed sweep carries on from
        those copies: each file fills the others' gaps, and the reports the trial saved with its newest readable
        checkpoint fill what they all lost. An epoch reported twice (after a restore) keeps its latest report."""
        files, subfolders = self.storage.listing(folder)
        saved = self._checkpoint_record(folder, subfolders)
        params = _json_object(self.storage.read_text(f"{folder}/{PARAMS_FILE}")) or saved.get("params")
        merged = {**_latest_per_epoch(saved.get("reports", [])),
                  **_latest_per_epoch(csv_reports(self.storage.read_text(f"{folder}/{PROGRESS_FILE}") or "")),
                  **_latest_per_epoch(json_reports(self.storage.read_text(f"{folder}/{RESULT_FILE}") or ""))}
        reports = sorted(merged.values(), key=lambda r: r["epoch"])
        return TrialFiles(params if isinstance(params, dict) else None, reports, bool(set(ERROR_FILES) & set(files)))

    def _checkpoint_record(self, folder: str, subfolders: list[str]) -> dict[str, Any]:
        """The params and reports saved with the trial's newest checkpoint that has readable ones; {} where none
        has (checkpoints written outside tune_cnn's sweeps)."""
        for name in sorted((f for f in subfolders if f.startswith("checkpoint_")), reverse=True):  # zero-padded indices
            record = _json_object(self.storage.read_text(f"{folder}/{name}/{CHECKPOINT_REPORTS}"))  # None: cut short by a kill
            if record and isinstance(record.get("reports"), list):
                return {"params": record.get("params"), "reports": [r for r in record["reports"] if isinstance(r, dict) and "epoch" in r]}
        return {}


def is_state_file(name: str) -> bool:
    return name.startswith("experiment_state-") and name.endswith(".json")


def made_at(folder: str) -> str | None:
    """When Ray made the trial of this folder, in its sessions' format (2026-11-27_08-51-13); None if not named so."""
    found = MADE_AT.search(folder)
    return found.group(1) if found else None


# --- The checkpoint's saved reports ------------------------------------------------------------------------


def save_reports(checkpoint: Path, params: dict[str, Any], reports: list[Report]) -> None:
    """Into a checkpoint folder the trial is about to upload: its params and every report so far, which the analysis
    reads where the driver's own copies were cut short (ExperimentFolder.trial)."""
    (checkpoint / CHECKPOINT_REPORTS).write_text(json.dumps({"params": params, "reports": reports}))


def saved_reports(checkpoint: Path) -> list[Report]:
    """The reports a trial saved with a checkpoint, epoch 1 onwards; none in checkpoints of older versions."""
    path = checkpoint / CHECKPOINT_REPORTS
    return json.loads(path.read_text())["reports"] if path.is_file() else []


# --- Ray's result files ------------------------------------------------------------------------------------


def json_reports(text: str) -> list[Report]:
    """The epoch reports in a trial's result.json text, skipping a line a killed driver left half-written."""
    reports = []
    for line in text.splitlines():
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if isinstance(report, dict) and "epoch" in report:
            reports.append(report)
    return reports


def csv_reports(text: str) -> list[Report]:
    """The epoch reports in a trial's progress.csv text: the metrics and trial seed as numbers, and the trial id."""
    reports = []
    for row in csv.DictReader(io.StringIO(text)):
        try:
            numbers = {k: float(row[k]) for k in ("epoch", *METRICS, "trial_seed") if row.get(k)}
        except ValueError:  # a half-written row
            continue
        if "epoch" in numbers:
            reports.append({**numbers, **({"trial_id": row["trial_id"]} if row.get("trial_id") else {})})
    return reports


def _latest_per_epoch(reports: list[Report]) -> dict[int, Report]:
    return {int(r["epoch"]): {**r, "epoch": int(r["epoch"])} for r in reports}


def _json_object(text: str | None) -> dict[str, Any] | None:
    """A JSON object's text as a dict; None for no text, a file cut short, or anything but an object."""
    try:
        value = json.loads(text or "null")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
