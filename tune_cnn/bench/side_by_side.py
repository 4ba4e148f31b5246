"""The engine timed beside the reference, pass by pass; N engine trials at once; and the device's floor."""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn

from tune_cnn.bench.clock import EPOCH_IMAGES, PROCESS_TIMEOUT_S, Plan, Timing, load_sample, measured, save_sample, timed
from tune_cnn.bench.reference import ReferenceProcess
from tune_cnn.config import InputShape, TrainConfig
from tune_cnn.data import Arrays, DataSplits
from tune_cnn.engine import build_engine, resolve_device
from tune_cnn.models import build_model

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


def engine_runner(config: TrainConfig, data: DataSplits, sample: Arrays, warmup: Arrays) -> Callable[[], tuple[float, float | None]]:
    """The first call warms up, later calls time one pass each."""
    engine = build_engine(config, data.shape, data.mean, data.std, train_images=data.train.x)
    on_device = iter([engine.put(warmup)])
    timed_data = engine.put(sample)
    return lambda: measured(lambda: engine.train_epoch(next(on_device, timed_data)), engine.device)


# --- Concurrent trials, one process each -----------------------------------------------------------------


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



def training_flops_per_image(model: nn.Module, shape: InputShape) -> int:
    """Multiply-adds of the convolutions and dense layers, times 2 (FLOPs) and 3 (forward + backward)."""
    macs = 0

    def count(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal macs
        weight = module.weight
        per_output = weight[0].numel() if isinstance(module, nn.Conv2d) else weight.shape[1]
        macs += output[0].numel() * per_output

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, shape.channels, shape.height, shape.width))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return 2 * 3 * macs
