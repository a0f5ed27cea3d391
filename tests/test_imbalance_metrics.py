"""Imbalance metrics against imbalanced-learn / scikit-learn, and by hand where neither has them."""

from __future__ import annotations

import numpy as np
import pytest
from imblearn.metrics import geometric_mean_score
from sklearn.metrics import average_precision_score, recall_score, roc_auc_score
from sklearn.preprocessing import label_binarize

from fedtail.metrics import (
    class_groups,
    expected_calibration_error,
    geometric_mean_recall,
    group_accuracies,
    ranking_metrics,
)


def _sample(seed: int, n: int = 300, k: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[y] * rng.random((n, 1))
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, proba.argmax(1), proba


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_g_mean_is_imbalanced_learns(seed: int) -> None:
    y, pred, _ = _sample(seed)
    recalls = recall_score(y, pred, average=None)
    assert geometric_mean_recall(recalls) == pytest.approx(geometric_mean_score(y, pred), rel=1e-12)
    pred[y == 3] = 0  # class 3 never recognised: G-mean 0, as imbalanced-learn says
    recalls = recall_score(y, pred, average=None)
    assert geometric_mean_recall(recalls) == geometric_mean_score(y, pred) == 0.0
    assert geometric_mean_recall([0.25, np.nan, 1.0]) == pytest.approx(0.5)  # no test samples: left out


def test_class_groups_follow_the_many_and_few_shot_thresholds() -> None:
    groups = class_groups([150, 101, 100, 20, 19, 1, 0])
    assert groups == {"head": [0, 1], "medium": [2, 3], "tail": [4, 5]}
    assert class_groups([10, 5], many=8, few=6) == {"head": [0], "medium": [], "tail": [1]}
    with pytest.raises(ValueError, match="few-shot"):
        class_groups([1], many=5, few=10)
    acc = group_accuracies([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 0], {"head": [0, 1], "tail": [2], "none": [9]})
    assert acc["head"] == pytest.approx(2 / 3) and acc["tail"] == pytest.approx(1 / 3)
    assert np.isnan(acc["none"])


def test_expected_calibration_error_by_hand() -> None:
    """Guo et al. 2017, eq. 3, with 10 bins: (0.9, 0.8] holds two samples of confidence 0.85 and 0.9, one
    right: |0.5 - 0.875| * 2/4; (0.6, 0.7] one right sample at 0.65: 0.35 * 1/4; (0.3, 0.4] one wrong at
    0.4: 0.4 * 1/4."""
    proba = np.array([[0.85, 0.15], [0.1, 0.9], [0.65, 0.35], [0.4, 0.3]])
    y = np.array([0, 0, 0, 1])
    expected = abs(0.5 - 0.875) * 2 / 4 + 0.35 / 4 + 0.4 / 4
    assert expected_calibration_error(proba, y, bins=10) == pytest.approx(expected)
    certain = np.eye(3)[[0, 1, 2]]
    assert expected_calibration_error(certain, np.array([0, 1, 2])) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_macro_ovr_auroc_and_auprc_are_scikit_learns(seed: int) -> None:
    y, _, proba = _sample(seed)
    got = ranking_metrics(y, proba, list(range(5)))
    assert got["auroc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    onehot = label_binarize(y, classes=list(range(5)))
    assert got["auprc"] == pytest.approx(average_precision_score(onehot, proba, average="macro"))
    # a class with no test sample has no curve: left out rather than failing the round
    keep = y != 4
    partial = ranking_metrics(y[keep], proba[keep], list(range(5)))
    assert np.isfinite(partial["auroc"]) and np.isfinite(partial["auprc"])


def test_ranking_metrics_handle_tied_scores_as_scikit_learn_does() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        y = rng.integers(0, 3, 40)
        proba = np.round(rng.random((40, 3)), 1)  # many ties
        got = ranking_metrics(y, proba, [0, 1, 2])
        onehot = label_binarize(y, classes=[0, 1, 2])
        want_auroc = np.mean([roc_auc_score(onehot[:, j], proba[:, j]) for j in range(3)])
        assert got["auroc"] == pytest.approx(want_auroc, abs=1e-12)
        assert got["auprc"] == pytest.approx(
            average_precision_score(onehot, proba, average="macro"), abs=1e-12
        )


def test_confusion_is_scikit_learns() -> None:
    from sklearn.metrics import confusion_matrix

    from fedtail.metrics import classification_metrics

    y, pred, _ = _sample(3)
    labels = [4, 0, 2, 1, 3]  # seen-class order, not sorted
    got = classification_metrics(y, pred, labels)["confusion"]
    np.testing.assert_array_equal(got, confusion_matrix(y, pred, labels=labels))


def test_client_accuracy_is_the_accuracy_on_a_test_set_with_its_class_mix() -> None:
    """A client holding 3:1 of classes 0:1 sees a test set with that mix: its accuracy is the
    recall-weighted mix, which a literal test set built with that mix reproduces exactly."""
    from fedtail.metrics import client_accuracies

    counts = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 0]])
    recall = {0: 1.0, 1: 0.5, 2: float("nan")}  # class 2 has no test sample: left out
    acc = client_accuracies(counts, recall)
    np.testing.assert_allclose(acc[:2], [0.875, 0.5])
    assert np.isnan(acc[2])
    # literal: 3 copies of class 0's test samples (all right), 1 of class 1's (half right)
    y_local = np.r_[np.zeros(6), np.ones(2)]
    right = np.r_[np.ones(6), [1, 0]]
    assert right[y_local >= 0].mean() == acc[0]


def test_client_summary_worst_ten_percent() -> None:
    from fedtail.metrics import client_accuracy_summary

    acc = np.r_[np.linspace(0.1, 1.0, 25), np.nan]
    out = client_accuracy_summary(acc)
    valid = np.linspace(0.1, 1.0, 25)
    assert out["client_accuracy_worst10"] == pytest.approx(valid[:3].mean())  # ceil(2.5) = 3 clients
    assert out["client_accuracy_mean"] == pytest.approx(valid.mean())
    assert out["client_accuracy_std"] == pytest.approx(valid.std())
    assert client_accuracy_summary(np.linspace(0, 1, 10))["client_accuracy_worst10"] == 0.0
