"""python -m tune_cnn.bench: time the tutorials' pipeline against tune_cnn's engine and print the table."""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from tune_cnn.bench.evaluation import epoch_overhead, time_evaluation
from tune_cnn.bench.reference import compare_accuracy
from tune_cnn.bench.side_by_side import VARIANTS, Plan, floor, matrix_rate, time_concurrent, time_side_by_side
from tune_cnn.bench.sweeps import time_seed_sweep, time_seed_trials
from tune_cnn.config import TrainConfig
from tune_cnn.data import DATA_HELP, DataSplits, load_data, stratified_subset
from tune_cnn.engine import resolve_device
from tune_cnn.errors import CommandParser, ConfigError, check_folder_can_be_made, exit_on_user_error
from tune_cnn.space import AUTO_GPU_PER_TRIAL
from tune_cnn.train import parse_settings

QUICK_IMAGES = 6000
ROOT = Path(__file__).resolve().parents[2]


def wanted(choice: str, when_auto: bool) -> bool:
    return when_auto if choice == "auto" else choice == "yes"


def run_benchmark(plan: Plan, data: DataSplits, quick: bool = False) -> dict[str, Any]:
    """Time everything `plan` asks for and return the figures (what the JSON file holds)."""
    device = resolve_device(plan.config.device)
    sample = data.train.take(stratified_subset(data.train.y, plan.images, plan.config.seed))
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="tune_cnn_bench_") as folder:
        timings, failures = time_side_by_side(plan, data, sample, Path(folder))
        timings += [time_concurrent(plan, data, sample, trials, Path(folder)) for trials in plan.concurrency]
    rate = matrix_rate(device, quick)
    evaluation = time_evaluation(plan, data)
    engine = next(t for t in timings[1:] if t.trials == 1)  # the engine as configured, timed beside the reference
    evaluation["training_epoch_s"] = len(data.train) / engine.images_per_second
    evaluation["epoch_overhead"] = epoch_overhead(evaluation, evaluation["training_epoch_s"])
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
        "evaluation": evaluation,
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
    if figures.get("evaluation"):
        e = figures["evaluation"]
        lines.append(f"evaluation of {e['images']:,} images (validation + test), median of {e['rounds']} alternating rounds: "
                     f"{e['with_diagnostics_s']:.3f} s with the prediction diagnostics, {e['loss_and_accuracy_s']:.3f} s loss and "
                     f"accuracy alone; a {e['training_epoch_s']:.1f} s training pass besides: the diagnostics cost "
                     f"{100 * e['epoch_overhead']:.2f}% of an epoch")
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
    parser.add_argument("--images", type=int, default=None,
                        help="training images timed per pass (default the whole training split, 45,000 for CIFAR-10; 6,000 with --quick)")
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
