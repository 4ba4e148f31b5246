"""Shared fixtures and helpers: generated image folders, small in-memory data sets, the shared CIFAR-10 copy,
and sweep commands run as their own process group and watched through the state Ray saves to storage."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tune_cnn.data import Arrays, DataSplits, channel_statistics
from tune_cnn.experiment import Storage, is_state_file

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 240  # for a condition that takes seconds when the machine is free: other test runs may share its two cores
AWS_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")  # how boto3, pyarrow and the AWS CLI find S3
SWEEP_ENV = {"TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Ray saves the experiment state every second, not every 10+
SHARED_CIFAR = Path(os.environ.get("TUNE_CNN_TEST_CIFAR", ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")  # the device machine only


@pytest.fixture
def decode_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded data sets go to the test session's temporary folder, not the user's cache."""
    monkeypatch.setenv("TUNE_CNN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@contextmanager
def moto_s3(log: Path, port: int | None = None) -> Iterator[int]:
    """moto's S3 server in its own process on 127.0.0.1 (a free port unless given), logging into `log`; yields its
    port once it answers, and stops it at the end."""
    import boto3

    port = port or free_port()
    with open(log, "a") as output:
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=output, stderr=output)
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        wait_for(lambda: _answers(client), timeout=60)
        yield port
    finally:
        server.terminate()
        server.wait()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server (moto's, in its own process) on a free port, with the credentials it takes in this
    process's environment, which the commands under test inherit; yields its endpoint, host:port."""
    credentials = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in credentials}
    os.environ.update(credentials)
    try:
        with moto_s3(tmp_path_factory.mktemp("s3") / "moto.log") as port:
            yield f"127.0.0.1:{port}"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _answers(client: Any) -> bool:
    """the S3 server answers"""
    try:
        client.list_buckets()
    except Exception:  # noqa: BLE001 - not up yet: connection refused, or the server's first errors
        return False
    return True


def s3_bucket(endpoint: str, name: str) -> str:
    """A new bucket on the test S3 server; the URI options that reach it (what a user passes for such a server)."""
    import boto3

    boto3.client("s3", endpoint_url=f"http://{endpoint}").create_bucket(Bucket=name)
    return f"endpoint_override={endpoint}&scheme=http"


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    """The shared CIFAR-10 image-folder archive; tests that need it skip where it is absent."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"shared CIFAR-10 copy not found at {SHARED_CIFAR}")
    return SHARED_CIFAR


def class_image(label: int, size: tuple[int, int], rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """A noisy image whose colour and stripe direction depend on the class, so a CNN can learn it."""
    h, w = size
    base = np.zeros((h, w, channels), dtype=np.float64)
    base[..., label % channels] = 160
    if label % 2:
        base[::2] += 60
    else:
        base[:, ::2] += 60
    noisy = base + rng.normal(0, 20, base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def make_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "frog"),
    per_class: dict[str, int] | None = None,
    size: tuple[int, int] = (20, 20),
    mode: str = "RGB",
    suffix: str = ".png",
    splits: tuple[str, ...] = ("train", "test"),
    seed: int = 0,
) -> Path:
    """Write split/<class>/NNNN<suffix> images under root and return root."""
    per_class = per_class or {"train": 10, "test": 4, "val": 3}
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    for split in splits:
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class[split]):
                pixels = class_image(label, size, rng, channels)
                image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
                image.save(folder / f"{i:04d}{suffix}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def synthetic_splits(train: int = 600, val: int = 200, test: int = 200, classes: int = 4, size: int = 20, seed: int = 0) -> DataSplits:
    """An in-memory data set of learnable class images: fast enough for many training tests."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> Arrays:
        y = np.arange(n) % classes
        x = np.stack([class_image(int(label), (size, size), rng) for label in y]).transpose(0, 3, 1, 2)
        return Arrays(np.ascontiguousarray(x), y.astype(np.int64))

    train_arrays = make(train)
    mean, std = channel_statistics(train_arrays.x)
    names = tuple(f"class{i}" for i in range(classes))
    return DataSplits(train_arrays, make(val), make(test), names, mean, std, "synthetic")


@pytest.fixture(scope="session")
def small_data() -> DataSplits:
    return synthetic_splits()


def write_space(folder: Path, text: str, name: str = "space.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def sweep_args(tmp_path: Path, images: Path, space: str, *options: str) -> tuple[list[str], Path]:
    """The sweep command's arguments for a space (YAML text) on `images`, and the experiment folder it fills."""
    storage = tmp_path / "results"
    return [str(write_space(tmp_path, space)), "--data", str(images), "--storage", str(storage), *options], storage / "space"


SavedTrial = dict[str, Any]  # a trial as the saved experiment state describes it
Experiment = Path | str  # an experiment folder, or its URI (s3://BUCKET/PATH/NAME) read through tune_cnn's storage


class Sweep:
    """A sweep command running in its own process group, so a test can kill the driver and what it started. Its
    output goes to a log beside a local --storage folder (a temporary file for a URI)."""

    def __init__(self, *args: str):
        storage = args[args.index("--storage") + 1]
        self.log = (tempfile.TemporaryFile("w+") if "://" in storage
                    else open(Path(storage).parent / f"sweep-{time.monotonic_ns()}.log", "w+"))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tune_cnn.sweep", *args], env={**os.environ, **SWEEP_ENV},
            stdout=self.log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )

    def running(self) -> bool:
        return self.process.poll() is None

    def finish(self, timeout: float = WAIT_S) -> tuple[int, str]:
        """Exit code and output, once the driver is done."""
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self.kill_all(signal.SIGKILL)
        self.log.seek(0)
        return code, self.log.read()

    def kill_all(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass


def _opened(uri: str) -> Storage:
    """The storage at `uri`, opened once for each server and credentials the environment names."""
    return _opened_with(uri, *(os.environ.get(name) for name in AWS_ENVIRONMENT))


@cache
def _opened_with(uri: str, *environment: str | None) -> Storage:
    return Storage.open(uri)


def read_file(experiment: Experiment, relative: str) -> str | None:
    """A file of the experiment folder; None where it is missing (or cannot be read)."""
    if not isinstance(experiment, Path):
        return _opened(experiment).read_text(relative)
    try:
        return (experiment / relative).read_text()
    except FileNotFoundError:
        return None


def write_file(experiment: Experiment, relative: str, text: str) -> None:
    if isinstance(experiment, Path):
        (experiment / relative).write_text(text)
    else:
        _opened(experiment).write_text(relative, text)


def state_files(experiment: Experiment) -> list[str]:
    """The experiment_state-*.json files Ray saved, oldest first (their names end in the time)."""
    if isinstance(experiment, Path):
        return sorted(p.name for p in experiment.glob("experiment_state-*.json"))
    try:
        return [name for name in _opened(experiment).listing()[0] if is_state_file(name)]
    except OSError:  # not there yet
        return []


def saved_trials(experiment: Experiment) -> list[SavedTrial]:
    """Status, folder and last result of each trial in the experiment state Ray last saved to storage."""
    names = state_files(experiment)
    try:
        state = json.loads(read_file(experiment, names[-1]) or "")
    except (IndexError, json.JSONDecodeError):  # not written yet, or being replaced
        return []
    trials = []
    for meta, run in state["trial_data"]:
        meta, run = (json.loads(part) if isinstance(part, str) else part for part in (meta, run))
        trials.append({"status": meta["status"], "folder": meta["relative_logdir"], "last": run.get("last_result") or {}})
    return trials


def wait_for(condition: Callable[[], Any], sweep_run: Sweep | None = None, timeout: float = WAIT_S) -> Any:
    """Poll until `condition()` is truthy and return it; fail if the sweep ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if sweep_run is not None and not sweep_run.running():
            pytest.fail("the sweep ended before the fault could be injected:\n" + sweep_run.finish()[1][-3000:])
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:g} s waiting for {condition.__doc__ or condition}")


def epochs_per_trial(df) -> list[list[int]]:
    """The epochs each trial of an analysis DataFrame reported, in order."""
    return [list(group["epoch"]) for _, group in df.groupby("trial_id")]


def reports(experiment: Experiment, folder: str) -> list[dict]:
    """A trial folder's reported results, in order."""
    lines = (read_file(experiment, f"{folder}/result.json") or "").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def kill_driver_then_resume(args: list[str], experiment: Experiment, checkpoints: int) -> None:
    """Start a sweep; once one trial has finished and a running one has saved `checkpoints` epochs, SIGKILL the
    driver and every Ray process it started; then run the same command with --resume. Checks that it finishes,
    that the finished trials did not run again and that the interrupted one continued from a checkpoint."""
    run = Sweep(*args)

    def one_finished_and_one_checkpointed() -> list[SavedTrial] | None:
        """a finished trial and a running one with its checkpoints saved"""
        trials = saved_trials(experiment)
        running = [t for t in trials if t["status"] == "RUNNING" and t["last"].get("epoch", 0) >= checkpoints]
        return trials if running and any(t["status"] == "TERMINATED" for t in trials) else None

    before = wait_for(one_finished_and_one_checkpointed, run)
    run.kill_all(signal.SIGKILL)  # no chance to save anything
    run.finish()
    finished = {t["folder"]: read_file(experiment, f"{t['folder']}/result.json") for t in before if t["status"] == "TERMINATED"}
    interrupted = next(t for t in before if t["status"] == "RUNNING")
    # The worst moment for the kill: while the driver uploads the interrupted trial's result files, which it
    # rewrites whole (in two test runs a resumed trial then lacked its first epochs). The resume starts from these.
    for name in ("result.json", "progress.csv"):
        write_file(experiment, f"{interrupted['folder']}/{name}", "")

    code, output = Sweep(*args, "--resume").finish()
    assert code == 0, output[-3000:]
    for folder, text in finished.items():
        assert text and read_file(experiment, f"{folder}/result.json") == text, f"{folder} ran again"
    continued = reports(experiment, interrupted["folder"])
    first_after_resume = next(r["epoch"] for r in continued if r["pid"] != interrupted["last"]["pid"])
    # Ray resumes from the checkpoint its saved state records, which may trail the last result by an epoch.
    assert first_after_resume > 1, "the interrupted trial started again from scratch"
