"""SMOTE (Chawla et al. 2002) through imbalanced-learn: the same samples as imbalanced-learn's own call,
every synthetic sample on a segment to a same-class nearest neighbour, and what it is for."""

from __future__ import annotations

import numpy as np
import torch
from imblearn.over_sampling import SMOTE
from sklearn.neighbors import NearestNeighbors

from clients.oversampling import smote, smote_features
from fedtail.models import build_model
from tests.test_objectives import _ctx, _tail_recall


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], [30, 9, 6]).astype(np.int64)
    return (rng.normal(size=(y.size, 4)) + 3 * np.eye(4)[y]).astype(np.float32), y


def test_smote_is_imbalanced_learns_with_originals_first() -> None:
    x, y = _data()
    xs, ys = smote(x, y, k_neighbors=5, seed=7)
    ref_x, ref_y = SMOTE(k_neighbors=5, random_state=7).fit_resample(x, y)
    np.testing.assert_array_equal(xs, ref_x)
    np.testing.assert_array_equal(ys, ref_y)
    np.testing.assert_array_equal(xs[: len(x)], x)
    assert np.bincount(ys).tolist() == [30, 30, 30]


def test_each_synthetic_sample_lies_between_a_sample_and_one_of_its_k_neighbours() -> None:
    """The defining step: ``x_i + u (x_nn - x_i)``, ``u`` in [0, 1], ``x_nn`` among the k nearest
    neighbours of ``x_i`` within its class."""
    x, y = _data(1)
    k = 3
    xs, ys = smote(x, y, k_neighbors=k, seed=0)
    for c in (1, 2):
        members = x[y == c].astype(np.float64)
        nn = (
            NearestNeighbors(n_neighbors=k + 1).fit(members).kneighbors(members, return_distance=False)[:, 1:]
        )
        for s in xs[len(x) :][ys[len(x) :] == c].astype(np.float64):
            found = False
            for i, neighbours in enumerate(nn):
                for j in neighbours:
                    d = members[j] - members[i]
                    u = float(np.dot(s - members[i], d) / np.dot(d, d))
                    if 0 <= u <= 1 and np.allclose(members[i] + u * d, s, atol=1e-5):
                        found = True
            assert found


def test_small_classes_lower_k_and_a_singleton_is_duplicated() -> None:
    x, y = _data()
    keep = np.r_[np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:3], np.flatnonzero(y == 2)[:1]]
    xs, ys = smote(x[keep], y[keep], k_neighbors=5, seed=0)  # class 1: 3 samples -> k = 2
    assert np.bincount(ys).tolist() == [30, 30, 30]
    singleton = x[keep][y[keep] == 2][0]
    assert (xs[ys == 2] == singleton).all()
    one_class = smote(x[y == 0], y[y == 0], 5, 0)
    assert one_class[0].shape == x[y == 0].shape


def test_smote_features_come_from_the_models_feature_space() -> None:
    model = build_model("cnn", (1, 8, 8), 3, 8, seed=0)
    x = torch.randn(20, 1, 8, 8)
    y = torch.tensor([0] * 14 + [1] * 4 + [2] * 2)
    feats, labels = smote_features(model, x, y, 5, seed=0)
    with torch.no_grad():
        dim = model.features(x[:1]).shape[1]
    assert feats.shape == (2 * 14 - 6, dim) and labels.tolist() == [1] * 10 + [2] * 12


def test_smote_recovers_the_tail_class_that_ce_sacrifices() -> None:
    assert _tail_recall("ce", oversample="smote") > _tail_recall("ce") + 0.2


def test_image_clients_train_the_classifier_on_synthetic_features() -> None:
    """Non-flat inputs: the real samples go through the whole model, the synthetic features through the
    classifier; the update's weight stays the real sample count."""
    from clients.local import train_local

    net = build_model("cnn", (1, 8, 8), 10, 8, seed=0)
    ctx = _ctx("ce", net=net, train={"oversample": "smote", "epochs": 2})
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], [24, 4]).astype(np.int64)
    x = rng.normal(size=(28, 1, 8, 8)).astype(np.float32)
    loss, n = train_local(ctx, x, y)
    assert n == 28 and np.isfinite(loss)
    assert ctx.train_counts[:2].tolist() == [24, 4]
