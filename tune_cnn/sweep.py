"""Run a search space as one Ray Tune sweep, on a laptop or a Ray cluster.

    python -m tune_cnn.sweep [SPACE] [--data ...] [--storage DIR|s3://...] [--address auto] [--resume] [--dry-run]

The driver checks the space and the models against the data before Ray starts, loads and decodes the data
once and hands it to every trial through Ray's object store, records the sweep in its experiment folder
(tune_cnn.experiment) and lets Ray Tune schedule, checkpoint, retry and resume the trials. At the end it writes
the analysis (tune_cnn.analysis) and prints its best trials.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tune_cnn.claim import Claim
from tune_cnn.cluster import ray_session, trial_resources, warn_if_storage_is_not_shared
from tune_cnn.config import TrainConfig, from_environment
from tune_cnn.data import DATA_HELP, DataSplits, load_data
from tune_cnn.errors import CommandParser, ConfigError, TuneCnnError, byte_size, exit_on_user_error, first_line
from tune_cnn.experiment import ExperimentFolder, Metadata, comparable_data, save_reports, saved_reports
from tune_cnn.memory import check_sweep_memory, trial_memory
from tune_cnn.progress import Plan, estimate, with_progress
from tune_cnn.space import AUTO_GPU_PER_TRIAL, Distribution, SearchSpace, load_space, space_names

PROGRESS_METRICS = ("epoch", "val_acc", "val_loss")
MAX_FAILURES = 2  # retries per trial, each from the trial's last checkpoint


# --- The trainable (runs in a Ray worker) ------------------------------------------------------------------


# Settings that do not change what a trial's epochs compute: the same trial with more epochs repeats the first ones.
NOT_IN_TRIAL_SEED = ("epochs", "checkpoint_every", "eval_batch_size")
TRACEBACK = "Traceback (most recent call last):"  # a traceback's first line, as Python prints it


def trial_seed(sweep_seed: int, settings: dict[str, Any]) -> int:
    """A trial's seed from the sweep seed and its settings, so a rerun of the sweep gives the same numbers."""
    seeded = {name: value for name, value in settings.items() if name not in NOT_IN_TRIAL_SEED}
    key = json.dumps({"sweep_seed": sweep_seed, "settings": seeded}, sort_keys=True, default=str)
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % (2**31)


def run_trial(params: dict[str, Any], data: DataSplits, sweep_seed: int, threads: int) -> None:
    """A Ray Tune function trainable: one config, resumed from Tune's checkpoint after a failure or restore."""
    # Torch and the engine load here, in the trial's process only: the sweep's driver never imports torch.
    import ray
    import torch
    from ray import tune

    from tune_cnn.checkpoints import load_checkpoint
    from tune_cnn.train import train

    sys.unraisablehook = quiet_interrupts_in_callbacks
    torch.set_num_threads(threads)
    # Ray logs a line per saved checkpoint; the progress table already shows each trial's epoch.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    keep_storage_errors_short()  # an upload that fails, logged by Ray's syncer in this process
    seed = trial_seed(sweep_seed, params)
    config = TrainConfig.from_flat({**params, "seed": seed})
    resume, reports = None, []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume, reports = load_checkpoint(Path(folder)), saved_reports(Path(folder))
    # Where a trial ran and with which seed, for clusters and for reruns.
    extra = {"trial_seed": seed, "node_id": ray.get_runtime_context().get_node_id()}

    def report(metrics: dict[str, float], folder: Path | None) -> None:
        reports.append({**metrics, **extra})
        if folder:
            save_reports(folder, params, reports)
        # A copy: Ray adds its own fields to the dict it is given (_TrainSession._auto_fill_metrics).
        tune.report(dict(reports[-1]), checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)

    train(config, data, report, resume)


def quiet_interrupts_in_callbacks(unraisable: Any) -> None:
    """sys.unraisablehook for a trial's process. A signal that stops the process can land in a weakref callback
    or a finaliser, which Python then prints as an ignored exception with its traceback: Ctrl-C, which reaches
    every process of the terminal's group (a KeyboardInterrupt, seen once in tests/test_reliability.py's Ctrl-C
    test), and the SIGTERM with which Ray ends a finished sweep's trial actors (a SystemExit from Ray's handler,
    seen at the end of an H100 seed sweep). Other errors print as before."""
    if not issubclass(unraisable.exc_type, (KeyboardInterrupt, SystemExit)):
        sys.__unraisablehook__(unraisable)


# --- Command line ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(
        prog="python -m tune_cnn.sweep",
        description="Run a search space as a Ray Tune sweep. Spaces: " + ", ".join(space_names()) + ", or a YAML path.",
    )
    parser.add_argument("space", nargs="?", default="seed", help="a space name from search_spaces/ or a YAML file (default: seed)")
    parser.add_argument("--data", default=None, help=DATA_HELP)
    parser.add_argument("--storage", default=from_environment("TUNE_CNN_STORAGE", "./tune_results"),
                        help="experiments folder, or a URI such as s3://bucket/path (default: $TUNE_CNN_STORAGE, else ./tune_results)")
    parser.add_argument("--name", default=None, help="experiment name (default: the space's name)")
    parser.add_argument("--epochs", type=int, help="override the space's epochs")
    parser.add_argument("--subset", type=int, help="train on a stratified subset of N images")
    parser.add_argument("--samples", type=int, help="number of Optuna trials")
    parser.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (also its torch threads)")
    parser.add_argument("--gpus-per-trial", type=_gpu_amount, help="GPUs per trial: 0, a fraction such as 0.5, a whole number, or auto")
    parser.add_argument("--max-concurrent", type=int, help="run at most N trials at once")
    parser.add_argument("--address", default=None, help="join a running Ray cluster (auto on its head node)")
    parser.add_argument("--seed", type=int, help="sweep seed (trial seeds and the Optuna sampler derive from it)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted experiment of this name")
    parser.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files in each trial's folder")
    parser.add_argument("--mlflow", metavar="URI", help="also log every trial as a run of an MLflow experiment named after the "
                        "sweep, at this tracking URI (sqlite:///FILE.db, or a server's http://HOST:PORT); needs pip install -e '.[mlflow]'")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and their resources, then exit without starting Ray")
    return parser.parse_args(argv)


def _gpu_amount(text: str) -> float | str:
    """A number, or the text as given: `auto` is valid, anything else fails the space's check in one line."""
    try:
        return float(text)
    except ValueError:
        return text


def space_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's changes to the space; the space's own checks cover their types and ranges."""
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        overrides["fixed"] = {"epochs": args.epochs}
    resources = {k: v for k, v in (("cpu", args.cpus_per_trial), ("gpu", args.gpus_per_trial)) if v is not None}
    if resources:
        overrides["resources"] = resources
    for key in ("subset", "samples", "seed"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return overrides


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    space = load_space(args.space, space_overrides(args))
    data = load_data(args.data, subset=space.subset, seed=space.seed)
    space.check_models(data.shape)
    memory = check_sweep_memory(space, data.shape, data.images, args.max_concurrent) if args.address is None else None
    for notice in space.notices:
        print(notice)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {args.max_concurrent} is not allowed; use 1 or more, or leave it out for no limit")
    if args.mlflow and importlib.util.find_spec("mlflow") is None:
        raise ConfigError("--mlflow needs MLflow, which is not installed here; pip install -e '.[mlflow]' (or pip install mlflow)")
    experiment = ExperimentFolder.for_sweep(args.storage, space.name if args.name is None else args.name)
    metadata = sweep_metadata(space, data)
    if args.dry_run:
        if args.resume:  # storage that cannot be reached, or a resume that would fail, is one line before the listing
            experiment.check_start(resume=True, metadata=metadata)
        exists = not args.resume and experiment.holds_a_sweep()
        print(describe_trials(space, data))
        print(memory or "memory: not estimated for a cluster's nodes", flush=True)
        print(estimate(space, data, args.max_concurrent), flush=True)
        if exists:
            print(f"notice: experiment {experiment.location} already exists; the run needs --resume to continue it, or another --name")
        return 0
    if args.resume:  # before the claim, which would make the folder of an experiment that is not there
        experiment.check_start(resume=True, metadata=metadata)
    if args.mlflow:
        check_mlflow_store(args.mlflow)
    with experiment.storage.lost_mid_sweep(), Claim(experiment.storage).take() as claim:  # one driver per experiment: a second sweep or resume stops here
        experiment.check_start(resume=args.resume, metadata=metadata)
        print(data.describe(), flush=True)
        from tune_cnn.analysis.plots import plot_workers  # not before: a bad input's one line comes without pandas

        # The results and the analysis come before Ray's shutdown, which waits 1-1.5 s for its processes to exit.
        # One by each swept setting, by epoch, the learning curves, the effects, right and wrong answers, reliability, cost.
        plots = len(space.swept) + 6
        with ray_session(args.address), plot_workers(plots) as plotters:
            results = run_sweep(space, data, experiment, metadata, args)
            claim.release()  # no trial runs now: the analysis reads an interrupted sweep's trials as interrupted
            experiment.check_writable()  # trials that could not save have errored; say why, once
            return report_results(results, space, data, experiment, plotters)


def check_mlflow_store(uri: str) -> None:
    """--mlflow's tracking URI opened once before Ray starts, so that one MLflow cannot use is one line, not a
    traceback from inside the tuner."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except (MlflowException, OSError) as error:  # a scheme MLflow has no store for, a store it cannot open
        raise ConfigError(f"--mlflow {uri}: MLflow cannot track there ({first_line(error)}); give a tracking URI such as "
                          f"sqlite:///mlflow.db or http://HOST:5000") from None


def sweep_metadata(space: SearchSpace, data: DataSplits) -> Metadata:
    """What the analysis needs to read the experiment folder without importing the trainable, and what a resume
    must match."""
    return Metadata(
        space=space.name, space_path=str(space.source), space_yaml=space.text, search=space.search, metric=space.metric,
        mode=space.mode, swept=space.swept, sampled=[name for name, values in space.space.items() if isinstance(values, Distribution)],
        fixed=json.loads(json.dumps(space.fixed)), checkpoint_epochs=space.checkpoint_epochs, epochs=space.epochs,
        data=comparable_data(data.source), subset=space.subset, samples=space.samples, trials=space.trial_count, sweep_seed=space.seed,
        steps=json.loads(json.dumps(space.steps)) if space.steps else None,
    )


# --- Dry run -----------------------------------------------------------------------------------------------


def describe_trials(space: SearchSpace, data: DataSplits) -> str:
    lines = [f"{space.source}: {space.search} search, {space.trial_count} trial(s), {space.metric} ({space.mode})", data.describe()]
    lines.append(f"fixed: {_settings_text(space.fixed)}")
    lines.append(f"resources per trial: cpu {space.resources.cpu:g}, gpu {_gpu_text(space.resources.gpu)}")
    lines.append(f"checkpoints at epochs {', '.join(map(str, space.checkpoint_epochs))}; scheduler {_scheduler_text(space)}")
    if space.search == "grid":
        swept = space.swept
        lines += [f"trial {i + 1}: {_settings_text({n: t[n] for n in swept})}" for i, t in enumerate(space.listed_trials())]
    elif space.search == "steps":
        lines += [f"trial {i + 1}: {'+ ' + _settings_text(step) if step else 'the fixed settings and defaults'}" for i, step in enumerate(space.steps)]
    else:
        lines.append(f"{space.samples} trial(s) drawn by Optuna TPE (seed {space.seed}) from:")
        lines += [f"  {name}: {_values_text(values)}" for name, values in space.space.items()]
    return "\n".join(lines)


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "(none)"


def _values_text(values: Any) -> str:
    return values.describe() if isinstance(values, Distribution) else "one of " + ", ".join(map(str, values))


def _gpu_text(gpu: float | str) -> str:
    if gpu == "auto":
        return f"auto ({AUTO_GPU_PER_TRIAL:g} when the cluster has GPUs, else none)"
    return f"{gpu:g}" + (" (dropped when the cluster has no GPU)" if gpu else "")


def _scheduler_text(space: SearchSpace) -> str:
    s = space.scheduler
    if s.type == "fifo":
        return "fifo (every trial runs to the end)"
    return f"asha (grace period {s.grace_period}, reduction factor {s.reduction_factor:g}, max_t {s.max_t})"


# --- The tuner -----------------------------------------------------------------------------------------------


def param_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    def domain(values: Any) -> Any:
        if space.search == "grid":
            return tune.grid_search(list(values))
        if not isinstance(values, Distribution):
            return tune.choice(list(values))
        if values.kind == "int":
            return tune.randint(int(values.low), int(values.high) + 1)  # randint excludes its upper bound
        return (tune.uniform if values.kind == "uniform" else tune.loguniform)(values.low, values.high)

    # steps: a choice of each swept setting's values, which every trial (make_tuner's points) sets
    return {**space.fixed, **{name: domain(values) for name, values in space.space.items()}}


def make_trainable(space: SearchSpace, data: DataSplits, resources: dict[str, float]):
    from ray import tune

    threads = max(1, int(resources["cpu"]))
    # with_parameters puts the decoded data set into the object store once; trials read it from there.
    trainable = tune.with_parameters(run_trial, data=data, sweep_seed=space.seed, threads=threads)
    return tune.with_resources(trainable, resources)


def make_tuner(space: SearchSpace, data: DataSplits, experiment: ExperimentFolder, resources: dict[str, float],
               max_concurrent: int | None, tensorboard: bool, mlflow: str | None = None):
    from ray.tune import CheckpointConfig, CLIReporter, FailureConfig, RunConfig, TuneConfig, Tuner

    scheduler = None
    if space.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        s = space.scheduler
        scheduler = ASHAScheduler(time_attr="epoch", max_t=s.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    search_alg = None
    if space.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" on stderr
        search_alg = OptunaSearch(seed=space.seed)
    elif space.search == "steps":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(points_to_evaluate=space.listed_trials())  # Tune's grid generator, given the trials
    storage, name = experiment.storage.parent_and_name
    reporter = with_progress(CLIReporter, Plan.of(space))(
        parameter_columns=space.swept, metric_columns=list(PROGRESS_METRICS), max_report_frequency=10, sort_by_metric=True,
    )
    return Tuner(
        make_trainable(space, data, resources),
        param_space=param_space(space),
        tune_config=TuneConfig(
            metric=space.metric, mode=space.mode, num_samples=space.samples, scheduler=scheduler,
            search_alg=search_alg, max_concurrent_trials=max_concurrent,
            # A new actor per trial costs a process start and the imports (3-4 s per trial on 2 cores).
            reuse_actors=True,
        ),
        run_config=RunConfig(
            storage_path=storage, name=name, verbose=1, progress_reporter=reporter,
            callbacks=result_loggers(tensorboard, mlflow, name),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # every snapshot is kept for the analysis
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
        ),
    )


def result_loggers(tensorboard: bool, mlflow: str | None = None, name: str = "") -> list:
    """What each trial's results are written as: result.json and progress.csv, which the analysis reads, and
    TensorBoard's event files or MLflow runs (experiment `name` at tracking URI `mlflow`) when asked. Tune adds
    TensorBoard's by default, whose writer (tensorboardX) imports torch into the sweep's driver as the trials start,
    which costs the driver more than a second."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    loggers = [CSVLoggerCallback(), JsonLoggerCallback()] + ([TBXLoggerCallback()] if tensorboard else [])
    if mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        loggers.append(MLflowLoggerCallback(tracking_uri=mlflow, experiment_name=name))
    return loggers


@contextmanager
def only_our_loggers() -> Iterator[None]:
    """Tune adds its default loggers unless this is set when the sweep starts; unset after it, since a process
    that runs several sweeps (the tests) may run a Tuner without loggers of its own."""
    previous = os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"]
        else:
            os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = previous


def not_tunes_restore_advice(record: logging.LogRecord) -> bool:
    """Tune's advice after Ctrl-C is Python (Tuner.restore); report_results gives the command's: --resume."""
    return not record.getMessage().startswith("Experiment has been interrupted")


def storage_errors_in_one_line(record: logging.LogRecord) -> bool:
    """Tune logs each storage error (a failed trial's upload, a result it could not read back, a sync it gave up)
    with the traceback through Ray's internals, as the record's exception or in its text; the message's first line
    and the error's last say what failed, and the sweep's end says what it means. Other errors keep their tracebacks."""
    error = record.exc_info[1] if record.exc_info else None
    lines = record.getMessage().strip().splitlines() or [""]
    if isinstance(error, OSError):  # a trial's RayTaskError(OSError) is one too
        last = str(error).strip().splitlines() or [type(error).__name__]
        record.msg, record.args, record.exc_info, record.exc_text = f"{lines[0]}: {last[-1]}", (), None, None
    elif TRACEBACK in lines and lines[-1].startswith("OSError"):
        record.msg, record.args = f"{lines[0]} {lines[-1]}", ()
    return True


def keep_storage_errors_short() -> None:
    """storage_errors_in_one_line on every handler of Ray's logger, where every ray.* logger's records go."""
    for handler in logging.getLogger("ray").handlers:
        handler.addFilter(storage_errors_in_one_line)


def run_sweep(space: SearchSpace, data: DataSplits, experiment: ExperimentFolder, metadata: Metadata, args: argparse.Namespace):
    """Run (or resume) the sweep's Tuner; a trial that Ray's memory monitor kills fails and is retried like any."""
    from ray.tune import Tuner

    from tune_cnn.ray_failures import memory_kills_as_trial_failures

    # After Ctrl-C, trials that never started have no results; Ray warns about each, with a FileNotFoundError,
    # every time the results are read. report_results says which trials did not finish and how to resume.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    logging.getLogger("ray.tune.tune").addFilter(not_tunes_restore_advice)
    keep_storage_errors_short()
    resources = trial_resources(space)
    warn_if_storage_is_not_shared(experiment.storage.parent_and_name[0])
    if args.resume:
        restored = make_trainable(space, data, resources)
        tuner = Tuner.restore(experiment.location, trainable=restored, resume_unfinished=True, resume_errored=True)
    else:
        experiment.write_metadata(metadata)
        tuner = make_tuner(space, data, experiment, resources, args.max_concurrent, args.tensorboard, args.mlflow)
    # A restored Tuner keeps its own loggers, and would get Tune's defaults too.
    with only_our_loggers(), memory_kills_as_trial_failures():
        return tuner.fit()


# --- The end of a sweep ------------------------------------------------------------------------------------


def report_results(results, space: SearchSpace, data: DataSplits, experiment: ExperimentFolder, plotters: Executor | None = None) -> int:
    """Print the experiment folder, the best trials and the analysis; 0 if every trial finished, else 1."""
    from tune_cnn.ray_failures import killed_for_memory

    write_and_show_analysis(experiment, plotters)
    failed = [r for r in results if r.error]
    if failed:
        names = ", ".join(f"{Path(r.path).name} ({_settings_text({n: r.config.get(n) for n in space.swept})})" for r in failed)
        print(f"{len(failed)} trial(s) errored: {names}; see error.txt in their folders", file=sys.stderr)
    for result in failed:
        if killed_for_memory(result.error):
            print(killed_for_memory_line(result, data), file=sys.stderr)
    # After Ctrl-C, Tune saves its state, then marks the trials it stops TERMINATED in memory: the saved state counts.
    saved = experiment.saved_state(experiment.storage.listing()[0]).trials.values()
    unfinished = space.trial_count - sum(status in ("TERMINATED", "ERROR") for _, status in saved)
    if unfinished > 0:  # the sweep was interrupted (Ctrl-C): Tune saved its state
        print(f"{unfinished} trial(s) did not finish; rerun the same command with --resume to continue", file=sys.stderr)
    return 1 if failed or unfinished > 0 else 0


def killed_for_memory_line(result: Any, data: DataSplits) -> str:
    """The line for a trial (a Tune Result) that Ray's memory monitor killed on its last try: what it needed, as
    tune_cnn.memory estimates it from its settings, since the node's memory ran out with the trials running at once."""
    needed = trial_memory(TrainConfig.from_flat(result.config), data.shape, data.images).total
    return (f"{Path(result.path).name} was killed for memory: about {byte_size(needed)} needed per trial; "
            f"lower --max-concurrent or ask for more CPUs per trial (--cpus-per-trial)")


def write_and_show_analysis(experiment: ExperimentFolder, plotters: Executor | None) -> None:
    """The experiment folder, the analysis's best trials and the analysis written beside them."""
    from tune_cnn import analysis
    from tune_cnn.analysis.report import readable

    print(f"experiment: {experiment.location}")
    try:
        sweep = analysis.load(experiment.location)
        best = analysis.best_trials(sweep)
        if best.empty:
            print("no trial reported a result")
        else:
            print(f"best trials by {sweep.context.metric} ({sweep.context.mode}, best epoch of each):")
            print(readable(best).to_string(index=False, float_format=lambda v: f"{v:.4g}"))  # lr 1.2e-4 stays readable
        print(f"analysis: {analysis.analyse_into(sweep, plotters=plotters)}")
    except TuneCnnError as error:  # storage lost at the end: the sweep's own outcome still stands
        print(f"analysis: skipped ({error})")


if __name__ == "__main__":
    code = main()
    # Python's last collections at exit would walk every object torch, Ray and pandas made: 0.5 s (measured).
    gc.freeze()
    raise SystemExit(code)
