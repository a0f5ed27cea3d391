"""Balanced Softmax (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020).

Softmax cross-entropy on logits shifted by the log class counts, ``CE(z + log n, y)``, i.e. the model's
probability of class j is ``n_j exp(z_j) / sum_k n_k exp(z_k)``: the label-distribution shift between
the long-tailed training set and a balanced test set is absorbed by the loss, so the plain logits ``z``
estimate the balanced posterior. Counts are the global ones by default (the paper's training set);
``counts: local`` uses this client's round.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from clients.objectives import CountsOptions, LocalObjective, log_counts
from fedtail.registry import OBJECTIVES


@OBJECTIVES.register("balanced_softmax")
class BalancedSoftmax(LocalObjective):
    class Options(CountsOptions):
        """``counts``: whose class counts shift the logits."""

    def begin(self) -> None:
        self.shift = log_counts(self.class_counts(self.options.counts))

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.shift, y)
