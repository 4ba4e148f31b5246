"""Side by side: the tutorials' input pipeline against tune_cnn's engine, on the same data, model and batches.

    python -m tune_cnn.bench [--quick] [--data ...] [--images N] [--batch-size 32] [--concurrency 1 2 4 8] [--out DIR]

In one run it times (a) the reference pipeline written the way Ray Tune's and PyTorch's CIFAR-10 tutorials
write it (a Dataset that turns each uint8 image into a PIL image, then ToTensor and Normalize, a DataLoader
with worker processes, one model step per batch, the loss read back every step), in a plain process of its own
as a tutorial script runs; (b) tune_cnn's engine (tune_cnn.train's own train_epoch; on CUDA each of its
variants: eager, torch.compile's CUDA graphs, the whole-step CUDA graph in bf16 and fp32, and that graph around
torch.compile's kernels); and (c) N concurrent engine trials in N processes. Reference and engine alternate
round by round, so a busy machine slows both alike. It measures the device's matrix rate and prints the floor:
the model's training FLOPs per image over that rate. On a GPU it also times the `seed` space's six trials as
plain processes, and with Ray there the whole `seed` sweep.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from tune_cnn.analysis import json_reports
from tune_cnn.config import InputShape, TrainConfig
from tune_cnn.data import DATA_HELP, Arrays, DataSplits, load_data, stratified_subset
from tune_cnn.errors import CommandParser, ConfigError, check_folder_can_be_made, exit_on_user_error
from tune_cnn.models import build_model, training_flops_per_image
from tune_cnn.space import AUTO_GPU_PER_TRIAL, load_space
from tune_cnn.train import build_engine, eval_batch_size, evaluate, optimizer_settings, parse_settings, resolve_device, train

EPOCH_IMAGES = 50_000  # the "seconds per epoch" column is for a 50,000-image epoch, as the issue states targets
WARMUP_BATCHES = 10  # untimed steps before timing: first-call allocations, cuDNN/oneDNN choices, compilation
REPORTED = ("images_per_second", "epoch_seconds")
QUICK_IMAGES = 6000
PROCESS_TIMEOUT_S = 900  # a trial or reference process that stops answering fails the benchmark instead of hanging it
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Timing:
    """One pipeline's timed passes: `images` per pass (all trials together), `seconds` per pass."""

    name: str
    images: int
    seconds: list[float]
    trials: int = 1
    warmup_seconds: float = 0.0
    others_cores: list[float] = field(default_factory=list)  # per pass: cores that other processes kept busy

    @property
    def images_per_second(self) -> float:
        return self.images / statistics.median(self.seconds)

    @property
    def epoch_seconds(self) -> float:
        return EPOCH_IMAGES / self.images_per_second

    def as_dict(self, reference: Timing | None) -> dict[str, Any]:
        ratio = self.images_per_second / reference.images_per_second if reference else None
        return {**dataclasses.asdict(self), **{k: getattr(self, k) for k in REPORTED}, "ratio_to_reference": ratio,
                "images_per_second_by_pass": [self.images / s for s in self.seconds],
                "ratio_to_reference_by_pass": self.ratios_by_pass(reference)}

    def ratios_by_pass(self, reference: Timing | None) -> list[float] | None:
        """Each pass's images/s over the reference pass of the same round, timed just before it: the ratio with
        the machine's drift between rounds taken out (a shared machine's speed can change by 20% in a minute)."""
        if reference is None or len(reference.seconds) != len(self.seconds) or self.trials != 1:
            return None
        return [(self.images / mine) / (reference.images / theirs) for mine, theirs in zip(self.seconds, reference.seconds)]


@dataclass
class Plan:
    """What to time: the config, the timed images, passes per pipeline and the concurrent-trial counts."""

    config: TrainConfig
    images: int
    rounds: int
    workers: int
    concurrency: list[int] = field(default_factory=list)
    variants: list[str] | None = None  # keys of VARIANTS on CUDA; None: all

    @property
    def warmup_images(self) -> int:
        """Untimed images first; they end on a batch as short as a timed pass's last, so compiled code meets
        both batch shapes before the clock runs."""
        batch = self.config.batch_size
        return min(WARMUP_BATCHES * batch + self.images % batch, self.images)


# --- (a) The reference pipeline, as the tutorials write it --------------------------------------------------


class TutorialDataset(Dataset):
    """Each image on its own: uint8 array -> PIL image -> ToTensor -> Normalize, in a DataLoader worker."""

    def __init__(self, arrays: Arrays, mean: Sequence[float], std: Sequence[float]):
        self.arrays = arrays
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pixels = self.arrays.x[i].transpose(1, 2, 0)
        image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
        return self.transform(image), int(self.arrays.y[i])


def reference_loader(arrays: Arrays, mean: Sequence[float], std: Sequence[float], batch_size: int, workers: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    dataset = TutorialDataset(arrays, mean, std)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, generator=generator)


def reference_model(config: TrainConfig, shape: InputShape) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same model, initialisation and optimizer settings as the engine; torch's default kernels, fp32, NCHW."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, shape).to(resolve_device(config.device))
    optimizer = torch.optim.SGD if config.optimizer == "sgd" else torch.optim.AdamW
    return model, optimizer(model.parameters(), **optimizer_settings(config))


def reference_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader) -> float:
    """One pass over `loader` the tutorials' way; returns the mean training loss."""
    device = next(model.parameters()).device
    model.train()
    running_loss = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
    return running_loss / len(loader)


def compare_accuracy(config: TrainConfig, data: DataSplits, epochs: int, seeds: Sequence[int], workers: int = 0) -> dict[str, Any]:
    """Train the reference loop and the engine from the same initialisation, `epochs` each, once per seed;
    both are scored by the same evaluation. Returns each one's validation and test accuracies per seed."""
    scores: dict[str, dict[str, list[float]]] = {name: {"val_acc": [], "test_acc": []} for name in ("reference", "engine")}
    for seed in seeds:
        seeded = dataclasses.replace(config, seed=seed)
        model, optimizer = reference_model(seeded, data.shape)
        loader = reference_loader(data.train, data.mean, data.std, seeded.batch_size, workers, seed)
        engine = build_engine(seeded, data.shape, data.mean, data.std)
        splits = {name: engine.put(getattr(data, name)) for name in ("train", "val", "test")}
        for _ in range(epochs):
            reference_epoch(model, optimizer, loader)
            engine.train_epoch(splits["train"])
        for split in ("val", "test"):
            scores["reference"][f"{split}_acc"].append(evaluate(model, splits[split], eval_batch_size(seeded, engine.device))[1])
            scores["engine"][f"{split}_acc"].append(engine.evaluate(splits[split])[1])
    difference = statistics.mean(scores["engine"]["test_acc"]) - statistics.mean(scores["reference"]["test_acc"])
    return {"epochs": epochs, "seeds": list(seeds), "train_images": len(data.train), **scores, "test_acc_difference_points": 100 * difference}


# --- Timing ------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def measured(run: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """One timed pass: its seconds, and the cores other processes kept busy meanwhile."""
    with OtherLoad() as load:
        seconds = timed(run, device)
    return seconds, load.cores


class OtherLoad:
    """How many cores other processes kept busy while a pass ran: on a shared machine, the noise to report.

    Machine-wide busy time from /proc/stat less this process's and its reaped children's (DataLoader
    workers end with their epoch); None where /proc/stat is missing.
    """

    def __enter__(self) -> OtherLoad:
        self.start = (machine_busy_seconds(), own_cpu_seconds(), time.perf_counter())
        return self

    def __exit__(self, *_) -> None:
        machine, own, wall = self.start
        after = machine_busy_seconds()
        self.cores = None if machine is None or after is None else max(0.0, (after - machine - (own_cpu_seconds() - own)) / (time.perf_counter() - wall))


def machine_busy_seconds() -> float | None:
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


GRAPH = {"compile": False, "cuda_graph": True}
VARIANTS = {  # on CUDA: name in the table -> the settings that make it
    "eager": ("engine, eager", {"compile": False, "cuda_graph": False}),
    "compile": ("engine, torch.compile (CUDA graphs)", {"compile": True, "cuda_graph": False}),
    "graph": ("engine, whole-step CUDA graph", GRAPH),
    "graph-fp32": ("engine, whole-step CUDA graph, fp32", {**GRAPH, "precision": "fp32"}),
    "graph-compile": ("engine, CUDA graph + torch.compile", {"compile": True, "cuda_graph": True}),
}


def engine_variants(config: TrainConfig, device: torch.device, keys: Sequence[str] | None = None) -> dict[str, TrainConfig]:
    """On CUDA the engine's ways to cut per-step overhead (`keys` of VARIANTS, default all), each timed;
    elsewhere the engine as configured."""
    if device.type != "cuda":
        return {engine_label(config, device): config}
    chosen = (VARIANTS[k] for k in (VARIANTS if keys is None else keys))
    return {label: dataclasses.replace(config, **settings) for label, settings in chosen}


def engine_label(config: TrainConfig, device: torch.device) -> str:
    """The engine as `config` runs it on `device`: 'engine', plus ', CUDA graph' and ', compiled' where they apply."""
    return "engine" + (", CUDA graph" if config.cuda_graph and device.type == "cuda" else "") + (", compiled" if config.compile else "")


def time_side_by_side(plan: Plan, data: DataSplits, sample: Arrays, folder: Path) -> tuple[list[Timing], dict[str, str]]:
    """Reference and engine variants, alternating pass by pass after untimed warm-ups. An engine variant that
    fails to build or warm up (a GPU or torch version without some feature) is left out, its error returned.

    The reference runs in a process of its own (ReferenceProcess), as a tutorial script runs; the engines run
    here, in a process that build_engine has set up as every trial's is.
    """
    device = resolve_device(plan.config.device)
    warmup = sample.take(np.arange(plan.warmup_images))
    reference = f"reference ({plan.workers} workers)"
    failures: dict[str, str] = {}
    with ReferenceProcess(plan, data, save_sample(sample, folder)) as run_reference:
        runs = {reference: run_reference}
        timings = {reference: Timing(reference, len(sample), [], warmup_seconds=run_reference.warmup_seconds)}
        for name, variant in engine_variants(plan.config, device, plan.variants).items():
            try:
                runs[name] = engine_runner(variant, data, sample, warmup)
                timings[name] = Timing(name, len(sample), [], warmup_seconds=runs[name]()[0])
            except Exception as error:  # noqa: BLE001 - reported with the figures
                runs.pop(name, None)
                failures[name] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
                print(f"{name}: failed, left out: {failures[name]}", flush=True)
        for _ in range(plan.rounds):
            for name, run in runs.items():
                seconds, cores = run()
                timings[name].seconds.append(seconds)
                timings[name].others_cores.append(cores)
    return list(timings.values()), failures


class ReferenceProcess:
    """The reference pipeline in a plain process of its own, as a tutorial script runs it; each call times one
    pass there and returns its seconds and the other load.

    Not in the benchmark's own process: the engine's process-wide allocator settings (train.keep_freed_memory)
    would speed the reference up as well, by 20% on the 2-core CPU (1,250-1,380 against 1,490-1,680 images/s,
    alternating processes, measured), crediting it with one of the engine's optimisations.
    """

    def __init__(self, plan: Plan, data: DataSplits, sample_file: Path):
        context = mp.get_context("spawn")  # a fresh interpreter: nothing of this process's state
        self.commands, self.results = context.Queue(), context.Queue()
        args = (plan.config.flat(), data.shape, data.mean, data.std, str(sample_file), plan.warmup_images, plan.workers,
                mp.get_start_method(), self.commands, self.results)
        self.process = context.Process(target=reference_process, args=args)
        self.warmup_seconds = 0.0

    def __enter__(self) -> ReferenceProcess:
        self.process.start()
        self.warmup_seconds = self._receive()
        return self

    def __call__(self) -> tuple[float, float | None]:
        self.commands.put("pass")
        return self._receive()

    def __exit__(self, *_) -> None:
        self.commands.put(None)
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()

    def _receive(self) -> Any:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while True:
            try:
                outcome = self.results.get(timeout=1)
                break
            except queue.Empty:
                if not self.process.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the reference process {'hung' if self.process.is_alive() else 'died'} "
                                       f"(exit code {self.process.exitcode})") from None
        if isinstance(outcome, str):
            raise RuntimeError(f"the reference process failed: {outcome}")
        return outcome


def reference_process(settings: dict, shape: InputShape, mean, std, sample_file: str, warmup_images: int, workers: int,
                      start_method: str, commands, results) -> None:
    """Warm up on `warmup_images` (no workers: the model's first steps), report the seconds, then run one timed
    pass per command until None. DataLoader workers start the way a script's would (`start_method`, the
    platform's default): a spawned process would otherwise spawn them too, 2-3 s of imports per epoch."""
    try:
        mp.set_start_method(start_method, force=True)
        config = TrainConfig.from_flat(settings)
        device = resolve_device(config.device)
        sample = load_sample(sample_file)
        model, optimizer = reference_model(config, shape)
        first = reference_loader(sample.take(np.arange(warmup_images)), mean, std, config.batch_size, 0, config.seed)
        results.put(timed(lambda: reference_epoch(model, optimizer, first), device))
        loader = reference_loader(sample, mean, std, config.batch_size, workers, config.seed)
        while commands.get() is not None:
            results.put(measured(lambda: reference_epoch(model, optimizer, loader), device))
    except Exception as error:  # noqa: BLE001 - the parent raises it
        results.put(repr(error))


def engine_runner(config: TrainConfig, data: DataSplits, sample: Arrays, warmup: Arrays) -> Callable[[], tuple[float, float | None]]:
    """The first call warms up, later calls time one pass each."""
    engine = build_engine(config, data.shape, data.mean, data.std)
    on_device = iter([engine.put(warmup)])
    timed_data = engine.put(sample)
    return lambda: measured(lambda: engine.train_epoch(next(on_device, timed_data)), engine.device)


def save_sample(sample: Arrays, folder: Path) -> Path:
    """The timed images as a file that the other processes load."""
    path = folder / "sample.npz"
    if not path.exists():
        np.savez(path, x=sample.x, y=sample.y)
    return path


def load_sample(path: str) -> Arrays:
    with np.load(path) as stored:
        return Arrays(stored["x"], stored["y"])


# --- (c) Concurrent trials, one process each ----------------------------------------------------------------


def time_concurrent(plan: Plan, data: DataSplits, sample: Arrays, trials: int, folder: Path) -> Timing:
    """`trials` processes each train the engine on `sample` at once; total images over the wall clock of all.

    Every process loads the sample, builds its engine and warms up before a barrier; the clock runs from the
    barrier to the last process's end.
    """
    sample_file = save_sample(sample, folder)
    context = mp.get_context("spawn")  # CUDA cannot be used in forked children
    ready, done = context.Barrier(trials + 1), context.Queue()
    shared = (plan.config.flat(), data.shape, data.mean, data.std, str(sample_file), plan.warmup_images, trials, ready, done)
    workers = [context.Process(target=concurrent_trial, args=(rank, *shared)) for rank in range(trials)]
    for worker in workers:
        worker.start()
    try:
        ready.wait(timeout=PROCESS_TIMEOUT_S)
        start = time.perf_counter()
        outcomes = [done.get(timeout=PROCESS_TIMEOUT_S) for _ in workers]
        seconds = time.perf_counter() - start
    except (threading.BrokenBarrierError, queue.Empty):
        raise RuntimeError(f"concurrent trials failed or hung: {drain(done) or 'no message'}") from None
    finally:
        for worker in workers:
            worker.join(timeout=PROCESS_TIMEOUT_S)
    failures = [o for o in outcomes if isinstance(o, str)]
    if failures:
        raise RuntimeError(f"a concurrent trial failed: {failures[0]}")
    warmup = max(o[1] for o in outcomes)
    label = engine_label(plan.config, resolve_device(plan.config.device))
    return Timing(f"{label}, {trials} concurrent trial{'s' * (trials > 1)}", trials * len(sample), [seconds], trials, warmup)


def concurrent_trial(rank: int, settings: dict, shape: InputShape, mean, std, sample_file: str, warmup_images: int,
                     trials: int, ready, done) -> None:
    """One trial process: its own engine and copy of the data on the device, seeded by its rank."""
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // trials))  # trials share the host's cores
        sample = load_sample(sample_file)
        config = TrainConfig.from_flat({**settings, "seed": settings["seed"] + rank})
        engine = build_engine(config, shape, mean, std)
        on_device = engine.put(sample)
        warmup = timed(lambda: engine.train_epoch(engine.put(sample.take(np.arange(warmup_images)))), engine.device)
        ready.wait(timeout=PROCESS_TIMEOUT_S)
        timed(lambda: engine.train_epoch(on_device), engine.device)
        done.put((rank, warmup))
    except Exception as error:  # noqa: BLE001 - the parent raises it
        done.put(f"trial {rank}: {error!r}")
        ready.abort()


def drain(messages) -> str:
    found = []
    while not messages.empty():
        found.append(messages.get())
    return "; ".join(m for m in found if isinstance(m, str))


# --- The device's limit ------------------------------------------------------------------------------------


def matrix_rate(device: torch.device, quick: bool) -> dict[str, Any]:
    """FLOP/s of a square matrix product in the engine's precision there: bf16 on CUDA, fp32 on the CPU."""
    cuda = device.type == "cuda"
    size, dtype = (8192, torch.bfloat16) if cuda else (1024 if quick else 2048, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    timed(lambda: a @ b, device)
    repeats = 50 if cuda else 10
    seconds = timed(lambda: [a @ b for _ in range(repeats)], device)
    return {"flops_per_second": 2 * size**3 * repeats / seconds, "dtype": str(dtype).removeprefix("torch."), "size": size}


def floor(config: TrainConfig, shape: InputShape, rate: float) -> dict[str, float]:
    """The fastest the device could train: every multiply-add at the matrix rate, nothing else."""
    flops = training_flops_per_image(build_model(config.model, shape), shape)
    return {"flops_per_image": flops, "images_per_second": rate / flops, "epoch_seconds": EPOCH_IMAGES * flops / rate}


# --- The whole seed sweep ----------------------------------------------------------------------------------


def time_seed_sweep(source: str, folder: Path, code: Path | None = None) -> dict[str, Any]:
    """Wall clock of `python -m tune_cnn.sweep seed` from the command's start to its analysis written and to its
    exit, with the trials' timeline and each line of the sweep's output stamped with when it came (progress
    tables left out). `code`: run the tune_cnn and search_spaces in that folder (an earlier commit's, from
    `git archive`) instead of the ones Python finds from here."""
    command = [sys.executable, "-u", "-m", "tune_cnn.sweep", "seed", "--data", source, "--storage", str(folder.resolve()), "--name", "bench_seed"]
    started_at, start = time.time(), time.perf_counter()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=code) as run:
        for line in run.stdout:
            lines.append((round(time.perf_counter() - start, 2), line.rstrip()))
    seconds = time.perf_counter() - start
    analysed = (folder / "bench_seed" / "analysis").is_dir()
    # The clock stops when the analysis is written (the sweep prints its folder then); ours also runs to exit.
    analysis_at = next((at for at, line in lines if line.startswith("analysis: ")), None)
    return {"command": " ".join(command[1:]), "seconds": seconds, "returncode": run.returncode, "analysis_written": analysed,
            "analysis_written_s": analysis_at,
            "timeline": sweep_timeline(folder / "bench_seed", started_at),
            "output": [(at, line[:200]) for at, line in lines if not line.startswith(("|", "+-"))],
            "output_tail": "\n".join(line for _, line in lines)[-2000:]}


def sweep_timeline(experiment: Path, started_at: float) -> dict[str, Any]:
    """Where a sweep's wall clock went, in seconds from the command's start (`started_at`, time.time()):
    when the trials started and ended (to within a second: Tune stamps each result in whole seconds), and per
    trial the time in its epochs (training and evaluation, as train() measures them) against the rest of the
    trial (set-up, reporting to Tune, checkpoints), and of that the set-up before the first epoch on its own."""
    trials = []
    for results in sorted(experiment.glob("*/result.json")):
        rows = json_reports(results.read_text())
        if not rows:
            continue
        ended = rows[-1]["timestamp"] - started_at
        total, in_epochs = rows[-1]["time_total_s"], sum(r["epoch_seconds"] for r in rows)
        trials.append({"started": ended - total, "ended": ended, "epochs": in_epochs, "outside_epochs": total - in_epochs,
                       "setup": rows[0]["time_total_s"] - rows[0]["epoch_seconds"]})
    if not trials:
        return {}
    span = lambda key: [min(t[key] for t in trials), max(t[key] for t in trials)]  # noqa: E731
    return {"trials_started_s": span("started"), "trials_ended_s": span("ended"), "trial_epochs_s": span("epochs"),
            "trial_outside_epochs_s": span("outside_epochs"), "trial_setup_s": span("setup")}


def time_seed_trials(source: str, at_once: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The seed space's trials as plain processes, `at_once` at a time, without Ray: the engine's share of
    the whole-sweep figure where Ray is missing (it is, on the lent GPU machines).

    Each trial is tune_cnn.train.train() as the sweep runs it (every epoch evaluated, checkpoints written);
    the clock runs from the first process's start to the last trial's end.
    """
    space = load_space("seed")
    trials = [TrainConfig.from_flat({**t, **(overrides or {})}).flat() for t in space.grid_trials()]
    context = mp.get_context("spawn")
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=at_once, mp_context=context) as pool:
        histories = list(pool.map(seed_trial, [source] * len(trials), [space.seed] * len(trials), [at_once] * len(trials), trials))
    return {"trials": len(trials), "at_once": at_once, "epochs": trials[0]["epochs"], "batch_size": trials[0]["batch_size"],
            "seconds": time.perf_counter() - start, "val_acc": [h[-1]["val_acc"] for h in histories],
            "trial_epochs_s": [sum(m["epoch_seconds"] for m in h) for h in histories],
            "epoch_seconds": [[round(m["epoch_seconds"], 3) for m in h] for h in histories]}


def seed_trial(source: str, split_seed: int, at_once: int, settings: dict[str, Any]) -> list[dict[str, float]]:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // at_once))
    data = load_data(source, seed=split_seed)
    return train(TrainConfig.from_flat(settings), data, report=lambda metrics, checkpoint: None)


def wanted(choice: str, when_auto: bool) -> bool:
    return when_auto if choice == "auto" else choice == "yes"


# --- Putting it together -----------------------------------------------------------------------------------


def run_benchmark(plan: Plan, data: DataSplits, quick: bool = False) -> dict[str, Any]:
    """Time everything `plan` asks for and return the figures (what the JSON file holds)."""
    device = resolve_device(plan.config.device)
    sample = data.train.take(stratified_subset(data.train.y, plan.images, plan.config.seed))
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="tune_cnn_bench_") as folder:
        timings, failures = time_side_by_side(plan, data, sample, Path(folder))
        timings += [time_concurrent(plan, data, sample, trials, Path(folder)) for trials in plan.concurrency]
    rate = matrix_rate(device, quick)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "commit": git_commit(),
        "batch_size": plan.config.batch_size,
        "config": plan.config.flat(),
        "images_per_pass": plan.images,
        "passes": plan.rounds,
        "warmup_images": plan.warmup_images,
        "reference_workers": plan.workers,
        "cpu_threads": torch.get_num_threads(),
        "cuda_mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")),  # the gpu.sh stage that starts MPS sets it
        "load_average": {"before": load_before, "after": load_average()},
        "matrix_rate": rate,
        "floor": floor(plan.config, data.shape, rate["flops_per_second"]),
        "results": [t.as_dict(timings[0]) for t in timings],
        "failed": failures,
    }


def format_table(figures: dict[str, Any]) -> str:
    floor_, rate = figures["floor"], figures["matrix_rate"]
    lines = [
        f"{figures['device']}, torch {figures['torch']}, {figures['cpu_threads']} CPU threads; model {figures['config']['model']}, "
        f"batch {figures['batch_size']}; {figures['images_per_pass']:,} images timed per pass, median of {figures['passes']} "
        f"pass(es), after {figures['warmup_images']:,} untimed warm-up images; load average {figures['load_average']['before']}",
        f"{'pipeline':<38}{'trials':>7}{'images/s':>11}{'s / 50k epoch':>15}{'x reference':>13}{'warm-up s':>11}{'other load':>12}",
    ]
    for r in figures["results"]:
        ratio = f"{r['ratio_to_reference']:.2f}" if r["ratio_to_reference"] is not None else "-"
        others = [c for c in r["others_cores"] if c is not None]
        load = f"{max(others):.2f}" if others else "-"
        lines.append(f"{r['name']:<38}{r['trials']:>7}{r['images_per_second']:>11,.0f}{r['epoch_seconds']:>15.2f}{ratio:>13}"
                     f"{r['warmup_seconds']:>11.1f}{load:>12}")
    lines += [f"{name:<38}  failed: {error}" for name, error in figures.get("failed", {}).items()]
    lines += pass_by_pass(figures["results"])
    lines.append(
        f"{'floor':<38}{'':>7}{floor_['images_per_second']:>11,.0f}{floor_['epoch_seconds']:>15.2f}  "
        f"({floor_['flops_per_image'] / 1e6:.1f} MFLOP per training image at {rate['flops_per_second'] / 1e12:.2f} TFLOP/s "
        f"measured, {rate['dtype']} {rate['size']}x{rate['size']} matrix product)"
    )
    if figures.get("accuracy"):
        a = figures["accuracy"]
        mean = lambda name: 100 * statistics.mean(a[name]["test_acc"])  # noqa: E731
        lines.append(f"test accuracy after {a['epochs']} epochs on {a['train_images']:,} images, mean of {len(a['seeds'])} seeds: "
                     f"reference {mean('reference'):.2f}%, engine {mean('engine'):.2f}% ({a['test_acc_difference_points']:+.2f} points)")
    if figures.get("seed_trials_without_ray"):
        t = figures["seed_trials_without_ray"]
        lines.append(f"seed space without Ray ({t['trials']} trials x {t['epochs']} epochs, {t['at_once']} at a time, "
                     f"plain processes): {t['seconds']:.1f} s wall clock"
                     + (f"; in their epochs {min(t['trial_epochs_s']):.1f}-{max(t['trial_epochs_s']):.1f} s each" if t.get("trial_epochs_s") else ""))
    if figures.get("sweep"):
        s = figures["sweep"]
        written = f"analysis written at {s['analysis_written_s']:.1f} s, " if s.get("analysis_written_s") else ""
        lines.append(f"seed sweep (6 trials x 30 epochs): {written}{s['seconds']:.1f} s to exit {s['returncode']}: {s['command']}")
        if s.get("timeline"):
            t = s["timeline"]
            span = lambda key: f"{t[key][0]:.1f}-{t[key][1]:.1f} s"  # noqa: E731
            lines.append(f"  trials started at {span('trials_started_s')} and ended at {span('trials_ended_s')} after the command's "
                         f"start; in their epochs {span('trial_epochs_s')} each, outside them {span('trial_outside_epochs_s')} "
                         f"(set-up before the first epoch {span('trial_setup_s')})")
    return "\n".join(lines)


def pass_by_pass(results: list[dict[str, Any]]) -> list[str]:
    """With more than one round: each side-by-side row's images/s pass by pass and its ratio to the reference's
    pass of the same round, so that a machine whose speed drifted shows it."""
    if len(results[0]["seconds"]) < 2:
        return []
    lines = ["pass by pass (images/s; x reference in the same round):"]
    for r in results:
        if r["ratio_to_reference_by_pass"] is not None:
            speeds = " / ".join(f"{v:,.0f}" for v in r["images_per_second_by_pass"])
            ratios = " / ".join(f"{v:.2f}" for v in r["ratio_to_reference_by_pass"])
            lines.append(f"  {r['name']:<36}{speeds}" + ("" if r is results[0] else f"   x {ratios}"))
    return lines


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else None
    return f"CPU {model.group(1).strip() if model else platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tune_cnn"], cwd=ROOT, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty.strip() else "")


def load_average() -> str | None:
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else None


def result_path(folder: Path, figures: dict[str, Any], quick: bool) -> Path:
    """<date>-<device>[-quick].json, or with -2, -3, ... added where an earlier run took the name."""
    slug = re.sub(r"[^a-z0-9]+", "-", figures["device"].lower()).strip("-")[:60]
    stem = f"{figures['date'][:10]}-{slug}{'-quick' if quick else ''}"
    path, number = folder / f"{stem}.json", 2
    while path.exists():
        path, number = folder / f"{stem}-{number}.json", number + 1
    return path


# --- Command line ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(prog="python -m tune_cnn.bench", description="Time the tutorial pipeline against tune_cnn's engine.")
    parser.add_argument("--data", default=None, help=DATA_HELP)
    parser.add_argument("--quick", action="store_true", help="fewer images and passes: under two minutes on a 2-core CPU")
    parser.add_argument("--images", type=int, default=None, help="training images timed per pass (default the whole training split, 45,000 for CIFAR-10; 6,000 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="timed passes per pipeline, alternating (default 3; 2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size (default 32, the seed's)")
    parser.add_argument("--workers", type=int, default=2, help="the reference DataLoader's worker processes (default 2)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=None,
                        help="numbers of concurrent engine trials to time (default 1 2 4 8 on a GPU, none on the CPU)")
    parser.add_argument("--variants", nargs="*", choices=tuple(VARIANTS), default=None,
                        help="on CUDA, the engine variants to time beside the reference (default all; none: the reference only)")
    parser.add_argument("--seed-trials-at-once", type=int, default=round(1 / AUTO_GPU_PER_TRIAL),
                        help=f"seed-space trials training at once (default {round(1 / AUTO_GPU_PER_TRIAL)}, what gpu: auto packs)")
    parser.add_argument("--sweep", choices=("auto", "yes", "no"), default="auto",
                        help="time the whole seed sweep through Ray, command to analysis (auto: when a GPU and Ray are there)")
    parser.add_argument("--seed-trials", choices=("auto", "yes", "no"), default="auto",
                        help="time the seed space's 6 trials as plain processes, without Ray (auto: on a GPU)")
    parser.add_argument("--accuracy-epochs", type=int, default=0,
                        help="also train the reference loop and the engine this many epochs per seed and compare accuracy")
    parser.add_argument("--accuracy-seeds", type=int, default=3, help="seeds for --accuracy-epochs (default 3)")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="training settings, as for tune_cnn.train")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON figures")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace, data: DataSplits) -> Plan:
    settings = {"batch_size": 32, **parse_settings(args.set)}
    config = TrainConfig.from_flat({**settings, **({"batch_size": args.batch_size} if args.batch_size is not None else {})})
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    if rounds < 1 or args.workers < 0 or args.accuracy_epochs < 0 or args.accuracy_seeds < 1:
        raise ConfigError(f"--rounds {rounds}, --workers {args.workers}, --accuracy-epochs {args.accuracy_epochs} or --accuracy-seeds "
                          f"{args.accuracy_seeds} is out of range; use --rounds >= 1, --workers >= 0, --accuracy-epochs >= 0, --accuracy-seeds >= 1")
    on_gpu = resolve_device(config.device).type == "cuda"
    concurrency = args.concurrency if args.concurrency is not None else ([1, 2, 4, 8] if on_gpu else [])
    if args.variants is not None and not on_gpu:
        raise ConfigError("--variants chooses among CUDA engine variants, and this machine has no CUDA GPU; leave it out")
    if args.seed_trials_at_once < 1:
        raise ConfigError(f"--seed-trials-at-once {args.seed_trials_at_once} is out of range; use 1 or more")
    if any(n < 1 for n in concurrency):
        raise ConfigError(f"--concurrency {' '.join(map(str, concurrency))} is not allowed; use counts of trials >= 1, such as 1 2 4 8")
    images = args.images if args.images is not None else min(QUICK_IMAGES if args.quick else len(data.train), len(data.train))
    if not config.batch_size <= images <= len(data.train):
        raise ConfigError(f"--images {images} is out of range; use {config.batch_size} (one batch) to {len(data.train)} (the training split)")
    return Plan(config, images, rounds, args.workers, concurrency, args.variants)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_folder_can_be_made(args.out, f"--out {args.out}", "choose a writable folder for the figures")
    data = load_data(args.data)
    plan = make_plan(args, data)
    print(f"{data.describe()}; timing {plan.images:,} images per pass ...", flush=True)
    figures = run_benchmark(plan, data, args.quick)
    figures["command"] = "python -m tune_cnn.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    path = result_path(args.out, figures, args.quick)
    save(figures, path)  # now and after each later part: a long run cut short keeps what it measured
    if args.accuracy_epochs:
        figures["accuracy"] = compare_accuracy(plan.config, data, args.accuracy_epochs, range(args.accuracy_seeds))
        save(figures, path)
    on_gpu = resolve_device(plan.config.device).type == "cuda"
    if wanted(args.seed_trials, on_gpu):
        print(f"timing the seed space's trials, {args.seed_trials_at_once} at a time ...", flush=True)
        figures["seed_trials_without_ray"] = time_seed_trials(data.source, args.seed_trials_at_once, parse_settings(args.set))
        save(figures, path)
    if wanted(args.sweep, on_gpu and importlib.util.find_spec("ray") is not None):
        with tempfile.TemporaryDirectory(prefix="tune_cnn_bench_sweep_") as folder:
            figures["sweep"] = time_seed_sweep(data.source, Path(folder))
        save(figures, path)
    print(format_table(figures))
    print(f"figures: {path}")


def save(figures: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
