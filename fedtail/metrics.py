"""Evaluation metrics: per-step classification quality and continual-learning summaries.

Per-step metrics are computed on the test samples of the classes seen so far (class-incremental
evaluation): a prediction of a class outside that set is simply wrong. The continual summaries read an
accuracy matrix ``A`` (T x T, ``A[i, j]`` = accuracy on task ``j`` after training task ``i``, NaN for
``j > i``), the form used by iCaRL, GEM and RWalk.
"""

from __future__ import annotations

import math
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
    """Accuracy, balanced accuracy, macro-F1, per-class recall and precision over the classes in ``labels``
    (a class never predicted has precision 0, scikit-learn's ``zero_division=0``).

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
        "per_class_precision": {c: float(v) for c, v in zip(labels, precision, strict=True)},
        "confusion": cm[:, :-1].astype(np.int64),
    }


def task_accuracies(y_true: Any, y_pred: Any, tasks: Sequence[Sequence[int]]) -> list[float]:
    """Accuracy on each task's test samples: one row of the accuracy matrix."""
    t, p = _as_labels(y_true, y_pred)
    return [float(np.mean(np.equal(*_restrict(t, p, task)))) for task in tasks]


def old_new_accuracies(y_true: Any, y_pred: Any, tasks: Sequence[Sequence[int]]) -> dict[str, float]:
    """Accuracy on the test samples of the newest task's classes and on those of every earlier task's
    (NaN with one task): the two sides of class-incremental drift, weighted by samples (unlike the mean
    of an accuracy-matrix row, which weights tasks equally)."""
    t, p = _as_labels(y_true, y_pred)
    old = [c for task in tasks[:-1] for c in task]
    return {
        "old_class_accuracy": float(np.mean(np.equal(*_restrict(t, p, old)))) if old else float("nan"),
        "new_class_accuracy": float(np.mean(np.equal(*_restrict(t, p, tasks[-1])))),
    }


def task_forgetting(acc: Any) -> list[float]:
    """Per-task forgetting after the last finished row of ``acc`` (rows after it may still be NaN):
    for each earlier task ``j``, its best accuracy before that row minus its accuracy at it (Chaudhry et
    al. 2018); NaN for the newest task and for tasks not trained yet. `forgetting` is their mean."""
    a = np.asarray(acc, dtype=np.float64)
    done = [i for i in range(a.shape[0]) if not np.isnan(a[i, i])]
    out = [float("nan")] * a.shape[1]
    if not done:
        return out
    last = done[-1]
    for j in range(last):
        out[j] = float(np.nanmax(a[j:last, j]) - a[last, j])
    return out


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


# ---- imbalance metrics ---------------------------------------------------------------------------
def geometric_mean_recall(recalls: Any) -> float:
    """G-mean: the geometric mean of the per-class recalls (imbalanced-learn's ``geometric_mean_score``,
    ``average="multiclass"``, no correction): 0 as soon as one class is never recognised. Classes
    without test samples (NaN recall) are left out."""
    r = np.asarray(recalls, dtype=np.float64)
    r = r[~np.isnan(r)]
    if r.size == 0:
        return float("nan")
    if (r == 0).any():
        return 0.0
    return float(np.exp(np.mean(np.log(r))))


#: default class-group thresholds on training counts: many-shot > 100, few-shot < 20 (Liu et al., "Large-
#: Scale Long-Tailed Recognition in an Open World", CVPR 2019), the convention of the long-tail literature
MANY_SHOT, FEW_SHOT = 100, 20


def class_groups(train_counts: Any, many: int = MANY_SHOT, few: int = FEW_SHOT) -> dict[str, list[int]]:
    """Classes by global training frequency: ``head`` (> ``many`` samples), ``tail`` (< ``few``),
    ``medium`` (the rest). Classes with no training sample are in no group."""
    n = np.asarray(train_counts, dtype=np.int64)
    if few > many:
        raise ValueError(f"few-shot threshold {few} is above the many-shot threshold {many}")
    classes = np.arange(n.size)
    return {
        "head": classes[n > many].tolist(),
        "medium": classes[(n >= few) & (n <= many) & (n > 0)].tolist(),
        "tail": classes[(n < few) & (n > 0)].tolist(),
    }


def group_accuracies(y_true: Any, y_pred: Any, groups: dict[str, list[int]]) -> dict[str, float]:
    """Accuracy on the test samples of each group's classes (NaN for a group with no test sample)."""
    t, p = _as_labels(y_true, y_pred)
    out = {}
    for name, classes in groups.items():
        mask = np.isin(t, np.asarray(classes, dtype=np.int64))
        out[name] = float(np.mean(t[mask] == p[mask])) if mask.any() else float("nan")
    return out


CLIENT_COLUMNS = ("client_accuracy_mean", "client_accuracy_std", "client_accuracy_worst10")


def client_accuracies(client_counts: Any, per_class_recall: dict[int, float]) -> np.ndarray:
    """Each client's accuracy on a test set with its own label distribution: ``sum_c p_k(c) recall_c``
    over the classes with a defined recall, ``p_k`` the client's training label distribution restricted
    to them. This is the expected accuracy on a local test set drawn from the test split with the
    client's class mix, without the noise of drawing one (the personalised evaluation of Chen & Chao,
    "On Bridging Generic and Personalized Federated Learning for Image Classification", ICLR 2022, which
    re-weights the test set by each client's class distribution). NaN for a client with no sample of
    those classes."""
    counts = np.asarray(client_counts, dtype=np.float64)
    classes = [c for c, r in per_class_recall.items() if not math.isnan(r)]
    recall = np.array([per_class_recall[c] for c in classes], dtype=np.float64)
    weights = counts[:, classes] if classes else np.zeros((counts.shape[0], 0))
    total = weights.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, weights @ recall / total, np.nan)


def client_accuracy_summary(accuracies: Any) -> dict[str, float]:
    """Mean, standard deviation (population, over clients) and the mean of the worst 10 % of clients
    (at least one; as in Li et al., "Fair Resource Allocation in Federated Learning", ICLR 2020) of
    per-client accuracies, clients with NaN left out."""
    acc = np.sort(np.asarray(accuracies, dtype=np.float64))
    acc = acc[~np.isnan(acc)]
    if not acc.size:
        return dict.fromkeys(CLIENT_COLUMNS, math.nan)
    k = max(1, math.ceil(0.1 * acc.size - 1e-9))
    return {
        "client_accuracy_mean": float(acc.mean()),
        "client_accuracy_std": float(acc.std()),
        "client_accuracy_worst10": float(acc[:k].mean()),
    }


def expected_calibration_error(proba: Any, y_true: Any, bins: int = 15) -> float:
    """ECE (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, eq. 3): the confidence
    (max probability) split into ``bins`` equal-width bins, ``sum_b |B_b|/n |acc(B_b) - conf(B_b)|``."""
    proba = np.asarray(proba, dtype=np.float64)
    t = np.asarray(y_true, dtype=np.int64)
    confidence, pred = proba.max(axis=1), proba.argmax(axis=1)
    correct = (pred == t).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)  # (lo, hi] bins
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, correct, bins) - np.bincount(which, confidence, bins))
    return float(gap.sum() / max(t.size, 1)) if count.sum() else float("nan")


def _auroc_auprc(positive: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """scikit-learn's ``roc_auc_score`` and ``average_precision_score`` for one class, in numpy: AUROC as
    the Mann-Whitney statistic with average ranks for ties, AP as ``sum_n (R_n - R_{n-1}) P_n`` over the
    distinct scores, highest first (tested equal to scikit-learn's; the server scores every round)."""
    order = np.argsort(-score, kind="mergesort")
    s, pos = score[order], positive[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # the last index of each distinct score
    tp = np.cumsum(pos)[last]
    fp = (last + 1) - tp
    n_pos, n_neg = tp[-1], fp[-1]
    auroc = float(np.trapezoid(np.r_[0.0, tp / n_pos], np.r_[0.0, fp / n_neg]))
    precision, recall = tp / (tp + fp), tp / n_pos
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return auroc, ap


def ranking_metrics(y_true: Any, proba: Any, labels: Sequence[int]) -> dict[str, float]:
    """Macro one-vs-rest AUROC and AUPRC (average precision) over ``labels`` (``proba``'s columns, in
    that order), scikit-learn's definitions; classes with no positive or no negative test sample are
    left out (their curves are undefined)."""
    t = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    aurocs, auprcs = [], []
    for j, c in enumerate(labels):
        positive = t == c
        if positive.all() or not positive.any():
            continue
        auroc, ap = _auroc_auprc(positive, proba[:, j])
        aurocs.append(auroc)
        auprcs.append(ap)
    nan = float("nan")
    return {
        "auroc": float(np.mean(aurocs)) if aurocs else nan,
        "auprc": float(np.mean(auprcs)) if auprcs else nan,
    }


def cluster_accuracy(y_true: Any, y_pred: Any) -> float:
    """Accuracy under the best one-to-one map of predicted labels onto true labels (the Hungarian
    algorithm, scipy's ``linear_sum_assignment``): how open-world methods score classes they discover
    without labels (ORCA, Cao et al. 2022; FedoSSL). NaN for no samples."""
    from scipy.optimize import linear_sum_assignment

    t, p = _as_labels(y_true, y_pred)
    if t.size == 0:
        return float("nan")
    size = int(max(t.max(), p.max())) + 1
    counts = np.zeros((size, size), dtype=np.int64)
    np.add.at(counts, (p, t), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / t.size)


def open_world_accuracies(y_true: Any, y_pred: Any, novel: Any) -> dict[str, float]:
    """Open-world scores: ``seen_accuracy`` (plain accuracy on the test samples of classes with labels),
    ``novel_accuracy`` (`cluster_accuracy` on those of the ``novel`` classes) and ``all_accuracy``
    (`cluster_accuracy` on every test sample), as ORCA and FedoSSL report them."""
    t, p = _as_labels(y_true, y_pred)
    is_novel = np.isin(t, np.asarray(list(novel), dtype=np.int64))
    seen = ~is_novel
    return {
        "seen_accuracy": float((t[seen] == p[seen]).mean()) if seen.any() else float("nan"),
        "novel_accuracy": cluster_accuracy(t[is_novel], p[is_novel]),
        "all_accuracy": cluster_accuracy(t, p),
    }
