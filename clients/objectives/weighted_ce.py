"""Inverse-frequency weighted cross-entropy: the classic re-weighting baseline (e.g. King & Zeng 2001;
scikit-learn's ``class_weight="balanced"``).

Class c weighs ``n / (C n_c)`` (n samples, C classes present), so each class contributes equally in
expectation; the batch loss is PyTorch's weighted mean ``sum w_y CE / sum w_y``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from clients.objectives import CountsOptions, LocalObjective, inverse_frequency
from fedtail.registry import OBJECTIVES


@OBJECTIVES.register("weighted_ce")
class WeightedCrossEntropy(LocalObjective):
    class Options(CountsOptions):
        """``counts``: whose class frequencies set the weights."""

    def begin(self) -> None:
        self.weight = inverse_frequency(self.class_counts(self.options.counts))

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, weight=self.weight)
