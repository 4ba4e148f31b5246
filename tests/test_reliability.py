"""Faults injected into real sweeps, and what must survive them.

Each test runs `python -m tune_cnn.sweep` as its own process group on a small generated data set, watches the
experiment state Ray saves into the storage folder (every second here, via TUNE_GLOBAL_CHECKPOINT_S), injects
the fault at the moment it matters (a killed trial worker, a killed driver, Ctrl-C, a lost node, storage that
stops taking writes) and then checks the experiment folder, through the analysis, for what was kept.
Waits poll for conditions with generous timeouts: other test runs may share the machine's two cores.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tune_cnn import analysis, sweep
from tune_cnn.config import TrainConfig
from tune_cnn.data import load_data
from tune_cnn.errors import byte_size
from tune_cnn.memory import available_memory, trial_memory
from tune_cnn.train import train

from conftest import SavedTrial, Sweep, epochs_per_trial, kill_driver_then_resume, make_image_folder, reports, saved_trials, sweep_args, wait_for

pytestmark = pytest.mark.usefixtures("decode_cache")
COMPARED_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images that an epoch takes a good fraction of a second on one thread: faults land mid-run."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", per_class={"train": 200, "test": 20}, size=(20, 20))


# --- 1. A trial's worker is killed mid-run --------------------------------------------------------------------


def test_a_killed_trial_worker_is_retried_from_its_checkpoint_and_matches_an_uninterrupted_run(images: Path, tmp_path: Path):
    epochs = 12
    args, experiment = sweep_args(tmp_path, images, f"""
        resources: {{cpu: 1}}
        fixed: {{epochs: {epochs}, checkpoint_every: 1, padding: same, batch_size: 8}}
        space: {{pooling: [max]}}
    """)
    run = Sweep(*args)

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
    # The saved state lags the trial, so the killed worker may have reported epochs past it: count those too.
    last_before_kill = max(r["epoch"] for r in reported if r["pid"] == trial["last"]["pid"])
    assert 1 < retried_from <= last_before_kill + 1, "the retry did not start from a checkpoint"
    loaded = analysis.load(experiment)
    df = loaded.frame
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


def a_checkpoint_saved(experiment: Path) -> Callable[[], bool]:
    def condition() -> bool:
        """a trial with a saved checkpoint"""
        return any(t["last"].get("checkpoint_dir_name") for t in saved_trials(experiment))

    return condition


def test_ctrl_c_stops_cleanly_says_how_to_resume_and_leaves_an_interrupted_sweep(images: Path, tmp_path: Path):
    args, experiment = sweep_args(tmp_path, images, """
        resources: {cpu: 1}
        fixed: {epochs: 30, checkpoint_every: 1, padding: same, batch_size: 8}
        space: {pooling: [max, avg]}
    """, "--max-concurrent", "1")
    run = Sweep(*args)
    wait_for(a_checkpoint_saved(experiment), run)
    run.kill_all(signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole foreground process group
    code, output = run.finish()

    assert code == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "2 trial(s) did not finish; rerun the same command with --resume to continue" in output
    assert "Tuner.restore" not in output and "Token authentication" not in output  # not Ray's advice for Python, nor its notice
    loaded = analysis.load(experiment)
    df = loaded.frame
    # One trial was interrupted; with one trial at a time, Ray had not yet created the other.
    assert list(loaded.context.incomplete.values()) == ["interrupted"]
    assert set(df["status"]) == {"interrupted"} and df["epoch"].tolist() == list(range(1, len(df) + 1))
    assert "2 trials: 1 interrupted, 1 not started." in (experiment / "analysis" / "report.md").read_text()  # every trial of the space


def test_ctrl_c_with_a_trial_still_pending_prints_no_warnings_about_its_missing_results(images: Path, tmp_path: Path):
    """Each trial asks for every CPU, so the second waits, created but never started, when Ctrl-C comes."""
    args, experiment = sweep_args(tmp_path, images, f"""
        resources: {{cpu: {os.cpu_count()}}}
        fixed: {{epochs: 30, checkpoint_every: 1, padding: same, batch_size: 8}}
        space: {{pooling: [max, avg]}}
    """)
    run = Sweep(*args)
    wait_for(a_checkpoint_saved(experiment), run)
    run.kill_all(signal.SIGINT)
    code, output = run.finish()

    assert code == 1 and "PENDING" in output, output[-3000:]
    assert "Failed to fetch metrics" not in output and "Traceback" not in output, output[-3000:]
    assert "2 trial(s) did not finish; rerun the same command with --resume to continue" in output


# --- 2. The driver is killed ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_driver_resumes_optuna_without_rerunning_finished_trials(images: Path, tmp_path: Path):
    samples, epochs = 4, 12  # 0.2 s epochs: a trial runs long enough past its third for a 1-second state save to see it
    args, experiment = sweep_args(tmp_path, images, f"""
        search: optuna
        samples: {samples}
        resources: {{cpu: 1}}
        fixed: {{epochs: {epochs}, checkpoint_every: 1, padding: same, batch_size: 8}}
        space: {{lr: {{loguniform: [1.0e-4, 1.0e-2]}}, pooling: [max, avg]}}
    """, "--max-concurrent", "1")
    kill_driver_then_resume(args, experiment, checkpoints=3)
    loaded = analysis.load(experiment)
    df = loaded.frame
    # The driver may have made the next trial after its last save: the resumed one draws another in its place.
    lost = [trial for trial, status in loaded.context.incomplete.items() if status == analysis.LOST]
    assert len(lost) <= 1 and len(loaded.context.incomplete) == len(lost), loaded.context.incomplete
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
    args, experiment = sweep_args(tmp_path, images, f"""
        resources: {{cpu: 1}}
        fixed: {{epochs: {epochs}, checkpoint_every: 1, padding: same, batch_size: 8}}
        space: {{pooling: [max, avg]}}
    """, "--address", cluster.address)
    run = Sweep(*args)

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
    loaded = analysis.load(experiment)
    df = loaded.frame
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
    args, experiment = sweep_args(tmp_path, images, f"""
        resources: {{cpu: 1}}
        fixed: {{epochs: {epochs}, checkpoint_every: 1, padding: same, batch_size: 8}}
        space: {{pooling: [max]}}
    """)
    run = Sweep(*args)

    def two_checkpoints_saved() -> SavedTrial | None:
        """a trial with two epochs saved"""
        return next((t for t in saved_trials(experiment) if t["last"].get("epoch", 0) >= 2), None)

    wait_for(two_checkpoints_saved, run)
    freeze(experiment.parent)
    try:
        code, output = run.finish()
        loaded = analysis.load(experiment)
        df = loaded.frame
        rewrite = subprocess.run([sys.executable, "-m", "tune_cnn.analysis", str(experiment)], capture_output=True, text=True)
        elsewhere = analysis.write_analysis(experiment, out=tmp_path / "analysis")
    finally:
        thaw(experiment.parent)

    # Ray logs each failed save with its traceback; the command itself must not crash (an uncaught exception's
    # traceback starts in runpy) and ends with one line.
    assert code == 2 and "<frozen runpy>" not in output, output[-3000:]
    assert output.splitlines()[-1].startswith(f"error: cannot write to the experiment folder {experiment} ("), output[-3000:]
    assert "what was saved before is kept, continue with --resume" in output
    assert len(df) >= 2 and df["epoch"].tolist() == list(range(1, len(df) + 1))  # every epoch saved before the fault
    assert rewrite.returncode == 2 and rewrite.stderr.startswith(f"error: cannot write the analysis to {experiment}/analysis")
    assert (elsewhere / "report.md").exists()


# --- 6. Ray's memory monitor kills a trial -------------------------------------------------------------------

MEMORY_HEADROOM = 4 * 2**30  # above the machine's use before the sweep: Ray, the driver, a small trial and others' noise


def memory_threshold(headroom: int) -> str:
    """RAY_memory_usage_threshold at which Ray's memory monitor kills a worker once the machine uses `headroom`
    bytes more than now: Ray reads the node's use as MemTotal - MemAvailable of /proc/meminfo (no cgroup limit here)."""
    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    used = meminfo["MemTotal"] - meminfo["MemAvailable"]
    return f"{(used + headroom) / meminfo['MemTotal']:.4f}"


@pytest.mark.slow  # over a minute on an AVX2-only 2-core CPU: CI's slow step
def test_a_trial_killed_for_memory_is_retried_then_errored_and_the_sweep_goes_on(images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The memory limit is our own: RAY_memory_usage_threshold set to the machine's use now plus MEMORY_HEADROOM
    (4 GiB), checked every 100 ms (RAY_memory_monitor_refresh_ms), so Ray's monitor kills a worker once the node
    uses 4 GiB more than before the sweep, while nothing fills the machine. The big trial (a 300,000-unit dense
    layer, about 8.5 GiB estimated) crosses that while it allocates its first step and is killed each time; the
    small one fits. One trial at a time, big first: the monitor only ever finds the running trial to kill, and Tune
    runs the small trial while the big one waits for its retry."""
    if not Path("/proc/meminfo").exists():
        pytest.skip("needs Linux's /proc/meminfo to set Ray's memory threshold")
    big_units, small_units, epochs = 300_000, 64, 3
    data = load_data(str(images), seed=0)
    big_config = {"epochs": epochs, "checkpoint_every": 1, "padding": "same", "batch_size": 8, "dense_units": big_units}
    needed = trial_memory(TrainConfig.from_flat(big_config), data.shape, data.images).total
    if (available_memory() or 0) < needed + 2**30:  # the sweep would refuse the big trial before Ray starts
        pytest.skip(f"needs {byte_size(needed + 2**30)} of available memory for the big trial's estimate")
    args, experiment = sweep_args(tmp_path, images, f"""
        resources: {{cpu: 1}}
        fixed: {{epochs: {epochs}, checkpoint_every: 1, padding: same, batch_size: 8}}
        space: {{dense_units: [{big_units}, {small_units}]}}
    """, "--max-concurrent", "1")
    monkeypatch.setenv("RAY_memory_usage_threshold", memory_threshold(MEMORY_HEADROOM))
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "100")
    code, output = Sweep(*args).finish()

    assert code == 1, output[-3000:]
    assert "Traceback" not in output and "Caught unexpected exception" not in output, output[-3000:]
    assert "did not finish" not in output, output[-3000:]  # Tune's saved state has the big trial ERROR, not RUNNING
    big = next(p.name for p in experiment.iterdir() if f"dense_units={big_units}_" in p.name)
    small = next(p.name for p in experiment.iterdir() if f"dense_units={small_units}_" in p.name)
    assert f"1 trial(s) errored: {big} (dense_units={big_units}); see error.txt in their folders" in output, output[-3000:]
    assert (f"{big} was killed for memory: about {byte_size(needed)} needed per trial; lower --max-concurrent or ask for "
            f"more CPUs per trial (--cpus-per-trial)") in output, output[-3000:]
    # Tried once and retried MAX_FAILURES times, each try killed by Ray's monitor before its first checkpoint.
    errors = (experiment / big / "error.txt").read_text()
    assert errors.count("Failure # ") == 1 + sweep.MAX_FAILURES, errors[-3000:]
    assert errors.count("were killed due to the node running low on memory") == 1 + sweep.MAX_FAILURES, errors[-3000:]
    assert not reports(experiment, big) and not list((experiment / big).glob("checkpoint_*"))
    loaded = analysis.load(experiment)
    df = loaded.frame
    assert list(loaded.context.incomplete.values()) == ["errored"]
    assert set(df["status"]) == {"finished"} and df["dense_units"].unique().tolist() == [small_units]
    assert df["epoch"].tolist() == list(range(1, epochs + 1))
    assert [r["epoch"] for r in reports(experiment, small)] == list(range(1, epochs + 1))


PRESSURE_CHUNK = 2**26


def alive(pid: int) -> bool:
    """Whether a process runs: not gone, nor a zombie that its parent has yet to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@pytest.mark.slow  # over a minute on an AVX2-only 2-core CPU: CI's slow step
def test_a_trial_killed_for_memory_mid_run_is_retried_from_its_checkpoint(images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The same memory limit of our own (RAY_memory_usage_threshold at the machine's use now plus MEMORY_HEADROOM);
    the trial fits it until, past its second checkpoint, this test takes up to MEMORY_HEADROOM and 1 GiB more (the
    touched pages of NumPy arrays, a chunk at a time): the node is then low on memory and Ray's monitor kills the one
    worker it may, the trial's. The test stops taking memory and frees it once that worker's process is gone, before
    the retry starts, which then has room again."""
    if not Path("/proc/meminfo").exists():
        pytest.skip("needs Linux's /proc/meminfo to set Ray's memory threshold")
    pressure_bytes = MEMORY_HEADROOM + 2**30
    if (available_memory() or 0) < pressure_bytes + 2 * 2**30:
        pytest.skip(f"needs {byte_size(pressure_bytes + 2 * 2**30)} of available memory to press the node")
    epochs = 60  # 0.2 s epochs: the trial still runs while the test takes its memory, a second or two
    args, experiment = sweep_args(tmp_path, images, f"""
        resources: {{cpu: 1}}
        fixed: {{epochs: {epochs}, checkpoint_every: 1, padding: same, batch_size: 8}}
        space: {{pooling: [max]}}
    """)
    monkeypatch.setenv("RAY_memory_usage_threshold", memory_threshold(MEMORY_HEADROOM))
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "100")
    run = Sweep(*args)

    def running_past_epoch_2() -> SavedTrial | None:
        """a running trial with two epochs saved"""
        return next((t for t in saved_trials(experiment) if t["status"] == "RUNNING" and 2 <= t["last"].get("epoch", 0) < epochs), None)

    trial = wait_for(running_past_epoch_2, run)
    worker = trial["last"]["pid"]
    pressure: list[np.ndarray] = []  # taken a chunk at a time, to stop as soon as the monitor has killed the worker
    try:
        while alive(worker) and len(pressure) * PRESSURE_CHUNK < pressure_bytes:
            pressure.append(np.ones(PRESSURE_CHUNK, dtype=np.uint8))
        wait_for(lambda: not alive(worker), run)
    finally:
        pressure.clear()
    code, output = run.finish()

    assert code == 0, output[-3000:]
    assert "Traceback" not in output and "Caught unexpected exception" not in output, output[-3000:]
    assert "killed for memory: 1 worker(s) were killed due to the node running low on memory" in output, output[-3000:]
    errors = (experiment / trial["folder"] / "error.txt").read_text()
    assert errors.count("Failure # ") == 1 and "were killed due to the node running low on memory" in errors, errors[-3000:]
    reported = reports(experiment, trial["folder"])
    assert len({r["pid"] for r in reported}) == 2, "the trial was not retried in a new worker"
    retried_from = next(r["epoch"] for r in reported if r["pid"] != worker)
    last_before_kill = max(r["epoch"] for r in reported if r["pid"] == worker)
    assert 1 < retried_from <= last_before_kill + 1, "the retry did not start from a checkpoint"
    df = analysis.load(experiment).frame
    assert df["epoch"].tolist() == list(range(1, epochs + 1)) and set(df["status"]) == {"finished"}
