"""The sweep command: a grid end to end, Optuna with ASHA, resume after a killed driver, dry runs, bad input.

Tests that run trials in this process share one small Ray session; the command-line tests start their own.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tune_cnn import analysis, sweep
from tune_cnn.analysis.__main__ import main as analysis_main
from tune_cnn.errors import ConfigError
from tune_cnn.experiment import CHECKPOINT_REPORTS, CLAIM_FILE, ExperimentFolder, Storage
from tune_cnn.models import FAMILIES, Family, ModelSize
from tune_cnn.space import load_space

from conftest import Sweep, epochs_per_trial, kill_driver_then_resume, make_image_folder, reports, s3_bucket, sweep_args, wait_for, write_space

pytestmark = pytest.mark.usefixtures("decode_cache")
QUICK_TRIALS = 4


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", per_class={"train": 40, "test": 10}, size=(20, 20))


@pytest.fixture(scope="module")
def ray_session():
    """One Ray session for the in-process sweeps: `sweep.main` joins it instead of starting its own."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tune_cnn.sweep", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def trial_results(experiment: Path) -> dict[str, list[dict]]:
    """Each trial folder's reported results, in order."""
    folders = sorted(p.name for p in experiment.iterdir() if (p / "result.json").exists())
    return {folder: reports(experiment, folder) for folder in folders}


def test_trial_seed_depends_on_sweep_seed_and_settings_only():
    settings = {"pooling": "max", "conv_width": 3}
    assert sweep.trial_seed(0, settings) == sweep.trial_seed(0, dict(reversed(settings.items())))
    assert sweep.trial_seed(0, settings) != sweep.trial_seed(1, settings)
    assert sweep.trial_seed(0, settings) != sweep.trial_seed(0, {**settings, "conv_width": 5})


def test_trial_processes_print_no_stop_signal_from_a_weakref_callback_but_every_other_error():
    code = ("import sys, weakref; from tune_cnn.sweep import quiet_interrupts_in_callbacks; "
            "sys.unraisablehook = quiet_interrupts_in_callbacks\n"
            "class A: pass\n"
            "def interrupted(_): raise KeyboardInterrupt\n"
            "def terminated(_): raise SystemExit(1)\n"
            "def failed(_): raise ValueError('still printed')\n"
            "a, b, c = A(), A(), A()\n"
            "refs = [weakref.ref(a, interrupted), weakref.ref(b, terminated), weakref.ref(c, failed)]; del a, b, c")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "KeyboardInterrupt" not in run.stderr and "SystemExit" not in run.stderr
    assert "ValueError: still printed" in run.stderr


def test_quick_space_end_to_end_from_the_command_line(images: Path, tmp_path: Path):
    storage = tmp_path / "results"
    done = run_cli("quick", "--data", str(images), "--subset", "60", "--storage", str(storage), "--max-concurrent", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = storage / "quick"
    results = trial_results(experiment)
    assert len(results) == QUICK_TRIALS == load_space("quick").trial_count
    assert len({history[-1]["pid"] for history in results.values()}) < QUICK_TRIALS  # later trials reuse the first ones' processes
    for name, history in results.items():
        assert [r["epoch"] for r in history] == [1, 2], name
        assert {"val_acc", "val_loss", "test_acc", "trial_seed", "node_id"} <= set(history[-1])
        checkpoints = sorted(p.name for p in (experiment / name).glob("checkpoint_*"))
        assert len(checkpoints) == 2 and all((experiment / name / c / "checkpoint.pt").exists() for c in checkpoints)
        for epoch, checkpoint in enumerate(checkpoints, start=1):  # every report so far, as result.json has them
            saved = json.loads((experiment / name / checkpoint / CHECKPOINT_REPORTS).read_text())
            assert saved["reports"] == [{k: r[k] for k in saved["reports"][0]} for r in history[:epoch]]
            assert saved["params"] == json.loads((experiment / name / "params.json").read_text())
        assert (experiment / name / "progress.csv").exists() and not list((experiment / name).glob("events.out.tfevents*"))
    settings = {(h[-1]["config"]["pooling"], h[-1]["config"]["conv_width"]) for h in results.values()}
    assert settings == {(p, w) for p in ("max", "avg") for w in (3, 5)}
    metadata = json.loads((experiment / "tune_cnn.json").read_text())
    assert metadata["swept"] == ["pooling", "conv_width"] and metadata["checkpoint_epochs"] == [1, 2]
    assert metadata["space_yaml"] == load_space("quick").text and metadata["sweep_seed"] == 0
    assert "best trials by val_acc" in done.stdout and f"experiment: {experiment}" in done.stdout
    assert "notice: the Ray cluster has no GPU" in done.stdout  # quick asks for `gpu: auto`
    report = (experiment / "analysis" / "report.md").read_text()  # the learner's questions, answered on a real sweep
    for words in ("## The seed's findings, checked", "- Pooling hardly matters: ", "- Smaller windows do better: ", "- Why validation loss rises",
                  "- Cost of pooling ", "](right_and_wrong.png)", "](reliability.png)", "](cost.png)", "Experiment: `quick`."):
        assert words in report, words
    progress = [line for line in done.stdout.splitlines() if line.startswith("progress: ")]
    assert progress and progress[-1].startswith("progress: 4 of 4 trials done, 8 of 8 epochs; about 0 s left at ")


def test_dry_run_lists_exactly_the_trials_and_starts_nothing(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    storage = tmp_path / "results"
    code = sweep.main(["seed", "--data", str(images), "--storage", str(storage), "--dry-run", "--epochs", "3"])
    out = capsys.readouterr().out
    assert code == 0
    trials = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("trial ")]
    expected = [f"pooling={p}, conv_width={w}" for p, w in ((t["pooling"], t["conv_width"]) for t in load_space("seed").listed_trials())]
    assert trials == expected and len(trials) == 6
    assert "epochs=3" in out and "resources per trial: cpu 1, gpu auto" in out and "notice" not in out
    assert not storage.exists()
    (storage / "seed").mkdir(parents=True)
    (storage / "seed" / "tuner.pkl").write_bytes(b"")
    assert sweep.main(["seed", "--data", str(images), "--storage", str(storage), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (f"notice: experiment {storage / 'seed'} already exists; "
                                                        f"the run needs --resume to continue it, or another --name")


def test_dry_run_estimates_the_sweeps_time_from_a_few_timed_steps(images: Path, capsys: pytest.CaptureFixture):
    assert sweep.main(["seed", "--data", str(images), "--dry-run", "--epochs", "3"]) == 0
    estimate = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("time estimate: "))
    assert re.fullmatch(r"time estimate: about \d+ s for 6 trial\(s\), 2 at a time with 1 CPU thread\(s\) each; from 20 timed steps of "
                        r"each of 6 distinct trial\(s\) alone on this machine \(\d+ s\)", estimate), estimate


def test_dry_run_prints_the_spaces_notices(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    space = write_space(tmp_path, "space: {optimizer: [adam, sgd], momentum: [0.0, 0.9]}\n")
    assert sweep.main([str(space), "--data", str(images), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "notice: Adam ignores momentum: trials with optimizer adam that differ only in momentum train alike"


@pytest.mark.parametrize("storage, words", [
    ("s3://tune-cnn-test-no-such-bucket-7/results", "error: cannot reach the experiment folder s3://tune-cnn-test-no-such-bucket-7/results/quick ("),
    ("foo://bar", "error: --storage foo://bar is neither a folder nor a URI that pyarrow opens"),
])
def test_storage_that_cannot_be_reached_is_one_line_before_ray_starts(images: Path, storage: str, words: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as stop:
        sweep.main(["quick", "--data", str(images), "--subset", "60", "--storage", storage])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(words) and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_on_a_cluster_without_gpus_is_one_line_and_runs_nothing(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    space = write_space(tmp_path, "fixed: {epochs: 1, device: cuda}\nresources: {gpu: 1}\nspace: {pooling: [max]}\n")
    with pytest.raises(SystemExit) as stop:
        sweep.main([str(space), "--data", str(images), "--subset", "60", "--storage", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == "error: the space sets device cuda and the Ray cluster has no GPU; set device auto to run the trials on CPUs\n"
    assert not (tmp_path / "results").exists()


def test_dry_run_of_an_optuna_space_shows_its_distributions(images: Path, capsys: pytest.CaptureFixture):
    assert sweep.main(["optuna", "--data", str(images), "--dry-run", "--samples", "7", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "7 trial(s) drawn by Optuna TPE (seed 5)" in out and "lr: loguniform[0.0001, 0.003]" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope"], "search space 'nope' not found"),
        (["BAD"], "space.dropout: dropout 1.5 is out of range"),
        (["WIDE"], "conv_width=7: conv_width 7 with valid padding shrinks a 20x20 image"),
        (["quick", "--samples", "3"], "samples (set on the command line): applies to optuna search only"),
        (["quick", "--gpus-per-trial", "-1"], "resources.gpu (set on the command line): -1.0 is not allowed"),
        (["quick", "--epochs", "0"], "fixed.epochs (set on the command line): epochs 0 is out of range"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args, message):
    spaces = {"BAD": "space: {dropout: [0.0, 1.5]}\n", "WIDE": "space: {conv_width: [3, 7]}\n"}
    if args[0] in spaces:
        args = [str(write_space(tmp_path, spaces[args[0]], f"{args[0]}.yaml")), *args[1:]]
    storage = tmp_path / "results"
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([*args, "--data", str(images), "--subset", "30", "--storage", str(storage)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not storage.exists()


def test_storage_under_a_file_is_one_line(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        sweep.main(["quick", "--data", str(images), "--subset", "30", "--storage", str(tmp_path / "notes.txt" / "results")])
    assert stop.value.code == 2 and capsys.readouterr().err == (
        f"error: --storage {tmp_path / 'notes.txt' / 'results'}: {tmp_path / 'notes.txt'} is a file; "
        f"pass a folder for the experiments (it is made if missing)\n")


def test_an_s3_uri_with_options_serves_the_sweep_and_the_analysis_alike(images: Path, tmp_path: Path, s3_server: str):
    """s3://BUCKET/PATH?endpoint_override=...&scheme=http, as a user gives a server of their own: the experiment's folder
    and the analysis's go before the options, and the claim is gone once the sweep ends."""
    options = s3_bucket(s3_server, "sweeps")
    run = run_cli("quick", "--data", str(images), "--subset", "30", "--epochs", "1", "--storage", f"s3://sweeps/experiments?{options}")
    assert run.returncode == 0, run.stderr[-3000:]
    experiment = f"s3://sweeps/experiments/quick?{options}"
    assert f"experiment: {experiment}\n" in run.stdout and f"analysis: s3://sweeps/experiments/quick/analysis?{options}\n" in run.stdout
    loaded = analysis.load(experiment)
    assert loaded.frame["trial_id"].nunique() == QUICK_TRIALS and set(loaded.frame["status"]) == {"finished"}
    analysis_main([experiment, "--out", str(tmp_path / "analysis")])
    assert (tmp_path / "analysis" / "report.md").read_text().startswith("# Analysis of quick\n")
    assert Storage.open(experiment).kind(CLAIM_FILE) == "missing"


def test_a_missing_bucket_is_one_line_saying_to_create_it(images: Path, s3_server: str, capsys: pytest.CaptureFixture):
    storage = f"s3://no-such-bucket/experiments?endpoint_override={s3_server}&scheme=http"
    with pytest.raises(SystemExit) as stop:
        sweep.main(["quick", "--data", str(images), "--subset", "30", "--storage", storage])
    assert stop.value.code == 2 and capsys.readouterr().err == (
        f"error: the experiment folder s3://no-such-bucket/experiments/quick?endpoint_override={s3_server}&scheme=http: the bucket "
        f"no-such-bucket does not exist; create it (for example with `aws s3 mb`), or correct the bucket in --storage\n")


def test_an_existing_experiment_needs_resume_or_another_name(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "results" / "quick").mkdir(parents=True)
    (tmp_path / "results" / "quick" / "tuner.pkl").write_bytes(b"")  # an empty folder, or one with only a claim, is free
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["quick", "--data", str(images), "--subset", "30", "--storage", str(tmp_path / "results")])
    assert exit_info.value.code == 2
    assert "already exists; add --resume to continue it or choose another --name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["quick", "--data", str(images), "--subset", "30", "--storage", str(tmp_path / "elsewhere"), "--resume"])
    assert "no experiment to resume" in capsys.readouterr().err


def test_optuna_with_asha_stops_weak_trials_early(ray_session, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    # val_loss, unlike accuracy on a few images, has no ties, so ASHA's cut is clear-cut.
    space = write_space(tmp_path, """
        search: optuna
        metric: val_loss
        samples: 8
        scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
        resources: {cpu: 1, gpu: 0.5}
        fixed: {epochs: 4, checkpoint_every: 2, padding: same, filters: [8, 8, 8]}
        space:
          pooling: [max, avg]
          lr: {loguniform: [1.0e-5, 3.0e-2]}
          dropout: {uniform: [0.0, 0.5]}
          dense_units: {int: [8, 32]}
    """)
    storage = tmp_path / "results"
    # One trial at a time: ASHA cuts a trial by the results already at its rung, so which trials it stops depends on
    # the order their results arrive; two at once, that order moved with the trials' start-up times.
    code = sweep.main([str(space), "--data", str(images), "--subset", "90", "--storage", str(storage), "--seed", "1",
                       "--max-concurrent", "1", "--tensorboard"])
    out = capsys.readouterr().out
    assert code == 0
    assert "notice: the Ray cluster has no GPU; running the trials on CPUs only (gpu 0.5 per trial was asked for)" in out
    results = trial_results(storage / "space")
    assert len(results) == 8
    configs = [tuple(h[-1]["config"][k] for k in ("pooling", "lr", "dropout", "dense_units")) for h in results.values()]
    assert len(set(configs)) == 8
    assert all(8 <= c[3] <= 32 and 1e-5 <= c[1] <= 3e-2 for c in configs)
    last_epochs = [h[-1]["epoch"] for h in results.values()]
    assert min(last_epochs) < 4 and max(last_epochs) == 4, last_epochs
    assert all(list((storage / "space" / name).glob("events.out.tfevents*")) for name in results)  # --tensorboard


def test_a_steps_sweep_runs_each_step_and_the_analysis_says_what_each_bought(ray_session, images: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture):
    args, experiment = sweep_args(tmp_path, images, """
        search: steps
        fixed: {epochs: 2, padding: same, filters: [8, 8, 8]}
        space:
          - {}
          - {batch_norm: true}
          - {augment: flip, lr: 0.003}
    """, "--subset", "90")
    assert sweep.main([*args, "--dry-run"]) == 0
    assert "trial 1: the fixed settings and defaults\ntrial 2: + batch_norm=True\ntrial 3: + augment=flip, lr=0.003" in capsys.readouterr().out
    assert sweep.main(args) == 0
    configs = sorted((h[-1]["config"]["batch_norm"], h[-1]["config"]["augment"], h[-1]["config"]["lr"]) for h in trial_results(experiment).values())
    assert configs == [(False, "none", 0.001), (True, "flip", 0.003), (True, "none", 0.001)]
    loaded = analysis.load(experiment)
    assert loaded.context.metadata.steps == [{}, {"batch_norm": True}, {"augment": "flip", "lr": 0.003}]
    steps = pd.read_csv(experiment / "analysis" / "steps.csv")
    last = loaded.frame[loaded.frame["epoch"] == 2].set_index("trial_id")
    assert list(steps["step"]) == [1, 2, 3] and list(steps["change"]) == ["(the first trial)", "batch_norm=True", "augment=flip, lr=0.003"]
    for row in steps.itertuples():
        trial = last.loc[row.trial_id]
        assert (trial["batch_norm"], trial["augment"], trial["lr"]) == [(False, "none", 0.001), (True, "none", 0.001), (True, "flip", 0.003)][row.step - 1]
        assert row.test_acc == trial["test_acc"] and row.val_acc == trial["val_acc"]
        assert row.seconds == pytest.approx(loaded.frame.loc[loaded.frame["trial_id"] == row.trial_id, "epoch_seconds"].sum())
    assert steps["gain"].iloc[1:].tolist() == pytest.approx(steps["test_acc"].diff().iloc[1:].tolist()) and math.isnan(steps["gain"].iloc[0])
    assert "## What each step bought" in (experiment / "analysis" / "report.md").read_text()


def test_mlflow_holds_every_trial_as_a_run_with_its_settings_and_every_epochs_metrics(ray_session, images: Path, tmp_path: Path):
    """Read back with MLflow's own client: one run per trial in an experiment named after the sweep, the trial's
    settings as parameters, and each epoch's metrics at steps 1, 2, 3, as the experiment folder has them."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args, experiment = sweep_args(tmp_path, images, """
        fixed: {epochs: 3, padding: same, filters: [8, 8, 8]}
        space: {pooling: [max, avg]}
    """, "--subset", "60", "--name", "tracked", "--mlflow", store)
    assert sweep.main(args) == 0
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    folder = experiment.parent / "tracked"
    by_name = trial_results(folder)
    assert len(runs) == len(by_name) == 2
    for run in runs:
        history = next(h for name, h in by_name.items() if name.startswith(run.info.run_name))
        config = history[-1]["config"]
        assert run.data.params["pooling"] == config["pooling"] and run.data.params["epochs"] == "3" and run.info.status == "FINISHED"
        for metric in ("val_acc", "val_loss", "train_acc", "test_acc"):
            logged = [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]
            assert logged == [(r["epoch"], pytest.approx(r[metric])) for r in history]


def test_mlflow_without_mlflow_installed_is_one_line_saying_what_to_install(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # importlib finds no such module
    args, experiment = sweep_args(tmp_path, images, "fixed: {epochs: 1}\n", "--mlflow", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(SystemExit) as caught:
        sweep.main(args)
    assert caught.value.code == 2
    assert capsys.readouterr().err == "error: --mlflow needs MLflow, which is not installed here; pip install -e '.[mlflow]' (or pip install mlflow)\n"
    assert not experiment.exists() and not (tmp_path / "mlflow.db").exists()


def test_an_mlflow_uri_that_mlflow_cannot_track_to_is_one_line_before_ray_starts(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    args, experiment = sweep_args(tmp_path, images, "fixed: {epochs: 1}\n", "--mlflow", "bogus://nowhere")
    with pytest.raises(SystemExit) as caught:
        sweep.main(args)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --mlflow bogus://nowhere: MLflow cannot track there (") and len(err.splitlines()) == 1, err
    assert err.endswith("); give a tracking URI such as sqlite:///mlflow.db or http://HOST:5000\n") and not experiment.exists()


def test_errored_trials_exit_1_and_are_named(ray_session, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch):
    # A model family known to the driver only (registered in a script, not in a module the trials import)
    # passes the driver's checks and fails inside the trial, after its retries.
    monkeypatch.setitem(FAMILIES, "driver_only_cnn", Family(lambda config, shape: None, lambda config, shape: ModelSize(1, 1), "driver_only_module:build"))
    space = write_space(tmp_path, """
        fixed: {epochs: 1, model: driver_only_cnn, padding: same}
        space: {pooling: [max]}
    """)
    code = sweep.main([str(space), "--data", str(images), "--subset", "30", "--storage", str(tmp_path / "results")])
    captured = capsys.readouterr()
    assert code == 1
    assert "1 trial(s) errored: run_trial_" in captured.err and "(pooling=max)" in captured.err


def test_a_rerun_gives_the_same_numbers(ray_session, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    # 1e-3 is a string to YAML (its floats need a dot); the space reads it as the float it means, everywhere
    space = write_space(tmp_path, """
        fixed: {epochs: 1, padding: same, weight_decay: 1e-4}
        space: {lr: [1e-3, 0.003]}
    """)
    for name in ("first", "second"):
        assert sweep.main([str(space), "--data", str(images), "--storage", str(tmp_path / "results"), "--name", name, "--seed", "7"]) == 0
    runs = [trial_results(tmp_path / "results" / name) for name in ("first", "second")]
    numbers = [sorted((h[-1]["config"]["lr"], h[-1]["trial_seed"], h[-1]["val_loss"]) for h in run.values()) for run in runs]
    assert numbers[0] == numbers[1]
    assert numbers[0][0][1] != numbers[0][1][1]  # the two trials got different seeds
    df = analysis.load(tmp_path / "results" / "first").frame
    assert sorted(df["lr"].unique()) == [0.001, 0.003] and set(df["weight_decay"]) == {0.0001}
    with pytest.raises(SystemExit):
        sweep.main([str(space), "--data", str(images), "--storage", str(tmp_path / "results"), "--name", "first", "--seed", "7",
                    "--epochs", "2", "--resume"])
    assert capsys.readouterr().err == (f"error: experiment {tmp_path / 'results' / 'first'} was started otherwise (epochs 1, now 2); "
                                       f"resume it with the same space and options\n")
    # A dry run of a resume checks it too; the same data spelt another way (relative) is the same data
    relative = os.path.relpath(images)
    resume = [str(space), "--data", relative, "--storage", str(tmp_path / "results"), "--seed", "7", "--resume", "--dry-run"]
    assert sweep.main([*resume, "--name", "first"]) == 0
    for name, option, error in (("nosuch", [], "no experiment to resume at"), ("first", ["--epochs", "2"], "was started otherwise (epochs 1")):
        with pytest.raises(SystemExit):
            sweep.main([*resume, "--name", name, *option])
        assert error in capsys.readouterr().err
    experiment = ExperimentFolder.for_sweep(str(tmp_path / "results"), "first")
    stored = experiment.metadata()
    assert stored.data == str(images.resolve()) and stored.samples == 1
    with pytest.raises(ConfigError, match=r"was started otherwise \(samples 1, now 8\)"):
        experiment.check_start(resume=True, metadata=dataclasses.replace(stored, samples=8))  # Tune's restore would keep 1, and --resume loop


def test_resume_after_the_driver_is_killed_finishes_without_rerunning(images: Path, tmp_path: Path):
    epochs = 20  # with batch 2, a trial lasts a few seconds: long enough to be caught mid-run
    args, experiment = sweep_args(tmp_path, images, f"""
        resources: {{cpu: 1}}
        fixed: {{epochs: {epochs}, checkpoint_every: 1, padding: same, batch_size: 2}}
        space: {{pooling: [max, avg], conv_width: [3, 5]}}
    """, "--max-concurrent", "1")
    kill_driver_then_resume(args, experiment, checkpoints=2)
    assert not list(experiment.rglob("events.out.tfevents*"))  # the resumed run, too, writes no TensorBoard files unasked
    df = analysis.load(experiment).frame
    assert set(df["status"]) == {"finished"}
    assert epochs_per_trial(df) == [list(range(1, epochs + 1))] * QUICK_TRIALS


def test_two_sweeps_of_one_name_started_together_run_it_once_and_a_resume_waits_for_the_driver(images: Path, tmp_path: Path):
    """Both start at the same moment with the same --name and --storage: one runs the sweep; the other stops with one
    line naming the driver that holds the experiment, and so does a --resume while that driver runs."""
    args, experiment = sweep_args(tmp_path, images, """
        resources: {cpu: 1}
        fixed: {epochs: 30, padding: same, batch_size: 4}
        space: {pooling: [max, avg]}
    """)
    runs = [Sweep(*args), Sweep(*args)]
    loser = wait_for(lambda: next((run for run in runs if not run.running()), None))
    winner = next(run for run in runs if run is not loser)
    code, output = loser.finish()
    assert code == 2 and output.count("\n") == 1, output
    assert output.startswith(f"error: experiment {experiment} is in use by another sweep's driver (pid {winner.process.pid} on "), output
    wait_for(lambda: (experiment / "tuner.pkl").is_file(), winner)
    resume = run_cli(*args, "--resume")
    assert resume.returncode == 2 and resume.stderr.startswith(f"error: experiment {experiment} is in use by another sweep's driver"), resume.stderr
    code, output = winner.finish()
    assert code == 0, output[-3000:]
    df = analysis.load(experiment).frame
    assert df.groupby("trial_id")["pooling"].first().sort_values().tolist() == ["avg", "max"]  # each configuration once
    assert epochs_per_trial(df) == [list(range(1, 31))] * 2


def test_the_progress_line_counts_trials_and_epochs_and_paces_what_is_left():
    from types import SimpleNamespace

    from tune_cnn.progress import Plan, progress_line

    plan = Plan(trials=4, epochs=40, early_stopping=False)
    trials = [SimpleNamespace(status="TERMINATED", last_result={"epoch": 10, "epoch_seconds": 12.0}),
              SimpleNamespace(status="RUNNING", last_result={"epoch": 4, "epoch_seconds": 8.0}),
              SimpleNamespace(status="RUNNING", last_result={"epoch": 2, "epoch_seconds": 10.0}),
              SimpleNamespace(status="PENDING", last_result={})]
    # 16 of 40 epochs: 24 left at 10 s each (the mean of the three timed), two trials at a time: 120 s.
    assert progress_line(plan, trials) == "progress: 1 of 4 trials done, 16 of 40 epochs; about 2 min left at 10.0 s per epoch, 2 trials at a time"
    assert progress_line(plan, trials[3:]) is None  # nothing timed yet
    asha = Plan(trials=4, epochs=40, early_stopping=True)
    assert "16 of at most 40 epochs" in progress_line(asha, trials)
