"""A data set as arrays: decoded images (uint8, N x C x H x W) with int64 labels, as read from disk (RawData)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Arrays:
    """Decoded images (uint8, N x C x H x W) and labels (int64)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> Arrays:
        return Arrays(self.x[index], self.y[index])


@dataclass
class RawData:
    """A data set as it is on disk, before the validation split."""

    train: Arrays
    test: Arrays
    classes: tuple[str, ...]
    val: Arrays | None = None
