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
from fedtail.metrics import classification_metrics, task_accuracies
from fedtail.models import load_arrays


class Evaluator:
    """Scores ArrayRecords with one reusable model instance on the test split."""

    def __init__(
        self,
        model: nn.Module,
        splits: Splits,
        device: torch.device,
        batch_size: int = 2048,
        threads: int | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.threads = threads
        self.x = torch.from_numpy(np.array(splits.x_test, dtype=np.float32))  # own copy, not the mmap
        self.y = np.asarray(splits.y_test, dtype=np.int64)
        self.batch_size = batch_size

    def predict(self, arrays: ArrayRecord, seen: Sequence[int]) -> np.ndarray:
        """Predictions among ``seen``, computed with ``threads`` torch threads (None: torch's default).

        The server evaluates between rounds, in the process whose clients run with
        ``engine.threads_per_client`` threads; torch's default (every core) made each evaluation of a
        small model cost more than a round of training on a busy machine (threads spin while waiting).
        """
        before = torch.get_num_threads()
        if self.threads is not None and self.threads != before:
            torch.set_num_threads(self.threads)
        try:
            return self._predict(arrays, seen)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    @torch.no_grad()
    def _predict(self, arrays: ArrayRecord, seen: Sequence[int]) -> np.ndarray:
        load_arrays(self.model, arrays)
        seen_t = torch.as_tensor(list(seen), device=self.device)
        preds = []
        for start in range(0, len(self.x), self.batch_size):
            logits = self.model(self.x[start : start + self.batch_size].to(self.device))
            preds.append(seen_t[logits[:, seen_t].argmax(dim=1)].cpu())
        return torch.cat(preds).numpy()

    def evaluate(self, arrays: ArrayRecord, seen: Sequence[int], tasks: Sequence[Sequence[int]]) -> dict:
        """Metrics over the seen classes plus accuracy on each task trained so far."""
        mask = np.isin(self.y, list(seen))
        y_pred = self.predict(arrays, seen)
        out = classification_metrics(self.y[mask], y_pred[mask], list(seen))
        out["task_accuracies"] = task_accuracies(self.y, y_pred, tasks)
        return out
