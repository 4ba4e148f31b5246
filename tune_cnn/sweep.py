"""Run a search space as one Ray Tune sweep, on a laptop or a Ray cluster.

    python -m tune_cnn.sweep [SPACE] [--data ...] [--storage DIR|s3://...] [--address auto] [--resume] [--dry-run]

The driver checks the space and the models against the data before Ray starts, loads and decodes the data
once and hands it to every trial through Ray's object store, writes `tune_cnn.json` (what the analysis
needs to read the experiment folder) and lets Ray Tune schedule, checkpoint, retry and resume the trials.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tune_cnn.config import CHECKPOINT_REPORTS, TrainConfig
from tune_cnn.data import DATA_HELP, DataSplits, load_data
from tune_cnn.errors import CommandParser, ConfigError, StorageError, TuneCnnError, check_folder_can_be_made, exit_on_user_error, first_line
from tune_cnn.space import AUTO_GPU_PER_TRIAL, Distribution, SearchSpace, load_space, space_names

PROGRESS_METRICS = ("epoch", "val_acc", "val_loss")
BEST_ROWS = 5
MAX_FAILURES = 2  # retries per trial, each from the trial's last checkpoint
AUTOSCALER_CONFIG = Path("~/ray_bootstrap_config.yaml")  # where `ray up` leaves the cluster's config on its head
CONNECT_TIMEOUT_S = 30.0  # how long joining --address may take before the sweep gives up


# --- The trainable (runs in a Ray worker) ------------------------------------------------------------------


# Settings that do not change what a trial's epochs compute: the same trial with more epochs repeats the first ones.
NOT_IN_TRIAL_SEED = ("epochs", "checkpoint_every", "eval_batch_size")


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

    from tune_cnn.train import load_checkpoint, train

    sys.unraisablehook = quiet_interrupts_in_callbacks
    # Trials reuse actors (make_tuner): free the previous trial's engine now, whose CUDA graph refers back to it.
    gc.collect()
    torch.set_num_threads(threads)
    # Ray logs a line per saved checkpoint; the progress table already shows each trial's epoch.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
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
            (folder / CHECKPOINT_REPORTS).write_text(json.dumps({"params": params, "reports": reports}))
        # A copy: Ray adds its own fields to the dict it is given (_TrainSession._auto_fill_metrics).
        tune.report(dict(reports[-1]), checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)

    train(config, data, report, resume)


def saved_reports(checkpoint: Path) -> list[dict[str, Any]]:
    """The reports a trial saved with its checkpoint, epoch 1 onwards (none in checkpoints of older versions),
    beside its params.

    Why the trial keeps them: Ray's driver writes params.json, result.json and progress.csv and uploads them by
    rewriting them whole, every second in the tests and every 10 s or more by default. A driver killed during an
    upload leaves them cut short, and a resumed trial carries on from those copies (in a test run, one lacked
    its first six epochs). Checkpoints are uploaded by the trials themselves, so the analysis fills gaps from
    the newest one's params and reports.
    """
    path = checkpoint / CHECKPOINT_REPORTS
    return json.loads(path.read_text())["reports"] if path.is_file() else []


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
    parser.add_argument("--storage", default=os.environ.get("TUNE_CNN_STORAGE", "./tune_results"),
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
    for notice in space.notices:
        print(notice)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {args.max_concurrent} is not allowed; use 1 or more, or leave it out for no limit")
    experiment = Experiment(args.storage, space.name if args.name is None else args.name)
    metadata = sweep_metadata(space, data)
    if args.dry_run:
        if args.resume:  # storage that cannot be reached, or a resume that would fail, is one line before the listing
            experiment.check(resume=True, metadata=metadata)
        exists = not args.resume and experiment.exists()
        print(describe_trials(space, data))
        if exists:
            print(f"notice: experiment {experiment.path} already exists; the run needs --resume to continue it, or another --name")
        return 0
    experiment.check(resume=args.resume, metadata=metadata)
    print(data.describe(), flush=True)
    # The results and the analysis come before Ray's shutdown, which waits 1-1.5 s for its processes to exit.
    plots = len(space.swept) + 3  # one by each swept setting, by epoch, the learning curves, the effects
    with ray_session(args.address), plot_workers(plots) as plotters:
        results = run_sweep(space, data, experiment, metadata, args)
        experiment.check_writable()  # trials that could not save have errored; say why, once
        return report_results(results, space, experiment, plotters)


# --- Dry run -----------------------------------------------------------------------------------------------


def describe_trials(space: SearchSpace, data: DataSplits) -> str:
    lines = [f"{space.source}: {space.search} search, {space.trial_count} trial(s), {space.metric} ({space.mode})", data.describe()]
    lines.append(f"fixed: {_settings_text(space.fixed)}")
    lines.append(f"resources per trial: cpu {space.resources.cpu:g}, gpu {_gpu_text(space.resources.gpu)}")
    lines.append(f"checkpoints at epochs {', '.join(map(str, space.checkpoint_epochs))}; scheduler {_scheduler_text(space)}")
    if space.search == "grid":
        swept = space.swept
        lines += [f"trial {i + 1}: {_settings_text({n: t[n] for n in swept})}" for i, t in enumerate(space.grid_trials())]
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


# --- Storage and metadata ----------------------------------------------------------------------------------


class Experiment:
    """The experiment folder, local or on cloud storage (pyarrow file systems speak both)."""

    def __init__(self, storage: str, name: str):
        if not storage.strip():
            raise ConfigError("--storage is empty; pass a folder for the experiments or a URI such as s3://bucket/path")
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ConfigError(f"--name '{name}' is not a folder name; name the experiment only and choose its place with --storage")
        self.is_uri = "://" in storage
        self.storage = storage.rstrip("/") if self.is_uri else str(Path(storage).expanduser().resolve())
        if not self.is_uri:
            check_folder_can_be_made(Path(self.storage), f"--storage {storage}", "pass a folder for the experiments (it is made if missing)")
        self.name = name
        self.path = f"{self.storage}/{name}"

    def _fs(self):
        import pyarrow.fs

        try:
            return pyarrow.fs.FileSystem.from_uri(self.path)
        except pyarrow.ArrowInvalid:
            raise ConfigError(f"--storage {self.storage} is neither a folder nor a URI that pyarrow opens (s3://, gs://, file://)") from None
        except OSError as error:  # s3:// asks for the bucket's region here
            raise self._unreachable(error) from None

    def exists(self) -> bool:
        """True where the folder holds a sweep. One that holds only this tool's metadata (Ctrl-C came before Tune
        saved anything) does not count: a new run may take the name again, where --resume has nothing to resume."""
        import pyarrow.fs
        from tune_cnn.analysis import METADATA_FILE

        fs, path = self._fs()
        try:
            if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
                return False
            return [Path(i.path).name for i in fs.get_file_info(pyarrow.fs.FileSelector(path))] != [METADATA_FILE]
        except OSError as error:
            raise self._unreachable(error) from None

    def _unreachable(self, error: OSError) -> StorageError:
        """Cloud storage that does not answer, or refuses these credentials."""
        return StorageError(f"cannot reach the experiment folder {self.path} ({first_line(error)}); check --storage, the network and the credentials")

    def read_metadata(self) -> dict[str, Any] | None:
        from tune_cnn.analysis import METADATA_FILE

        fs, path = self._fs()
        try:
            with fs.open_input_stream(f"{path}/{METADATA_FILE}") as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError):
            return None

    def write_metadata(self, metadata: dict[str, Any]) -> None:
        from tune_cnn.analysis import METADATA_FILE

        with self._writing(started=False):
            fs, path = self._fs()
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(f"{path}/{METADATA_FILE}") as f:
                f.write(json.dumps(metadata, indent=2).encode())

    def check_writable(self) -> None:
        """After a sweep: storage that stopped taking writes is why trials errored, so it is the one error."""
        with self._writing(started=True):
            fs, path = self._fs()
            probe = f"{path}/.tune_cnn_write_test"
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            fs.delete_file(probe)

    @contextmanager
    def _writing(self, started: bool):
        """A write that fails (permissions, a full disk) is one line; a started sweep keeps what it saved."""
        try:
            yield
        except OSError as error:
            kept = "; what was saved before is kept, continue with --resume once it is fixed" if started else ""
            raise StorageError(
                f"cannot write to the experiment folder {self.path} ({error.strerror or error}); free space or fix its permissions{kept}"
            ) from None

    def check(self, resume: bool, metadata: dict[str, Any]) -> None:
        """A new sweep needs a fresh name; a resumed one needs its experiment, run with the same inputs."""
        from ray.tune import Tuner

        if not resume:
            if self.exists():
                raise ConfigError(f"experiment {self.path} already exists; add --resume to continue it or choose another --name")
            return
        if not self.exists() or not Tuner.can_restore(self.path):
            raise ConfigError(f"no experiment to resume at {self.path}; check --storage and --name, or drop --resume")
        stored = self.read_metadata() or {}
        stored.setdefault("samples", metadata["samples"])  # experiments from before 2026-11-27 did not record it
        for key in ("space_yaml", "data", "subset", "sweep_seed", "fixed", "samples"):
            if _comparable(key, stored.get(key)) != _comparable(key, metadata[key]):
                raise ConfigError(f"experiment {self.path} was started otherwise ({_change(key, stored.get(key), metadata[key])}); "
                                  f"resume it with the same space and options")


def sweep_metadata(space: SearchSpace, data: DataSplits) -> dict[str, Any]:
    """What the analysis needs to read the experiment folder without importing the trainable."""
    return {
        "space": space.name,
        "space_path": str(space.source),
        "space_yaml": space.text,
        "search": space.search,
        "metric": space.metric,
        "mode": space.mode,
        "swept": space.swept,
        "sampled": [name for name, values in space.space.items() if isinstance(values, Distribution)],
        "fixed": json.loads(json.dumps(space.fixed)),
        "checkpoint_epochs": space.checkpoint_epochs,
        "epochs": space.epochs,
        "data": _comparable("data", data.source),
        "subset": space.subset,
        "samples": space.samples,
        "sweep_seed": space.seed,
    }


def _comparable(key: str, value: Any) -> Any:
    """A local --data path as the absolute path it names, so a resume may spell it otherwise (relative, ~)."""
    if key == "data" and isinstance(value, str) and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def _change(key: str, was: Any, now: Any) -> str:
    """What differs between a stored metadata value and this run's, in the words of the options that set it."""
    if key == "space_yaml":
        return "its search space file has changed"
    if key == "fixed":
        was = was or {}
        changed = [k for k in sorted(set(was) | set(now), key=str) if was.get(k) != now.get(k)]
        return ", ".join(f"{k} {was.get(k)!r}, now {now.get(k)!r}" for k in changed)
    option = {"data": "--data", "subset": "subset", "sweep_seed": "seed", "samples": "samples"}[key]
    return f"{option} {was!r}, now {now!r}"


# --- Ray ---------------------------------------------------------------------------------------------------


@contextmanager
def ray_session(address: str | None):
    """Ray for the length of the block: started here and shut down after it, or joined at `address`."""
    import ray

    # The compact CLIReporter table needs Tune's classic output engine; set before Ray starts its processes.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started = connect_ray(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def not_the_token_auth_notice(record: logging.LogRecord) -> bool:
    """Ray's notice that a local session uses its default, token authentication, is no news to a sweep's user and
    would come before a one-line error; its warning where authentication is off still shows."""
    return not record.getMessage().startswith("Token authentication is enabled")


def not_tunes_restore_advice(record: logging.LogRecord) -> bool:
    """Tune's advice after Ctrl-C is Python (Tuner.restore); report_results gives the command's: --resume."""
    return not record.getMessage().startswith("Experiment has been interrupted")


def connect_ray(address: str | None) -> bool:
    """Start Ray locally, or join the cluster at `address`; True when this call started the session."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_cluster_answers(address)
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(not_the_token_auth_notice)
    with interrupt_after():
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # no dashboard on a laptop: nothing listens on a network port (the cluster's head runs its own)
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
    return True


@contextmanager
def interrupt_after() -> Iterator[None]:
    """Ctrl-C waits for the block to end: interrupted midway, ray.init left a traceback and at times a crash at exit."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def check_cluster_answers(address: str) -> None:
    """ray.init retries for minutes where no Ray cluster answers; find out within CONNECT_TIMEOUT_S instead."""
    try:
        _refuse_fast(address)
        # Something listening is not yet a Ray cluster: join it from a throwaway process that can be timed out.
        probe = subprocess.run(
            [sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR')", address],
            capture_output=True, text=True, timeout=CONNECT_TIMEOUT_S,
        )
        if probe.returncode != 0:
            raise OSError((probe.stderr.strip().splitlines() or ["ray.init failed"])[-1])
    except subprocess.TimeoutExpired:
        reason = f"no answer within {CONNECT_TIMEOUT_S:g} s"
    except (OSError, ValueError) as error:
        reason = str(error)
    else:
        return
    raise ConfigError(
        f"no Ray cluster answers at --address {address} ({reason}); check HOST:PORT of the head node "
        f"(port 6379 by default), or start a cluster there with `ray start --head`"
    )


def _refuse_fast(address: str) -> None:
    """A HOST:PORT where nothing listens fails in a TCP connect, without a Ray start-up."""
    if address == "auto" or "://" in address:  # Ray resolves these itself (the local cluster's file, Ray Client)
        return
    host, _, port = address.rpartition(":")
    socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()


def cluster_gpus() -> float:
    """GPUs the cluster has now or, where it has none, can scale to when an autoscaler is configured with GPU node types."""
    import ray

    # Asking for the autoscaler's config takes about 2 s, so only where no GPU is there yet.
    return float(ray.cluster_resources().get("GPU", 0)) or scalable_gpus()


def scalable_gpus() -> float:
    """GPUs an autoscaler may add."""
    return float((autoscaler_limits() or {}).get("GPU", 0))


def autoscaler_limits() -> dict[str, float] | None:
    """The most of each resource an autoscaler may add, from the config Ray reports (autoscaler v2, KubeRay) or
    `ray up`'s on the head (its GPUs); None where no autoscaler is configured."""
    try:
        from ray._private.state import state

        reported = state.get_max_resources_from_cluster_config()
    except Exception:  # a private API, and absent off a cluster: then only the head's config file counts
        reported = None
    path = AUTOSCALER_CONFIG.expanduser()
    if not path.is_file():
        return reported
    node_types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types", {}).values()
    configured = sum(t.get("resources", {}).get("GPU", 0) * t.get("max_workers", 0) for t in node_types)
    return {**(reported or {}), "GPU": max(float((reported or {}).get("GPU", 0)), float(configured))}


def trial_resources(space: SearchSpace) -> dict[str, float]:
    """The space's resources per trial on this cluster: GPU requests are dropped where no GPU can come."""
    requested = space.resources.gpu
    gpu = space.resources.resolve_gpu(cluster_gpus())
    if requested and not gpu and space.asks_for_cuda:
        raise ConfigError("the space sets device cuda and the Ray cluster has no GPU; set device auto to run the trials on CPUs")
    if requested and not gpu:
        print(f"notice: the Ray cluster has no GPU; running the trials on CPUs only (gpu {requested} per trial was asked for)")
    resources = {"cpu": space.resources.cpu, "gpu": gpu}
    check_a_node_fits(resources)
    return resources


def check_a_node_fits(resources: dict[str, float]) -> None:
    """Ray leaves a trial that no node can hold PENDING for ever: a ConfigError instead, unless an autoscaler may
    bring larger nodes."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if any(all(node.get(key.upper(), 0) >= amount for key, amount in resources.items()) for node in nodes):
        return
    if autoscaler_limits() is not None:
        return
    joining = "; if nodes are still joining, start the sweep once they have"
    for key, option in (("cpu", "--cpus-per-trial"), ("gpu", "--gpus-per-trial")):
        largest = max(n.get(key.upper(), 0) for n in nodes)
        if resources[key] > largest:
            raise ConfigError(f"a trial asks for {resources[key]:g} {key.upper()}(s) and the largest node of the Ray cluster has "
                              f"{largest:g}; lower {option} (or resources.{key} in the space){joining}")
    raise ConfigError(f"a trial asks for {resources['cpu']:g} CPU(s) and {resources['gpu']:g} GPU(s) and no node of the Ray cluster "
                      f"has both; lower --cpus-per-trial or --gpus-per-trial (or resources in the space){joining}")


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

    return {**space.fixed, **{name: domain(values) for name, values in space.space.items()}}


def make_trainable(space: SearchSpace, data: DataSplits, resources: dict[str, float]):
    from ray import tune

    threads = max(1, int(resources["cpu"]))
    # with_parameters puts the decoded data set into the object store once; trials read it from there.
    trainable = tune.with_parameters(run_trial, data=data, sweep_seed=space.seed, threads=threads)
    return tune.with_resources(trainable, resources)


def make_tuner(space: SearchSpace, data: DataSplits, experiment: Experiment, resources: dict[str, float],
               max_concurrent: int | None, tensorboard: bool):
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
    reporter = CLIReporter(
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
            name=experiment.name, storage_path=experiment.storage, verbose=1, progress_reporter=reporter,
            callbacks=result_loggers(tensorboard),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # every snapshot is kept for the analysis
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
        ),
    )


def result_loggers(tensorboard: bool) -> list:
    """What each trial's results are written as: result.json and progress.csv, which the analysis reads, and
    TensorBoard's event files when asked. Tune adds TensorBoard's by default, whose writer (tensorboardX) imports
    torch into the sweep's driver as the trials start (importing torch takes 1.3-1.4 s on a 2-core CPU)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()] + ([TBXLoggerCallback()] if tensorboard else [])


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


def run_sweep(space: SearchSpace, data: DataSplits, experiment: Experiment, metadata: dict[str, Any], args: argparse.Namespace):
    from ray.tune import Tuner

    # After Ctrl-C, trials that never started have no results; Ray warns about each, with a FileNotFoundError,
    # every time the results are read. report_results says which trials did not finish and how to resume.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    logging.getLogger("ray.tune.tune").addFilter(not_tunes_restore_advice)
    resources = trial_resources(space)
    warn_if_storage_is_not_shared(experiment)
    if args.resume:
        restored = make_trainable(space, data, resources)
        tuner = Tuner.restore(experiment.path, trainable=restored, resume_unfinished=True, resume_errored=True)
    else:
        experiment.write_metadata(metadata)
        tuner = make_tuner(space, data, experiment, resources, args.max_concurrent, args.tensorboard)
    with only_our_loggers():  # a restored Tuner keeps its own loggers, and would get Tune's defaults too
        return tuner.fit()


def warn_if_storage_is_not_shared(experiment: Experiment) -> None:
    import ray

    if not experiment.is_uri and len([n for n in ray.nodes() if n["Alive"]]) > 1:
        print(
            f"notice: storage {experiment.storage} is a local folder on a multi-node cluster; trials on other nodes "
            f"can only save there if it is shared (NFS); use --storage s3://... otherwise"
        )


# --- The end of a sweep ------------------------------------------------------------------------------------


def report_results(results, space: SearchSpace, experiment: Experiment, plotters: Executor | None = None) -> int:
    """Print the best trials, the experiment folder and the analysis; 0 if every trial finished, else 1."""
    print_best(results, space)
    print(f"experiment: {experiment.path}")
    print_analysis(experiment, plotters)
    failed = [r for r in results if r.error]
    if failed:
        names = ", ".join(f"{Path(r.path).name} ({_settings_text({n: r.config.get(n) for n in space.swept})})" for r in failed)
        print(f"{len(failed)} trial(s) errored: {names}; see error.txt in their folders", file=sys.stderr)
    ended = [status for status in saved_trial_statuses(experiment) if status in ("TERMINATED", "ERROR")]
    unfinished = space.trial_count - len(ended)
    if unfinished > 0:  # the sweep was interrupted (Ctrl-C): Tune saved its state
        print(f"{unfinished} trial(s) did not finish; rerun the same command with --resume to continue", file=sys.stderr)
    return 1 if failed or unfinished > 0 else 0


def saved_trial_statuses(experiment: Experiment) -> list[str]:
    """Trial statuses as Tune saved them: after Ctrl-C it saves, then marks the trials it stops TERMINATED in memory."""
    from ray.tune import ExperimentAnalysis

    return [trial.status for trial in ExperimentAnalysis(experiment.path).trials]


def print_best(results, space: SearchSpace) -> None:
    frame = results.get_dataframe(filter_metric=space.metric, filter_mode=space.mode)
    if frame.empty or space.metric not in frame:
        print("no trial reported a result")
        return
    columns = [f"config/{n}" for n in space.swept] + [c for c in ("epoch", "val_acc", "val_loss", "test_acc") if c in frame]
    best = frame.sort_values(space.metric, ascending=space.mode == "min").head(BEST_ROWS)[columns]
    best.columns = [c.removeprefix("config/") for c in columns]
    print(f"best trials by {space.metric} ({space.mode}, best epoch of each):")
    print(best.to_string(index=False, float_format=lambda v: f"{v:.4g}"))  # lr 1.2e-4 stays readable


def print_analysis(experiment: Experiment, plotters: Executor | None = None) -> None:
    from tune_cnn.analysis import write_analysis

    try:
        print(f"analysis: {write_analysis(experiment.path, plotters=plotters)}")
    except TuneCnnError as error:  # e.g. every trial errored: the sweep's own outcome still stands
        print(f"analysis: skipped ({error})")


@contextmanager
def plot_workers(plots: int) -> Iterator[Executor]:
    """Processes that draw the analysis's plots at the sweep's end, all at once, one per plot up to one per core.

    They start with the sweep and import pandas and matplotlib while the trials train, at low priority so the
    trials come first; drawn one after another in the driver, the seed space's five plots and those imports
    took 1.8-2.8 s on a 2-core CPU and about 3 s on an H100 machine. They ignore Ctrl-C, which the sweep handles.
    """
    count = max(1, min(plots, os.cpu_count() or 1))
    pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"), initializer=_start_plot_worker)
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the processes started meanwhile
    try:
        for _ in range(count):  # the pool starts a process for each task that finds none idle
            pool.submit(int)
    finally:
        signal.signal(signal.SIGINT, interrupt)
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def _start_plot_worker() -> None:
    os.nice(10)
    from tune_cnn.analysis import prepare_plotting

    prepare_plotting()


if __name__ == "__main__":
    code = main()
    # Python's last collections at exit would walk every object torch, Ray and pandas made: 0.5 s (measured).
    gc.freeze()
    raise SystemExit(code)
