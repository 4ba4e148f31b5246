"""CIFAR-10: the official download, and its pickled batches (cifar-10-batches-py), read without running code."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from filelock import FileLock

from tune_cnn.data.archives import ARCHIVES_TEXT
from tune_cnn.data.arrays import Arrays, RawData
from tune_cnn.errors import DataError

CIFAR_URL_HINT = (
    "point --data (or TUNE_CNN_DATA) at a local copy: a cifar-10-batches-py folder, an image folder "
    f"with train/<class>/ and test/<class>/, or a {ARCHIVES_TEXT} of either"
)

def download_cifar10(target: Path) -> Path:
    """Download and extract CIFAR-10 once; a file lock keeps concurrent processes from doing it twice."""
    batches = target / "cifar-10-batches-py"
    with FileLock(str(target / ".lock")):
        if not (batches / "test_batch").exists():
            from torchvision.datasets import CIFAR10

            try:
                CIFAR10(str(target), download=True)
            except Exception as error:  # noqa: BLE001 - any network failure: urllib, ssl, socket, http
                raise DataError(
                    f"could not download CIFAR-10 ({type(error).__name__}); this machine may be offline: "
                    f"{CIFAR_URL_HINT}"
                ) from None
    return batches


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a data file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data file")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    except Exception as error:  # noqa: BLE001 - a damaged or foreign pickle fails in many ways
        raise DataError(f"{path} is not a CIFAR-10 batch file ({error}); re-download or re-extract the data set") from None


def read_cifar_batches(folder: Path) -> RawData:
    train_files = sorted(folder.glob("data_batch_*"))
    missing = [name for name in ("test_batch", "batches.meta") if not (folder / name).exists()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}; a cifar-10-batches-py folder needs data_batch_1 (CIFAR-10 has 1 to 5), "
                        f"test_batch and batches.meta")
    meta = _read_batch(folder / "batches.meta")
    if not isinstance(meta.get("label_names"), list):
        raise DataError(f"{folder / 'batches.meta'} has no label_names list; re-download or re-extract the data set")
    classes = tuple(n.decode() if isinstance(n, bytes) else n for n in meta["label_names"])
    train = [_batch_arrays(_read_batch(p), p) for p in train_files]
    test = _batch_arrays(_read_batch(folder / "test_batch"), folder / "test_batch")
    train_arrays = Arrays(np.concatenate([a.x for a in train]), np.concatenate([a.y for a in train]))
    return RawData(train_arrays, test, classes)


def _batch_arrays(batch: dict, path: Path) -> Arrays:
    try:
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch["labels"], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as error:
        raise DataError(f"{path} is not a CIFAR-10 batch file (its data or labels: {error}); re-download or re-extract the data set") from None
    if len(x) != len(y):
        raise DataError(f"{path} holds {len(x)} images and {len(y)} labels; re-download or re-extract the data set")
    return Arrays(x, y)
