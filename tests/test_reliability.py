"""Faults injected into real sweeps, and what must survive them.

Each test runs `python -m tune_cnn.sweep` as its own process group on a small generated data set, watches the
experiment state Ray saves into the storage folder (every second here, via TUNE_GLOBAL_CHECKPOINT_S), injects
the fault at the moment it matters (a killed trial worker, a killed driver, Ctrl-C, a lost node, storage that
stops taking writes) and then checks the experiment folder, through the analysis, for what was kept.
Waits poll for conditions with generous timeouts: other test runs may share the machine's two cores.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_image_folder
from tune_cnn import analysis, sweep
from tune_cnn.data import load_data
from tune_cnn.train import TrainConfig, train

WAIT_S = 240  # for a condition that takes seconds when the machine is free
SWEEP_ENV = {"TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Ray saves the experiment state every second, not every 10+
COMPARED_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")

SavedTrial = dict[str, Any]  # a trial as the saved experiment state describes it


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images that an epoch takes a good fraction of a second on one thread: faults land mid-run."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", per_class={"train": 200, "test": 20}, size=(20, 20))


@pytest.fixture(autouse=True)
def decode_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNE_CNN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def write_space(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return path


class Sweep:
    """A sweep command running in its own process group, so a test can kill the driver and what it started."""

    def __init__(self, *args: str):
        self.log = open(Path(args[args.index("--storage") + 1]).parent / f"sweep-{time.monotonic_ns()}.log", "w+")
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


def saved_trials(experiment: Path) -> list[SavedTrial]:
    """Status, folder and last result of each trial in the experiment state Ray last saved to storage."""
    try:
        state = json.loads(next(experiment.glob("experiment_state-*.json")).read_text())
    except (StopIteration, FileNotFoundError, json.JSONDecodeError):  # not written yet, or being replaced
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
        assert sweep_run is None or sweep_run.running(), "the sweep ended before the fault could be injected"
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:g} s waiting for {condition.__doc__ or condition}")


def epochs_per_trial(df) -> list[list[int]]:
    return [list(group["epoch"]) for _, group in df.groupby("trial_id")]


def reports(experiment: Path, folder: str) -> list[dict]:
    lines = (experiment / folder / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# --- 1. A trial's worker is killed mid-run --------------------------------------------------------------------


def test_a_killed_trial_worker_is_retried_from_its_checkpoint_and_matches_an_uninterrupted_run(images: Path, tmp_path: Path):
    epochs = 12
    space = write_space(tmp_path, f"""
        resources: {{cpu: 1}}
        fixed: {{epochs: {epochs}, checkpoint_every: 1, padding: same, batch_size: 8}}
        space: {{pooling: [max]}}
    """)
    storage = tmp_path / "results"
    experiment = storage / "space"
    run = Sweep(str(space), "--data", str(images), "--storage", str(storage))

    def running_past_epoch_2() -> SavedTrial | None:
        """a running trial with two epochs saved"""
        return next((t for t in saved_trials(experiment) if t["status"] == "RUNNING" and 2 <= t["last"].get("epoch", 0) < epochs), None)

    trial = wait_for(running_past_epoch_2, run)
    os.kill(trial["last"]["pid"], signal.SIGKILL)
    code, output = run.finish()

    assert code == 0, output[-3000:]
    reported = reports(experiment, trial["folder"])
    assert len({r["pid"] for r in reported}) == 2, "the trial was not retried in a new worker"
    retried_from = next(r["epoch"] for r in reported if r["pid"] != trial["last"]["pid"])
    assert 1 < retried_from <= trial["last"]["epoch"] + 1, "the retry did not start from a checkpoint"
    df = analysis.load(experiment)
    assert df["epoch"].tolist() == list(range(1, epochs + 1)) and set(df["status"]) == {"finished"}

    final = reported[-1]
    expected = uninterrupted_run(images, final["config"])[-1]
    for name in COMPARED_METRICS:
        assert math.isclose(final[name], expected[name], rel_tol=1e-6, abs_tol=1e-9), (name, final[name], expected[name])


def uninterrupted_run(images: Path, params: dict[str, Any]) -> list[dict[str, float]]:
    """The same trial trained in this process without a break: same data, seed and thread count."""
    data = load_data(str(images), seed=0)
    config = TrainConfig.from_flat({**params, "seed": sweep.trial_seed(0, params)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a trial with `cpu: 1` trains on one thread
    try:
        return train(config, data, report=lambda metrics, folder: None)
    finally:
        torch.set_num_threads(threads)


# --- 5. Ctrl-C ---------------------------------------------------------------------------------------------


def test_ctrl_c_stops_cleanly_says_how_to_resume_and_leaves_an_interrupted_sweep(images: Path, tmp_path: Path):
    space = write_space(tmp_path, """
        resources: {cpu: 1}
        fixed: {epochs: 30, checkpoint_every: 1, padding: same, batch_size: 8}
        space: {pooling: [max, avg]}
    """)
    storage = tmp_path / "results"
    experiment = storage / "space"
    run = Sweep(str(space), "--data", str(images), "--storage", str(storage), "--max-concurrent", "1")

    def a_checkpoint_saved() -> bool:
        """a trial with a saved checkpoint"""
        return any(t["last"].get("checkpoint_dir_name") for t in saved_trials(experiment))

    wait_for(a_checkpoint_saved, run)
    run.kill_all(signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole foreground process group
    code, output = run.finish()

    assert code == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "2 trial(s) did not finish; rerun the same command with --resume to continue" in output
    df = analysis.load(experiment)
    # One trial was interrupted; with one trial at a time, Ray had not yet created the other.
    assert list(df.attrs["incomplete"].values()) == ["running"]
    assert set(df["status"]) == {"running"} and df["epoch"].tolist() == list(range(1, len(df) + 1))


# --- 2. The driver is killed ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_driver_resumes_optuna_without_rerunning_finished_trials(images: Path, tmp_path: Path):
    samples, epochs = 4, 6
    space = write_space(tmp_path, f"""
        search: optuna
        samples: {samples}
        resources: {{cpu: 1}}
        fixed: {{epochs: {epochs}, checkpoint_every: 1, padding: same, batch_size: 8}}
        space: {{lr: {{loguniform: [1.0e-4, 1.0e-2]}}, pooling: [max, avg]}}
    """)
    storage = tmp_path / "results"
    experiment = storage / "space"
    args = [str(space), "--data", str(images), "--storage", str(storage), "--max-concurrent", "1"]
    run = Sweep(*args)

    def one_finished_and_one_checkpointed() -> list[SavedTrial] | None:
        """a finished trial and a running one past its third checkpoint"""
        trials = saved_trials(experiment)
        statuses = [t["status"] for t in trials]
        running = [t for t in trials if t["status"] == "RUNNING" and t["last"].get("epoch", 0) >= 3]
        return trials if "TERMINATED" in statuses and running else None

    before = wait_for(one_finished_and_one_checkpointed, run)
    run.kill_all(signal.SIGKILL)  # the driver and every Ray process it started, with no chance to save
    run.finish()
    finished = {t["folder"]: (experiment / t["folder"] / "result.json").read_text() for t in before if t["status"] == "TERMINATED"}
    interrupted = next(t for t in before if t["status"] == "RUNNING")

    code, output = Sweep(*args, "--resume").finish()
    assert code == 0, output[-3000:]

    for folder, text in finished.items():
        assert (experiment / folder / "result.json").read_text() == text, f"{folder} ran again"
    continued = reports(experiment, interrupted["folder"])
    first_after_resume = next(r["epoch"] for r in continued if r["pid"] != interrupted["last"]["pid"])
    # Ray resumes from the checkpoint its saved state records, which may trail the last result by an epoch.
    assert first_after_resume > 1, "the interrupted trial started again from scratch"
    df = analysis.load(experiment)
    assert df["trial_id"].nunique() == samples, "Optuna drew more trials than the study's samples"
    assert set(df["status"]) == {"finished"} and epochs_per_trial(df) == [list(range(1, epochs + 1))] * samples
    # A study restarted from scratch would propose its first, seeded, learning rates again.
    assert df.groupby("trial_id")["lr"].first().nunique() == samples


# --- 3. A node is lost ---------------------------------------------------------------------------------------


@pytest.fixture
def two_node_cluster():
    """A head and one worker node with one CPU each: one trial runs on each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster, worker
    cluster.shutdown()


@pytest.mark.slow
def test_trials_of_a_lost_node_are_rescheduled_on_the_surviving_node(two_node_cluster, images: Path, tmp_path: Path):
    cluster, worker = two_node_cluster
    epochs = 10
    space = write_space(tmp_path, f"""
        resources: {{cpu: 1}}
        fixed: {{epochs: {epochs}, checkpoint_every: 1, padding: same, batch_size: 8}}
        space: {{pooling: [max, avg]}}
    """)
    storage = tmp_path / "results"
    experiment = storage / "space"
    run = Sweep(str(space), "--data", str(images), "--storage", str(storage), "--address", cluster.address)

    def running_on_the_worker() -> SavedTrial | None:
        """a trial on the worker node past its second checkpoint"""
        return next((t for t in saved_trials(experiment) if t["status"] == "RUNNING" and t["last"].get("node_id") == worker.node_id
                     and 2 <= t["last"].get("epoch", 0) < epochs), None)

    lost = wait_for(running_on_the_worker, run)
    cluster.remove_node(worker)
    code, output = run.finish()

    assert code == 0, output[-3000:]
    moved = reports(experiment, lost["folder"])
    assert moved[-1]["node_id"] == cluster.head_node.node_id and moved[-1]["epoch"] == epochs
    df = analysis.load(experiment)
    assert set(df["status"]) == {"finished"}
    assert epochs_per_trial(df) == [list(range(1, epochs + 1))] * 2


# --- 4. Storage stops taking writes ------------------------------------------------------------------------


def freeze(folder: Path) -> None:
    """Make a folder tree unwritable, even for root (immutable files), as a full or read-only disk would be."""
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
    elif subprocess.run(["chattr", "-R", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without immutable files: cannot make storage unwritable")


def thaw(folder: Path) -> None:
    command = ["chmod", "-R", "u+w"] if os.geteuid() != 0 else ["chattr", "-R", "-i"]
    subprocess.run([*command, str(folder)], capture_output=True)


def test_storage_that_stops_taking_writes_is_one_clear_error_and_keeps_what_was_written(images: Path, tmp_path: Path):
    epochs = 30
    space = write_space(tmp_path, f"""
        resources: {{cpu: 1}}
        fixed: {{epochs: {epochs}, checkpoint_every: 1, padding: same, batch_size: 8}}
        space: {{pooling: [max]}}
    """)
    storage = tmp_path / "results"
    experiment = storage / "space"
    run = Sweep(str(space), "--data", str(images), "--storage", str(storage))

    def two_checkpoints_saved() -> SavedTrial | None:
        """a trial with two epochs saved"""
        return next((t for t in saved_trials(experiment) if t["last"].get("epoch", 0) >= 2), None)

    wait_for(two_checkpoints_saved, run)
    freeze(storage)
    try:
        code, output = run.finish()
        df = analysis.load(experiment)
        rewrite = subprocess.run([sys.executable, "-m", "tune_cnn.analysis", str(experiment)], capture_output=True, text=True)
        elsewhere = analysis.write_analysis(experiment, out=tmp_path / "analysis")
    finally:
        thaw(storage)

    # Ray logs each failed save with its traceback; the command itself must not crash (an uncaught exception's
    # traceback starts in runpy) and ends with one line.
    assert code == 2 and "<frozen runpy>" not in output, output[-3000:]
    assert output.splitlines()[-1].startswith(f"error: cannot write to the experiment folder {experiment} ("), output[-3000:]
    assert "what was saved before is kept, continue with --resume" in output
    assert len(df) >= 2 and df["epoch"].tolist() == list(range(1, len(df) + 1))  # every epoch saved before the fault
    assert rewrite.returncode == 2 and rewrite.stderr.startswith(f"error: cannot write the analysis to {experiment}/analysis")
    assert (elsewhere / "report.md").exists()
