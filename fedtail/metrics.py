"""Evaluation metrics: per-step classification quality and continual-learning summaries.

Per-step metrics are computed on the test samples of the classes seen so far (class-incremental
evaluation): a prediction of a class outside that set is simply wrong. The continual summaries read an
accuracy matrix ``A`` (T x T, ``A[i, j]`` = accuracy on task ``j`` after training task ``i``, NaN for
``j > i``), the form used by iCaRL, GEM and RWalk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _as_labels(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true).astype(np.int64, copy=False).ravel()
    p = np.asarray(y_pred).astype(np.int64, copy=False).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    return t, p


def _restrict(t: np.ndarray, p: np.ndarray, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    mask = np.isin(t, np.asarray(list(labels), dtype=np.int64))
    if not mask.any():
        raise ValueError(f"no test samples have a true class in {sorted(labels)}; nothing to evaluate")
    return t[mask], p[mask]


def _confusion(t: np.ndarray, p: np.ndarray, labels: list[int]) -> np.ndarray:
    """``labels x (labels + 1)`` confusion matrix (rows: true class); the last column counts predictions
    of classes outside ``labels`` (wrong, and in no class's precision)."""
    k = len(labels)
    if min(int(t.min(initial=0)), int(p.min(initial=0)), min(labels)) < 0:
        raise ValueError("class labels must be >= 0")
    pos = np.full(max(int(t.max(initial=0)), int(p.max(initial=0)), max(labels)) + 1, -1, dtype=np.int64)
    pos[np.asarray(labels, dtype=np.int64)] = np.arange(k)
    ti, pi = pos[t], pos[p]
    keep = ti >= 0
    pi = np.where(pi >= 0, pi, k)
    return np.bincount(ti[keep] * (k + 1) + pi[keep], minlength=k * (k + 1)).reshape(k, k + 1)


def classification_metrics(y_true: Any, y_pred: Any, labels: Sequence[int]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 and per-class recall over the classes in ``labels``.

    ``balanced_accuracy`` is the mean recall over the ``labels`` that have test samples (a class with
    none has recall NaN in ``per_class_recall`` and is left out of the mean, as scikit-learn's
    `balanced_accuracy_score` does). It is the headline number on long-tailed data: plain accuracy is
    dominated by the head classes. Computed from one confusion matrix (numpy): the server scores every
    round, and scikit-learn's input checks cost more than the arithmetic; tests hold it equal to
    scikit-learn's ``recall_score`` / ``f1_score(average="macro", zero_division=0)``.
    """
    labels = [int(c) for c in labels]
    if not labels:
        raise ValueError("labels is empty: pass the classes seen so far")
    t, p = _restrict(*_as_labels(y_true, y_pred), labels)
    cm = _confusion(t, p, labels).astype(np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm[:, :-1].sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        recalls = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        r0 = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + r0 > 0, 2 * precision * r0 / (precision + r0), 0.0)
    return {
        "accuracy": float(np.mean(t == p)),
        "balanced_accuracy": float(np.nanmean(recalls)),
        "macro_f1": float(f1.mean()),
        "per_class_recall": {c: float(r) for c, r in zip(labels, recalls, strict=True)},
    }


def task_accuracies(y_true: Any, y_pred: Any, tasks: Sequence[Sequence[int]]) -> list[float]:
    """Accuracy on each task's test samples: one row of the accuracy matrix."""
    t, p = _as_labels(y_true, y_pred)
    return [float(np.mean(np.equal(*_restrict(t, p, task)))) for task in tasks]


# ---- continual summaries over the accuracy matrix ------------------------------------------------
def _check_matrix(acc: Any) -> np.ndarray:
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1; got shape {a.shape}")
    if not np.isfinite(a[np.tril_indices(a.shape[0])]).all():
        raise ValueError("accuracy matrix needs finite values on and below the diagonal (A[i, j], j <= i)")
    return a


def average_incremental_accuracy(acc: Any) -> float:
    """iCaRL's average incremental accuracy (Rebuffi et al. 2017).

    Mean over steps ``i`` of the *unweighted* mean of ``A[i, :i+1]``: every task counts equally at a
    step, whatever its number of test samples, so with equal-size tasks this is iCaRL's definition.
    """
    a = _check_matrix(acc)
    return float(np.mean([a[i, : i + 1].mean() for i in range(a.shape[0])]))


def final_average_accuracy(acc: Any) -> float:
    """Mean accuracy over all tasks after the last task (the last row of ``A``)."""
    a = _check_matrix(acc)
    return float(a[-1].mean())


def forgetting(acc: Any) -> float:
    """Average forgetting (Chaudhry et al. 2018, RWalk): mean over ``j < T-1`` of the drop from the
    best earlier accuracy on task ``j`` to the final one. ``0.0`` with a single task."""
    a = _check_matrix(acc)
    last = a.shape[0] - 1
    if last == 0:
        return 0.0
    best = np.array([a[j:last, j].max() for j in range(last)])
    return float(np.mean(best - a[last, :last]))


def backward_transfer(acc: Any) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017, GEM): mean over ``j < T-1`` of
    ``A[T-1, j] - A[j, j]``; negative means forgetting. ``0.0`` with a single task."""
    a = _check_matrix(acc)
    last = a.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean(a[last, :last] - np.diag(a)[:last]))
