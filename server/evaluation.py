"""Server-side evaluation of the global model on the held-out test set.

Class-incremental protocol: after task t the model is scored on the test samples of every class seen so
far, predicting among the seen classes only (the head's other logits are masked, as an expanding head
would have none).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedtail.datasets.base import Splits
from fedtail.metrics import (
    classification_metrics,
    client_accuracies,
    client_accuracy_summary,
    expected_calibration_error,
    geometric_mean_recall,
    group_accuracies,
    old_new_accuracies,
    open_world_accuracies,
    ranking_metrics,
    task_accuracies,
)
from fedtail.models import load_arrays
from server.adjustments import Adjustment

LogitsFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""Logits of a batch under a model, computed another way than ``model(x)`` (a continual method's head)."""

#: metrics also reported for the adjusted model, as ``adjusted_<name>``
ADJUSTED_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "g_mean",
    "head_accuracy",
    "medium_accuracy",
    "tail_accuracy",
    "ece",
    "auroc",
    "auprc",
    "client_accuracy_mean",
    "client_accuracy_std",
    "client_accuracy_worst10",
)


class Evaluator:
    """Scores ArrayRecords with one reusable model instance on the test split."""

    def __init__(
        self,
        model: nn.Module,
        splits: Splits,
        device: torch.device,
        batch_size: int = 2048,
        threads: int | None = None,
        groups: dict[str, list[int]] | None = None,
        adjustment: Adjustment | None = None,
        client_counts: np.ndarray | None = None,
        seed: int = 0,
        novel: Sequence[int] | None = None,
    ) -> None:
        self.groups = groups or {}  # head / medium / tail classes by global training count
        self.novel = list(novel or [])  # open world: classes no client has a label of
        self.adjustment = adjustment  # scored beside the plain model as adjusted_*
        self.client_counts = client_counts  # clients x classes: each client's personalised accuracy
        self.model = model.to(device).eval()
        self.device = device
        self.threads = threads
        x = torch.from_numpy(np.array(splits.x_test, dtype=np.float32))  # own copy, not the mmap
        y = np.asarray(splits.y_test, dtype=np.int64)
        self.x_cal = self.y_cal = None
        fraction = adjustment.calibration_fraction if adjustment is not None else 0.0
        if fraction > 0:  # held out for the adjustment to tune on; every metric is on the rest
            from sklearn.model_selection import train_test_split

            rest, cal = train_test_split(np.arange(len(y)), test_size=fraction, stratify=y, random_state=seed)
            rest, cal = np.sort(rest), np.sort(cal)
            self.x_cal, self.y_cal = x[cal], y[cal]
            x, y = x[rest], y[rest]
        self.x, self.y = x, y
        self.batch_size = batch_size

    def predict(
        self, arrays: ArrayRecord, seen: Sequence[int], adjusted: bool = False, head: LogitsFn | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predictions among ``seen`` and the softmax over ``seen`` (columns in ``seen``'s order),
        computed with ``threads`` torch threads (None: torch's default).

        The server evaluates between rounds, in the process whose clients run with
        ``engine.threads_per_client`` threads; torch's default (every core) made each evaluation of a
        small model cost more than a round of training on a busy machine (threads spin while waiting).
        """
        before = torch.get_num_threads()
        if self.threads is not None and self.threads != before:
            torch.set_num_threads(self.threads)
        try:
            return self._predict(arrays, seen, adjusted, head)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    @torch.no_grad()
    def _predict(
        self, arrays: ArrayRecord, seen: Sequence[int], adjusted: bool, head: LogitsFn | None
    ) -> tuple[np.ndarray, np.ndarray]:
        load_arrays(self.model, arrays)
        adjust = self.adjustment if adjusted else None
        net = adjust.model(self.model) if adjust else self.model
        model = net if head is None else functools.partial(head, net)
        seen_t = torch.as_tensor(list(seen), device=self.device)
        if adjust is not None and self.x_cal is not None:
            mask = np.isin(self.y_cal, list(seen))
            logits = torch.cat([model(xb.to(self.device)) for xb in self.x_cal[mask].split(self.batch_size)])
            adjust.calibrate(logits[:, seen_t], self.y_cal[mask], list(seen))
        preds, probas = [], []
        for start in range(0, len(self.x), self.batch_size):
            logits = model(self.x[start : start + self.batch_size].to(self.device))
            logits = (adjust.logits(logits) if adjust else logits)[:, seen_t]
            preds.append(seen_t[logits.argmax(dim=1)].cpu())
            probas.append(torch.softmax(logits.double(), dim=1).cpu())
        return torch.cat(preds).numpy(), torch.cat(probas).numpy()

    def evaluate(
        self,
        arrays: ArrayRecord,
        seen: Sequence[int],
        tasks: Sequence[Sequence[int]],
        head: LogitsFn | None = None,
    ) -> dict:
        """Metrics over the seen classes (classification, G-mean, head / medium / tail accuracy, ECE,
        macro one-vs-rest AUROC / AUPRC, the confusion matrix over ``seen``, each client's personalised
        accuracy and their mean / std / worst 10 %) plus accuracy on each task trained so far; with an
        adjustment, also ``adjusted_<name>`` for `ADJUSTED_KEYS` and ``adjusted_confusion``. ``head``:
        how logits are computed from the model and a batch (a continual method's head, e.g. nearest
        class means); None: the model's own."""
        y_pred, proba = self.predict(arrays, seen, head=head)
        out = self._scores(y_pred, proba, seen)
        out["task_accuracies"] = task_accuracies(self.y, y_pred, tasks)
        out.update(old_new_accuracies(self.y, y_pred, tasks))
        if self.adjustment is not None:
            adjusted = self._scores(*self.predict(arrays, seen, adjusted=True, head=head), seen)
            out.update({f"adjusted_{k}": adjusted[k] for k in ADJUSTED_KEYS if k in adjusted})
            out["adjusted_confusion"] = adjusted["confusion"]
        return out

    def per_client_view(
        self, result: dict, models: list[ArrayRecord], index: Sequence[int], seen: Sequence[int]
    ) -> dict:
        """``result`` with each client's personalised accuracy (and their summary) scored with its own
        model, ``models[index[k]]`` for client k: the per-client view of a federation that trains
        several models (clustered FL); the other metrics stay the evaluated model's (the global view)."""
        if self.client_counts is None:
            return result
        index = np.asarray(index, dtype=np.int64)
        accuracies = np.full(len(index), np.nan)
        mask = np.isin(self.y, list(seen))
        for m, arrays in enumerate(models):
            members = np.flatnonzero(index == m)
            if members.size:
                y_pred, _ = self.predict(arrays, seen)
                recall = classification_metrics(self.y[mask], y_pred[mask], list(seen))["per_class_recall"]
                accuracies[members] = client_accuracies(self.client_counts[members], recall)
        return {**result, "client_accuracies": accuracies, **client_accuracy_summary(accuracies)}

    def _scores(self, y_pred: np.ndarray, proba: np.ndarray, seen: Sequence[int]) -> dict:
        mask = np.isin(self.y, list(seen))
        y, pred, proba = self.y[mask], y_pred[mask], proba[mask]
        out = classification_metrics(y, pred, list(seen))
        out["g_mean"] = geometric_mean_recall(list(out["per_class_recall"].values()))
        column = np.zeros(max(seen) + 1, dtype=np.int64)
        column[list(seen)] = np.arange(len(seen))  # class -> its column in ``proba``
        out["ece"] = expected_calibration_error(proba, column[y])
        out.update(ranking_metrics(y, proba, list(seen)))
        seen_set = set(seen)
        groups = {g: [c for c in classes if c in seen_set] for g, classes in self.groups.items()}
        out.update({f"{g}_accuracy": acc for g, acc in group_accuracies(y, pred, groups).items()})
        if self.novel:  # seen / novel (Hungarian-matched) / all accuracy
            out.update(open_world_accuracies(y, pred, [c for c in self.novel if c in seen_set]))
        if self.client_counts is not None:
            out["client_accuracies"] = client_accuracies(self.client_counts, out["per_class_recall"])
            out.update(client_accuracy_summary(out["client_accuracies"]))
        return out
