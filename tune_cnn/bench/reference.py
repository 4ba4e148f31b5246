"""The reference: the input pipeline and loop written the way Ray Tune's and PyTorch's CIFAR-10 tutorials write
them, run in a plain process of its own as a tutorial script runs; and the accuracy check against the engine."""
from __future__ import annotations

import dataclasses
import queue
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from tune_cnn.bench.clock import PROCESS_TIMEOUT_S, Plan, load_sample, measured, timed
from tune_cnn.config import InputShape, TrainConfig
from tune_cnn.data import Arrays, DataSplits
from tune_cnn.engine import build_engine, eval_batch_size, evaluate, optimizer_settings, resolve_device
from tune_cnn.models import build_model


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
    optimizer = torch.optim.AdamW if config.optimizer == "adam" else torch.optim.SGD  # sgd and nesterov: optimizer_settings
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
            scores["reference"][f"{split}_acc"].append(evaluate(model, splits[split], eval_batch_size(seeded, engine.device))["acc"])
            scores["engine"][f"{split}_acc"].append(engine.evaluate(splits[split])["acc"])
    difference = statistics.mean(scores["engine"]["test_acc"]) - statistics.mean(scores["reference"]["test_acc"])
    return {"epochs": epochs, "seeds": list(seeds), "train_images": len(data.train), **scores, "test_acc_difference_points": 100 * difference}


class ReferenceProcess:
    """The reference pipeline in a plain process of its own, as a tutorial script runs it; each call times one
    pass there and returns its seconds and the other load.

    Not in the benchmark's own process: the engine's process-wide allocator settings (engine.keep_freed_memory)
    would speed the reference up as well, crediting it with one of the engine's optimisations.
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
    platform's default): a spawned process would otherwise spawn them too, paying their imports every epoch."""
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
