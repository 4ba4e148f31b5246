"""Shared fixtures: generated image folders, small in-memory data sets and the shared CIFAR-10 copy."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tune_cnn.data import Arrays, DataSplits, channel_statistics

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = Path(os.environ.get("TUNE_CNN_TEST_CIFAR", ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))


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
