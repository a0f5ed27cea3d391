"""MNIST-1D (Greydanus 2020): 40-sample 1-D signals of the ten digits, generated offline.

The ``mnist1d`` package's own generator builds the data from its digit templates with a fixed seed, so
the raw files regenerate byte-identically (same numpy/scipy) and nothing is ever downloaded. The raw
files are named by sample count because ``dataset.num_samples`` changes the generated data: several
sizes can live side by side in ``data/mnist1d/``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedtail.datasets.base import DatasetSpec, Splits, stratified_split
from fedtail.io import write_npy
from fedtail.registry import DATASETS

if TYPE_CHECKING:
    from fedtail.config import DatasetConfig

NUM_CLASSES = 10
GENERATOR_SEED = 42  # the package's published seed; part of the dataset, not of an experiment
SPLIT_SEED = 0  # the train/test split is part of the dataset, not of an experiment's seed


def num_generated(cfg: DatasetConfig) -> int:
    """Samples the generator really makes: ``num_samples // 10`` per class."""
    return (cfg.num_samples // NUM_CLASSES) * NUM_CLASSES


def raw_files(cfg: DatasetConfig) -> list[str]:
    """The files `materialize` writes for this config (staging checks they are all present)."""
    n = num_generated(cfg)
    return [f"x_n{n}.npy", f"y_n{n}.npy"]


def _train_size(cfg: DatasetConfig) -> int:
    n = num_generated(cfg)
    return n - math.ceil(cfg.test_fraction * n)  # the same rounding as sklearn's train_test_split


def _materialize(cfg: DatasetConfig, raw_dir: Path) -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = cfg.num_samples
    args.seed = GENERATOR_SEED
    # make_dataset seeds the global `random` / `np.random` state: keep the caller's streams intact.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    # The generator's 80/20 cut ignores dataset.test_fraction; keep all samples, split in `_load`.
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    x_name, y_name = raw_files(cfg)
    write_npy(raw_dir / x_name, x)
    write_npy(raw_dir / y_name, y)


def _load(cfg: DatasetConfig, raw_dir: Path) -> Splits:
    x_name, y_name = raw_files(cfg)
    x = np.load(raw_dir / x_name).astype(np.float32)
    y = np.load(raw_dir / y_name).astype(np.int64)
    x_tr, y_tr, x_te, y_te = stratified_split(x, y, cfg.test_fraction, SPLIT_SEED)
    mean = x_tr.mean(axis=0, keepdims=True)
    std = x_tr.std(axis=0, keepdims=True)
    std[std == 0] = 1.0
    x_tr = ((x_tr - mean) / std).astype(np.float32)
    x_te = ((x_te - mean) / std).astype(np.float32)
    return Splits(x_tr, y_tr, x_te, y_te)


SPEC = DATASETS.register("mnist1d")(
    DatasetSpec(
        name="mnist1d",
        num_classes=NUM_CLASSES,
        input_shape=(40,),
        default_model="cnn1d",
        train_size=_train_size,
        materialize=_materialize,
        load=_load,
        source=f"mnist1d.data.make_dataset (generated offline, seed {GENERATOR_SEED})",
        revision=1,  # 1: model.name auto picks cnn1d (0: mlp)
        modality="signal",
        view=(1, 40),  # one channel of 40 steps, standardised per step
        augmentations=("signal_weak", "signal_strong"),
    )
)
