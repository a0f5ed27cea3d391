"""Metrics against scikit-learn on fixed predictions, continual summaries on a hand-computed matrix."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score

from fedtail.metrics import (
    average_incremental_accuracy,
    backward_transfer,
    classification_metrics,
    final_average_accuracy,
    forgetting,
    task_accuracies,
)

Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
Y_PRED = np.array([0, 0, 1, 3, 1, 1, 0, 2, 0, 3, 2, 2])


def test_all_labels_match_sklearn() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, labels=[0, 1, 2, 3])
    assert m["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y_TRUE, Y_PRED))
    assert m["macro_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="macro"))
    recalls = recall_score(Y_TRUE, Y_PRED, labels=[0, 1, 2, 3], average=None)
    assert m["per_class_recall"] == pytest.approx(dict(enumerate(recalls)))
    assert m["accuracy"] == pytest.approx(6 / 12)
    assert m["balanced_accuracy"] == pytest.approx((2 / 4 + 2 / 3 + 1 / 2 + 1 / 3) / 4)


def test_restricted_to_seen_classes() -> None:
    """Only samples of classes 0 and 1 count; predicting an unseen class (3) is an error."""
    m = classification_metrics(Y_TRUE, Y_PRED, labels=[0, 1])
    keep = np.isin(Y_TRUE, [0, 1])
    t, p = Y_TRUE[keep], Y_PRED[keep]
    assert m["accuracy"] == pytest.approx(accuracy_score(t, p)) == pytest.approx(4 / 7)
    assert m["per_class_recall"] == pytest.approx({0: 2 / 4, 1: 2 / 3})
    assert m["balanced_accuracy"] == pytest.approx((2 / 4 + 2 / 3) / 2)
    assert m["macro_f1"] == pytest.approx(f1_score(t, p, labels=[0, 1], average="macro", zero_division=0))


def test_class_without_test_samples_is_left_out_of_balanced_accuracy() -> None:
    m = classification_metrics([0, 0, 1], [0, 1, 1], labels=[0, 1, 2])
    assert np.isnan(m["per_class_recall"][2])
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)


def test_errors() -> None:
    with pytest.raises(ValueError, match="no test samples"):
        classification_metrics(Y_TRUE, Y_PRED, labels=[7])
    with pytest.raises(ValueError, match="differ in length"):
        classification_metrics(Y_TRUE, Y_PRED[:-1], labels=[0])


def test_task_accuracies() -> None:
    accs = task_accuracies(Y_TRUE, Y_PRED, tasks=[[0, 1], [2, 3]])
    assert accs == pytest.approx([4 / 7, 2 / 5])


# A[i, j]: accuracy on task j after task i. Task 0 improves after task 1 (0.9 -> 0.95), then drops.
A = np.array(
    [
        [0.90, np.nan, np.nan],
        [0.95, 0.80, np.nan],
        [0.50, 0.70, 0.85],
    ]
)


def test_continual_metrics_hand_computed() -> None:
    assert average_incremental_accuracy(A) == pytest.approx((0.90 + (0.95 + 0.80) / 2 + 2.05 / 3) / 3)
    assert final_average_accuracy(A) == pytest.approx(2.05 / 3)
    # forgetting uses the best earlier accuracy (0.95, not the diagonal 0.90): ((0.95-0.5) + (0.8-0.7)) / 2
    assert forgetting(A) == pytest.approx(0.275)
    # BWT compares with the diagonal: ((0.5-0.9) + (0.7-0.8)) / 2
    assert backward_transfer(A) == pytest.approx(-0.25)


def test_single_task_and_bad_matrix() -> None:
    one = np.array([[0.7]])
    assert average_incremental_accuracy(one) == final_average_accuracy(one) == pytest.approx(0.7)
    assert forgetting(one) == 0.0
    assert backward_transfer(one) == 0.0
    with pytest.raises(ValueError, match="square"):
        forgetting(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        forgetting(np.array([[0.5, np.nan], [np.nan, 0.4]]))


@pytest.mark.parametrize("seed", range(20))
def test_numpy_metrics_equal_sklearn_on_random_predictions(seed: int) -> None:
    """The confusion-matrix metrics equal scikit-learn's (1e-12), also with predictions of classes
    outside ``labels``, labels in any order and labels without test samples."""
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 12))
    y_true = rng.integers(0, n_classes, size=int(rng.integers(1, 300)))
    y_pred = np.where(rng.random(y_true.size) < 0.6, y_true, rng.integers(0, n_classes + 2, size=y_true.size))
    labels = [int(c) for c in rng.permutation(n_classes)[: int(rng.integers(1, n_classes + 1))]]
    if not np.isin(y_true, labels).any():
        labels.append(int(y_true[0]))
    m = classification_metrics(y_true, y_pred, labels)
    keep = np.isin(y_true, labels)
    t, p = y_true[keep], y_pred[keep]
    recalls = recall_score(t, p, labels=labels, average=None, zero_division=np.nan)
    assert m["accuracy"] == pytest.approx(accuracy_score(t, p), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(float(np.nanmean(recalls)), abs=1e-12)
    f1 = f1_score(t, p, labels=labels, average="macro", zero_division=0)
    assert m["macro_f1"] == pytest.approx(f1, abs=1e-12)
    expected = {c: float(r) for c, r in zip(labels, recalls, strict=True)}
    assert m["per_class_recall"] == pytest.approx(expected, abs=1e-12, nan_ok=True)
    tasks = [labels[: len(labels) // 2 + 1], labels]
    assert task_accuracies(y_true, y_pred, tasks) == pytest.approx(
        [accuracy_score(*(a[np.isin(y_true, task)] for a in (y_true, y_pred))) for task in tasks], abs=1e-12
    )


def test_negative_labels_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        classification_metrics([0, 1], [0, -1], labels=[0, 1])
