"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 through ``torchvision.datasets``.

torchvision reads its own file layout under ``dataset.root`` (and downloads into it only when
``dataset.download`` is true). ``materialize`` copies the pixels out once as raw uint8 ``.npy`` files, so
the DVC-versioned ``data/<name>/`` no longer needs ``root``; ``load`` scales to [0, 1] and normalises
with the usual per-channel mean/std of each training set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedtail.datasets.base import DatasetSpec, Splits
from fedtail.io import write_npy
from fedtail.registry import DATASETS

if TYPE_CHECKING:
    from torchvision.datasets import VisionDataset

    from fedtail.config import DatasetConfig

RAW_FILES = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy")
_CHUNK = 4096  # images normalised per step: bounds the float temporaries to a few MB


@dataclass(frozen=True)
class _Source:
    name: str
    torchvision_class: str
    layout: str  # what torchvision expects under dataset.root, for error messages
    num_classes: int
    input_shape: tuple[int, int, int]
    train_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


MNIST_RAW = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_FILES = ", ".join(MNIST_RAW)
SOURCES = (
    _Source("mnist", "MNIST", f"MNIST/raw/{{{_MNIST_FILES}}}", 10, (1, 28, 28), 60_000, (0.1307,), (0.3081,)),
    _Source(
        "fashion-mnist",
        "FashionMNIST",
        f"FashionMNIST/raw/{{{_MNIST_FILES}}}",
        10,
        (1, 28, 28),
        60_000,
        (0.2860,),
        (0.3530,),
    ),
    _Source(
        "cifar10",
        "CIFAR10",
        "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (md5-checked by torchvision)",
        10,
        (3, 32, 32),
        50_000,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    _Source(
        "cifar100",
        "CIFAR100",
        "cifar-100-python/{train, test, meta} (md5-checked by torchvision)",
        100,
        (3, 32, 32),
        50_000,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
)


def raw_files(cfg: DatasetConfig) -> list[str]:
    """The files `materialize` writes (staging checks they are all present)."""
    return list(RAW_FILES)


def _open(src: _Source, cfg: DatasetConfig, train: bool) -> VisionDataset:
    """The torchvision dataset object, or a ValueError that says what to put where."""
    from torchvision import datasets

    hint = (
        f"set dataset.root to a folder holding {src.layout}, or set dataset.download: true to let "
        f"torchvision download {src.torchvision_class} into dataset.root"
    )
    if cfg.root is None:
        raise ValueError(f"dataset {src.name!r} reads torchvision files but dataset.root is not set: {hint}")
    root = Path(cfg.root).expanduser()
    try:
        return getattr(datasets, src.torchvision_class)(str(root), train=train, download=cfg.download)
    except RuntimeError as err:
        if cfg.download:
            raise
        raise ValueError(
            f"dataset {src.name!r}: torchvision found no valid {src.torchvision_class} files under "
            f"dataset.root={str(root)!r} and dataset.download is false ({err}); {hint}"
        ) from None


def _arrays(ds: VisionDataset) -> tuple[np.ndarray, np.ndarray]:
    """MNIST keeps torch tensors, CIFAR numpy arrays and a list of labels: one uint8 pair for all."""
    images = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
    labels = ds.targets.numpy() if hasattr(ds.targets, "numpy") else np.asarray(ds.targets)
    return images.astype(np.uint8, copy=False), labels.astype(np.uint8)


def _materialize(src: _Source, cfg: DatasetConfig, raw_dir: Path) -> None:
    train, test = _open(src, cfg, train=True), _open(src, cfg, train=False)
    for split, ds in (("train", train), ("test", test)):
        images, labels = _arrays(ds)
        write_npy(raw_dir / f"{split}_images.npy", images)
        write_npy(raw_dir / f"{split}_labels.npy", labels)


def normalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (N,H,W) or (N,H,W,C) -> float32 (N,C,H,W), ``(x/255 - mean) / std`` per channel.

    Works chunk by chunk into one preallocated array: CIFAR's 50k images stay ~600 MB, not 3x that.
    """
    nhwc = images if images.ndim == 4 else images[..., None]
    n, h, w, c = nhwc.shape
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).reshape(1, c, 1, 1)
    shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(1, c, 1, 1)
    out = np.empty((n, c, h, w), dtype=np.float32)
    for i in range(0, n, _CHUNK):
        block = out[i : i + _CHUNK]
        block[...] = nhwc[i : i + _CHUNK].transpose(0, 3, 1, 2)
        block *= scale
        block -= shift
    return out


def _load(src: _Source, cfg: DatasetConfig, raw_dir: Path) -> Splits:
    arrays = {name: np.load(raw_dir / name) for name in RAW_FILES}
    return Splits(
        normalise(arrays["train_images.npy"], src.mean, src.std),
        arrays["train_labels.npy"].astype(np.int64),
        normalise(arrays["test_images.npy"], src.mean, src.std),
        arrays["test_labels.npy"].astype(np.int64),
    )


def _spec(src: _Source) -> DatasetSpec:
    """Closures, not partials: staging finds `raw_files` through the functions' ``__module__``."""

    def materialize(cfg: DatasetConfig, raw_dir: Path) -> None:
        _materialize(src, cfg, raw_dir)

    def load(cfg: DatasetConfig, raw_dir: Path) -> Splits:
        return _load(src, cfg, raw_dir)

    def train_size(cfg: DatasetConfig) -> int:
        return src.train_size  # canonical size: config validation must not need the files

    return DatasetSpec(
        name=src.name,
        num_classes=src.num_classes,
        input_shape=src.input_shape,
        default_model="cnn",
        train_size=train_size,
        materialize=materialize,
        load=load,
        source=f"torchvision.datasets.{src.torchvision_class} (from dataset.root)",
        modality="image",
        view=None,  # already (C,H,W), normalised per channel
        augmentations=("shift" if src.name == "mnist" else "flip_shift", "randaugment"),  # MNIST: digits
    )


SPECS = {src.name: DATASETS.register(src.name)(_spec(src)) for src in SOURCES}
