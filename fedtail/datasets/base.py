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
    modality: str = "image"
    """What a sample is, so augmentations can refuse data they do not fit: ``"image"``, inputs are images,
    stored flat or as (C,H,W); ``"signal"``, 1-D sequences."""
    view: tuple[int, ...] | None = None
    """How a stored sample is seen as a (C,H,W) image or a (C,L) signal (None: ``input_shape`` already
    is). A flat 64-pixel digit is ``(1, 8, 8)``: what a flip or a shift needs to know."""
    augmentations: tuple[str, str] = ("flip_shift", "randaugment")
    """The weak and the strong augmentation ``semisup.weak`` / ``semisup.strong`` = ``auto`` pick
    (FixMatch's pair for natural images; a mirrored digit is another glyph, so digit sets shift only)."""


def stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded stratified train/test split for datasets that ship without one."""
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te
