"""Class-balanced loss (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019).

The effective number of samples of class c is ``E_c = (1 - beta^n_c) / (1 - beta)``; each sample's loss is
weighted by ``1 / E_c``, normalised so the weights of the C present classes sum to C (eq. 5 and the
paper's code). ``beta = 0`` is unweighted, ``beta -> 1`` inverse frequency. Default ``beta = 0.9999``
(the paper's CIFAR setting) with softmax cross-entropy, the paper's CB-Softmax. ``loss: softmax_focal``
weights the softmax focal loss instead; it is a variant: the paper's CB-Focal is sigmoid-based (one
binary loss per class, with a prior-initialised bias), which a softmax classifier does not have. Its
``gamma`` defaults to 1.0, the paper's CIFAR scripts' value (it searches {0.5, 1, 2}). The batch loss
is the mean of the weighted per-sample losses, as in the paper's code (not PyTorch's weight-normalised
mean).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from clients.objectives import CountsOptions, LocalObjective
from clients.objectives.focal import focal_loss
from fedtail.registry import OBJECTIVES


def class_balanced_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """``(1 - beta) / (1 - beta^n_c)``, scaled to sum to the number of present classes; 0 for absent."""
    present = counts > 0
    weights = torch.zeros_like(counts, dtype=torch.float64)
    n = counts[present].to(torch.float64)
    weights[present] = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    weights = weights / weights.sum() * int(present.sum())
    return weights.to(counts.dtype)


@OBJECTIVES.register("class_balanced")
class ClassBalanced(LocalObjective):
    class Options(CountsOptions):
        """``beta``: effective-number hyper-parameter (0.9999); ``loss``: softmax CE or softmax focal;
        ``gamma``: the focal loss's focusing parameter (used with ``loss: softmax_focal``)."""

        beta: float = Field(0.9999, ge=0.0, lt=1.0)
        loss: Literal["softmax", "softmax_focal"] = "softmax"
        gamma: float = Field(1.0, ge=0.0, le=10.0)

    def begin(self) -> None:
        self.weight = class_balanced_weights(self.class_counts(self.options.counts), self.options.beta)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.options.loss == "softmax_focal":
            return focal_loss(logits, y, self.options.gamma, self.weight)
        return (F.cross_entropy(logits, y, reduction="none") * self.weight[y]).mean()
