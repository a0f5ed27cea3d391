"""scikit-learn's embedded 8x8 ``digits`` (1,797 images, 10 classes): the offline default."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedtail.datasets.base import DatasetSpec, Splits, stratified_split
from fedtail.io import write_npy
from fedtail.registry import DATASETS

N_SAMPLES = 1797
SPLIT_SEED = 0  # the train/test split is part of the dataset, not of an experiment's seed
RAW_FILES = ("images.npy", "labels.npy")


def raw_files(cfg) -> list[str]:
    """The files `materialize` writes (each is one DVC output in data.dvc)."""
    return list(RAW_FILES)


def _materialize(cfg, raw_dir: Path) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = RAW_FILES
    write_npy(raw_dir / images, bunch.data.astype(np.uint8))
    write_npy(raw_dir / labels, bunch.target.astype(np.int64))


def _load(cfg, raw_dir: Path) -> Splits:
    """Pixels (0..16) standardised with the training split's one mean and std, as torchvision sets are
    per channel: scaled to [0, 1] only (mean 0.31, std 0.38), a task's first large step could push every
    ReLU of the MLP off and the network stopped learning new classes (issue 18)."""
    images, labels = RAW_FILES
    x = np.load(raw_dir / images).astype(np.float32)
    y = np.load(raw_dir / labels).astype(np.int64)
    x_tr, y_tr, x_te, y_te = stratified_split(x, y, cfg.test_fraction, SPLIT_SEED)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return Splits((x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te)


SPEC = DATASETS.register("digits")(
    DatasetSpec(
        name="digits",
        num_classes=10,
        input_shape=(64,),
        default_model="mlp",
        train_size=lambda cfg: N_SAMPLES - int(np.ceil(N_SAMPLES * cfg.test_fraction)),
        materialize=_materialize,
        load=_load,
        source="sklearn.datasets.load_digits (embedded in scikit-learn)",
        revision=1,  # 1: standardised (0: pixels / 16)
        modality="image",
        view=(1, 8, 8),  # stored flat (64,), pixels standardised with one mean and std
        augmentations=("shift", "randaugment"),
    )
)
