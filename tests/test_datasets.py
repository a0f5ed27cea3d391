"""Dataset plug-ins: spec fields, materialize -> load on tiny data, and clear errors.

The torchvision sets read fake files written in the exact on-disk formats torchvision parses (IDX for
MNIST/Fashion-MNIST, pickled batches for CIFAR); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from fedtail.config import ConfigError, DatasetConfig, build_config
from fedtail.datasets import torchvision_sets
from fedtail.registry import DATASETS

N_TRAIN, N_TEST = 24, 12


def _check_splits(splits, spec, n_train: int | None = None) -> None:
    for x, y in ((splits.x_train, splits.y_train), (splits.x_test, splits.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape[1:] == spec.input_shape and len(x) == len(y)
        assert y.min() >= 0 and y.max() < spec.num_classes
        assert np.isfinite(x).all()
    if n_train is not None:
        assert len(splits.y_train) == n_train


# ---- embedded / generated ---------------------------------------------------------------------------
def test_digits_materialize_load(tmp_path: Path) -> None:
    spec = DATASETS.get("digits")
    cfg = DatasetConfig(name="digits")
    assert (spec.num_classes, spec.input_shape, spec.default_model) == (10, (64,), "mlp")
    spec.materialize(cfg, tmp_path)
    splits = spec.load(cfg, tmp_path)
    _check_splits(splits, spec, n_train=spec.train_size(cfg))
    np.testing.assert_allclose([splits.x_train.mean(), splits.x_train.std()], [0.0, 1.0], atol=1e-4)


@pytest.mark.parametrize("num_samples,test_fraction", [(200, 0.25), (333, 0.3)])
def test_mnist1d_materialize_load(tmp_path: Path, num_samples: int, test_fraction: float) -> None:
    from fedtail.datasets import mnist1d

    spec = DATASETS.get("mnist1d")
    assert (spec.num_classes, spec.input_shape, spec.default_model) == (10, (40,), "cnn1d")
    cfg = DatasetConfig(name="mnist1d", num_samples=num_samples, test_fraction=test_fraction)
    py_state, np_state = random.getstate(), np.random.get_state()
    spec.materialize(cfg, tmp_path)
    assert random.getstate() == py_state, "the generator must not reseed the caller's global RNG"
    assert np.array_equal(np.random.get_state()[1], np_state[1])

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(mnist1d.raw_files(cfg))
    x_raw, y_raw = (np.load(tmp_path / f) for f in mnist1d.raw_files(cfg))
    assert x_raw.dtype == np.float32 and y_raw.dtype == np.int64
    assert len(y_raw) == mnist1d.num_generated(cfg) == (num_samples // 10) * 10
    assert np.bincount(y_raw).tolist() == [num_samples // 10] * 10

    splits = spec.load(cfg, tmp_path)
    _check_splits(splits, spec, n_train=spec.train_size(cfg))
    assert len(splits.y_train) + len(splits.y_test) == len(y_raw)
    np.testing.assert_allclose(splits.x_train.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(splits.x_train.std(axis=0), 1.0, atol=1e-3)


def test_mnist1d_regenerates_byte_identically(tmp_path: Path) -> None:
    spec = DATASETS.get("mnist1d")
    cfg = DatasetConfig(name="mnist1d", num_samples=100)
    for sub in ("a", "b"):
        spec.materialize(cfg, tmp_path / sub)
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def test_mnist1d_train_size_drives_config_validation() -> None:
    cfg = build_config(
        {
            "dataset": {"name": "mnist1d", "num_samples": 200},
            "federation": {"num_clients": 150},
            "partition": {"min_partition_size": 1},
        }
    )
    assert DATASETS.get("mnist1d").train_size(cfg.dataset) == 150
    with pytest.raises(ConfigError, match="federation.num_clients=151"):
        build_config({"dataset": {"name": "mnist1d", "num_samples": 200}, "federation": {"num_clients": 151}})


# ---- torchvision: fake files in torchvision's formats -----------------------------------------------
def _idx(path: Path, array: np.ndarray) -> None:
    """IDX ("SN3 Pascal Vincent"): magic 0x0000<type 0x08 = ubyte><ndim>, big-endian dims, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, folder: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(N_TRAIN, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(N_TEST, dtype=np.uint8) % 10,
    }
    arrays["train-images-idx3-ubyte"][0] = 0
    arrays["train-images-idx3-ubyte"][1] = 255
    for name, array in arrays.items():
        _idx(root / folder / "raw" / name, array)
    return arrays


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake_cifar(root: Path, name: str, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch | None):
    """Pickled batches as torchvision reads them; the class's md5 table is pointed at the fake files.

    torchvision 0.29 md5-checks every CIFAR file (MNIST only checks existence), so without patching the
    table (test-only, via monkeypatch) fake files are rejected as corrupt.
    """
    from torchvision import datasets

    cls = getattr(datasets, {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}[name])
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    n_classes = 10 if name == "cifar10" else 100
    train_files = [f for f, _ in cls.train_list]
    per_file = N_TRAIN // len(train_files)
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split, files, n in (("train", train_files, per_file), ("test", [cls.test_list[0][0]], N_TEST)):
        for f in files:
            flat = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, n_classes, n)]
            with open(folder / f, "wb") as fh:
                pickle.dump({"data": flat, label_key: labels}, fh)
            images[split].append(flat.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
    with open(folder / cls.meta["filename"], "wb") as fh:
        pickle.dump({cls.meta["key"]: [f"c{i}" for i in range(n_classes)]}, fh)
    if monkeypatch is not None:
        monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f in train_files])
        monkeypatch.setattr(cls, "test_list", [[cls.test_list[0][0], _md5(folder / cls.test_list[0][0])]])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})
    return {k: np.concatenate(v) for k, v in images.items()}


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_like_from_fake_idx(tmp_path: Path, name: str, folder: str) -> None:
    spec = DATASETS.get(name)
    assert (spec.num_classes, spec.input_shape, spec.default_model) == (10, (1, 28, 28), "cnn")
    fake = _fake_mnist(tmp_path / "tv", folder, np.random.default_rng(0))
    cfg = DatasetConfig(name=name, root=str(tmp_path / "tv"))
    assert spec.train_size(cfg) == 60_000  # canonical, whatever the files hold

    raw = tmp_path / "raw"
    spec.materialize(cfg, raw)
    assert sorted(p.name for p in raw.iterdir()) == sorted(torchvision_sets.RAW_FILES)
    train_images = np.load(raw / "train_images.npy")
    assert train_images.dtype == np.uint8 and train_images.shape == (N_TRAIN, 28, 28)
    assert np.array_equal(train_images, fake["train-images-idx3-ubyte"])
    assert np.array_equal(np.load(raw / "test_labels.npy"), fake["t10k-labels-idx1-ubyte"])

    splits = spec.load(cfg, raw)
    _check_splits(splits, spec)
    assert splits.x_train.shape == (N_TRAIN, 1, 28, 28) and splits.x_test.shape == (N_TEST, 1, 28, 28)
    src = next(s for s in torchvision_sets.SOURCES if s.name == name)
    mean, std = src.mean[0], src.std[0]
    np.testing.assert_allclose(splits.x_train[0], -mean / std, rtol=1e-5)  # an all-black image
    np.testing.assert_allclose(splits.x_train[1], (1 - mean) / std, rtol=1e-5)  # an all-white one
    assert np.array_equal(splits.y_train, np.arange(N_TRAIN) % 10)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_fake_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    spec = DATASETS.get(name)
    assert spec.input_shape == (3, 32, 32) and spec.default_model == "cnn"
    assert spec.num_classes == (10 if name == "cifar10" else 100)
    fake = _fake_cifar(tmp_path / "tv", name, np.random.default_rng(1), monkeypatch)
    cfg = DatasetConfig(name=name, root=str(tmp_path / "tv"))
    assert spec.train_size(cfg) == 50_000

    raw = tmp_path / "raw"
    spec.materialize(cfg, raw)
    train_images = np.load(raw / "train_images.npy")
    assert train_images.dtype == np.uint8 and train_images.shape == fake["train"].shape
    assert np.array_equal(train_images, fake["train"])

    splits = spec.load(cfg, raw)
    _check_splits(splits, spec)
    assert splits.x_test.shape == (N_TEST, 3, 32, 32)
    src = next(s for s in torchvision_sets.SOURCES if s.name == name)
    expected = (fake["test"].transpose(0, 3, 1, 2) / 255.0 - np.reshape(src.mean, (1, 3, 1, 1))) / np.reshape(
        src.std, (1, 3, 1, 1)
    )
    np.testing.assert_allclose(splits.x_test, expected, rtol=1e-5, atol=1e-5)


def test_normalise_chunks_match_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.random.default_rng(2).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    whole = torchvision_sets.normalise(images, mean, std)
    monkeypatch.setattr(torchvision_sets, "_CHUNK", 3)
    assert np.array_equal(torchvision_sets.normalise(images, mean, std), whole)


def test_torchvision_root_required(tmp_path: Path) -> None:
    spec = DATASETS.get("mnist")
    with pytest.raises(ValueError, match=r"dataset\.root is not set.*dataset\.download"):
        spec.materialize(DatasetConfig(name="mnist"), tmp_path / "raw")
    with pytest.raises(ValueError, match=r"dataset\.root=.*dataset\.download is false.*MNIST/raw/"):
        spec.materialize(DatasetConfig(name="mnist", root=str(tmp_path / "empty")), tmp_path / "raw")
    assert not (tmp_path / "empty").exists(), "nothing may be downloaded or created"


def test_cifar_md5_check_rejects_unknown_files(tmp_path: Path) -> None:
    _fake_cifar(tmp_path / "tv", "cifar10", np.random.default_rng(3), monkeypatch=None)
    cfg = DatasetConfig(name="cifar10", root=str(tmp_path / "tv"))
    with pytest.raises(ValueError, match=r"cifar-10-batches-py/.*md5-checked"):
        DATASETS.get("cifar10").materialize(cfg, tmp_path / "raw")
