"""What a dataset plug-in provides: class count, input shape, and two functions.

``materialize`` writes the *raw* data into ``data/<name>/`` (the DVC-versioned folder) in a byte-stable
format (``.npy``); ``load`` turns that raw folder into normalised float32 train/test splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedtail.config import DatasetConfig


@dataclass(frozen=True)
class Splits:
    """Normalised arrays: x float32 with shape (N, *input_shape), y int64 class ids in [0, C)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    default_model: str
    train_size: Callable[[DatasetConfig], int]
    materialize: Callable[[DatasetConfig, Path], None]
    load: Callable[[DatasetConfig, Path], Splits]
    source: str = ""
    revision: int = 0
    """Bumped whenever the same config gets something else from the dataset: other arrays from the same
    raw files (`load`, e.g. a new normalisation) or another `default_model`. It enters the staged-cache key
    and every experiment fingerprint, so neither staged arrays nor a checkpoint or sweep result of the
    older revision is reused."""


def stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded stratified train/test split for datasets that ship without one."""
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te
