"""Server-side evaluation of the global model on the held-out test set.

Class-incremental protocol: after task t the model is scored on the test samples of every class seen so
far, predicting among the seen classes only (the head's other logits are masked, as an expanding head
would have none).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedtail.datasets.base import Splits
from fedtail.metrics import (
    classification_metrics,
    expected_calibration_error,
    geometric_mean_recall,
    group_accuracies,
    ranking_metrics,
    task_accuracies,
)
from fedtail.models import load_arrays
from server.adjustments import Adjustment

#: metrics also reported for the adjusted model, as ``adjusted_<name>``
ADJUSTED_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "g_mean",
    "head_accuracy",
    "medium_accuracy",
    "tail_accuracy",
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
    ) -> None:
        self.groups = groups or {}  # head / medium / tail classes by global training count
        self.adjustment = adjustment  # scored beside the plain model as adjusted_*
        self.model = model.to(device).eval()
        self.device = device
        self.threads = threads
        self.x = torch.from_numpy(np.array(splits.x_test, dtype=np.float32))  # own copy, not the mmap
        self.y = np.asarray(splits.y_test, dtype=np.int64)
        self.batch_size = batch_size

    def predict(
        self, arrays: ArrayRecord, seen: Sequence[int], adjusted: bool = False
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
            return self._predict(arrays, seen, adjusted)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    @torch.no_grad()
    def _predict(
        self, arrays: ArrayRecord, seen: Sequence[int], adjusted: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        load_arrays(self.model, arrays)
        adjust = self.adjustment if adjusted else None
        model = adjust.model(self.model) if adjust else self.model
        seen_t = torch.as_tensor(list(seen), device=self.device)
        preds, probas = [], []
        for start in range(0, len(self.x), self.batch_size):
            logits = model(self.x[start : start + self.batch_size].to(self.device))
            logits = (adjust.logits(logits) if adjust else logits)[:, seen_t]
            preds.append(seen_t[logits.argmax(dim=1)].cpu())
            probas.append(torch.softmax(logits.double(), dim=1).cpu())
        return torch.cat(preds).numpy(), torch.cat(probas).numpy()

    def evaluate(self, arrays: ArrayRecord, seen: Sequence[int], tasks: Sequence[Sequence[int]]) -> dict:
        """Metrics over the seen classes (classification, G-mean, head / medium / tail accuracy, ECE,
        macro one-vs-rest AUROC / AUPRC) plus accuracy on each task trained so far; with an adjustment,
        also ``adjusted_<name>`` for `ADJUSTED_KEYS`."""
        y_pred, proba = self.predict(arrays, seen)
        out = self._scores(y_pred, proba, seen)
        out["task_accuracies"] = task_accuracies(self.y, y_pred, tasks)
        if self.adjustment is not None:
            adjusted = self._scores(*self.predict(arrays, seen, adjusted=True), seen)
            out.update({f"adjusted_{k}": adjusted[k] for k in ADJUSTED_KEYS if k in adjusted})
        return out

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
        return out
