"""Data sets: CIFAR-10, a cifar-10-batches-py folder, an image folder, or an archive of either.

Every source ends as uint8 arrays (N, C, H, W) with int64 labels, decoded once and cached on disk, split
into train / validation (held out of train, stratified, seeded) / test, with normalisation statistics
taken from the training split. Each source is read by a module of its own: cifar.py, image_folder.py, archives.py.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tune_cnn.config import InputShape, from_environment
from tune_cnn.data.archives import ARCHIVE_SUFFIXES, ARCHIVES_TEXT, extract_archive
from tune_cnn.data.arrays import Arrays, RawData
from tune_cnn.data.cifar import CIFAR_URL_HINT, download_cifar10, read_cifar_batches
from tune_cnn.data.image_folder import hidden, read_image_folder_cached
from tune_cnn.errors import DataError, write_probe

__all__ = ["ARCHIVE_SUFFIXES", "DATA_HELP", "Arrays", "DataSplits", "RawData", "channel_statistics", "load_data", "stratified_split",
           "stratified_subset"]
STATISTICS_CHUNK = 2048  # images per histogram step in channel_statistics: a few MB, reused from the heap
DATA_HELP = f"cifar10 (default, or $TUNE_CNN_DATA), a folder, or a {ARCHIVES_TEXT}"


@dataclass
class DataSplits:
    train: Arrays
    val: Arrays
    test: Arrays
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    split_seed: int = 0  # the seed of the validation split and the subset
    subset: int | None = None

    @property
    def split(self) -> dict[str, int | None]:
        """What chose the validation split and the subset, for a checkpoint to train on the same images again."""
        return {"seed": self.split_seed, "subset": self.subset}

    @property
    def fingerprint(self) -> str:
        """A short hash of the class names and the training split's labels, in order: another data set of the same
        shape and split differs there. Not of the pixels, which another build of an image decoder may change."""
        digest = hashlib.blake2b("\n".join(self.classes).encode(), digest_size=8)
        digest.update(self.train.y.astype(np.int64).tobytes())
        return digest.hexdigest()

    @property
    def images(self) -> int:
        """Images in all three splits."""
        return len(self.train) + len(self.val) + len(self.test)

    @property
    def shape(self) -> InputShape:
        _, channels, height, width = self.train.x.shape
        return InputShape(channels, height, width, len(self.classes))

    def describe(self) -> str:
        s = self.shape
        return (
            f"{self.source}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test images, "
            f"{s.channels}x{s.height}x{s.width}, {s.classes} classes"
        )


def default_cache_dir() -> Path:
    return Path(from_environment("TUNE_CNN_CACHE", str(Path.home() / ".cache" / "tune_cnn")))


def default_source() -> str:
    return from_environment("TUNE_CNN_DATA", "cifar10")


def load_data(
    source: str | Path | None = None,
    *,
    val_fraction: float = 0.1,
    subset: int | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> DataSplits:
    """Load a data set and split it. `subset` keeps a stratified N-image subset of the training split."""
    if source == "":
        raise DataError("--data is empty; pass cifar10, a folder or an archive (or leave it out for $TUNE_CNN_DATA)")
    source = str(source or default_source())
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction} is out of range; use a fraction between 0 and 1, such as 0.1")
    raw = load_raw(source, cache_dir or default_cache_dir())
    if raw.val is None:
        val_index, train_index = stratified_split(raw.train.y, val_fraction, seed)
        train, val = raw.train.take(train_index), raw.train.take(val_index)
        if not len(val):
            raise DataError(f"{source}: one training image per class leaves none to hold out for validation; "
                            f"add images or a val/ folder")
    else:
        train, val = raw.train, raw.val
    if subset is not None:
        classes = len(np.unique(train.y))
        if not classes <= subset <= len(train):
            raise DataError(f"subset {subset} is out of range; use {classes} (one image of each class) to {len(train)} training images")
        train = train.take(stratified_subset(train.y, subset, seed))
    mean, std = channel_statistics(train.x)
    return DataSplits(train, val, raw.test, raw.classes, mean, std, source, seed, subset)


def load_raw(source: str, cache_dir: Path) -> RawData:
    if source == "cifar10":
        return read_cifar_batches(download_cifar10(cache_folder(cache_dir, "cifar10")))
    path = Path(source).expanduser()
    if path.is_symlink() and not path.exists():
        raise DataError(f"data path {path} is a link to {os.readlink(path)}, which leads nowhere (missing, or a loop of links); "
                        f"point the link, or --data, at the data")
    if not path.exists():
        raise DataError(f"data path {path} does not exist; {CIFAR_URL_HINT}, or use --data cifar10")
    if not path.is_file():
        return read_folder(path, cache_dir)
    extracted = extract_archive(path, cache_folder(cache_dir, "extracted"))
    try:
        return read_folder(extracted, cache_dir)
    except DataError as error:  # name the user's archive, not the cache folder it was extracted to
        raise DataError(str(error).replace(str(extracted), str(path))) from None


def read_folder(path: Path, cache_dir: Path) -> RawData:
    root = find_data_root(path)
    if (root / "data_batch_1").exists():
        return read_cifar_batches(root)
    return read_image_folder_cached(root, cache_folder(cache_dir, "decoded"))


def find_data_root(path: Path) -> Path:
    """The folder itself, or its single subfolder (archives often wrap everything in one)."""
    if _is_data_root(path):
        return path
    children = [c for c in path.iterdir() if c.is_dir() and not hidden(c)]
    if len(children) == 1 and _is_data_root(children[0]):
        return children[0]
    if not any(path.iterdir()):
        raise DataError(f"data folder {path} is empty; it needs train/<class>/ and test/<class>/ image folders")
    raise DataError(
        f"{path} is neither an image folder (train/<class>/*.png|jpg and test/<class>/...) "
        f"nor a cifar-10-batches-py folder; {CIFAR_URL_HINT}"
    )


def _is_data_root(path: Path) -> bool:
    return (path / "data_batch_1").exists() or ((path / "train").is_dir() and (path / "test").is_dir())


# --- The cache ---


def cache_folder(cache_dir: Path, part: str) -> Path:
    """cache_dir/part, made if missing; one DataError where it cannot be made or written."""
    folder = cache_dir / part
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_probe(folder)
    except OSError as error:
        raise DataError(f"cache folder {folder} cannot be written ({error.strerror}); set TUNE_CNN_CACHE to a writable "
                        f"folder") from None
    return folder


# --- Splits and statistics ---


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out indices, remaining indices): `fraction` of every class, chosen with `seed`; at least one image
    of every class that has two or more, so that a small data set still has a validation split."""
    rng = np.random.default_rng(seed)
    held, kept = [], []
    for c in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == c))
        n = max(int(round(len(index) * fraction)), 1 if len(index) > 1 else 0)
        held.append(index[:n])
        kept.append(index[n:])
    return np.sort(np.concatenate(held)), np.sort(np.concatenate(kept))


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` indices (at least one per class): one image of every class, then the rest shared in the classes'
    proportions of their other images (largest remainders get what rounding leaves)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = (counts - 1) * (size - len(classes)) / (counts - 1).sum().clip(min=1)
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota)[: size - len(classes) - take.sum()]] += 1
    take += 1
    rng = np.random.default_rng(seed + 1)
    parts = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(parts))


def channel_statistics(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, on the 0..1 scale.

    From each channel's histogram of its 256 values, summed over chunks of images: the float64 mean and std to
    1e-16, without a float copy of the images, which took most of a load's time.
    """
    levels = np.arange(256, dtype=np.float64) / 255
    counts = np.zeros((x.shape[1], 256), dtype=np.int64)
    for start in range(0, len(x), STATISTICS_CHUNK):
        for channel, chunk in enumerate(x[start : start + STATISTICS_CHUNK].swapaxes(0, 1)):
            counts[channel] += np.bincount(chunk.ravel(), minlength=256)
    means, stds = [], []
    for channel_counts in counts:
        share = channel_counts / channel_counts.sum()
        mean = share @ levels
        means.append(float(mean))
        stds.append(max(float(np.sqrt(share @ (levels - mean) ** 2)), 1e-6))
    return tuple(means), tuple(stds)
