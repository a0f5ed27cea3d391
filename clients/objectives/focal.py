"""Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, eq. 5), softmax form.

``FL(p_t) = -alpha_t (1 - p_t)^gamma log p_t``: well-classified examples (p_t near 1) are down-weighted,
so the many easy head-class samples stop dominating the gradient. ``gamma = 0`` is cross-entropy. The
paper's ``gamma = 2``; ``alpha`` (its class-balancing weight) is off by default here since for multi-class
data no single alpha exists; ``alpha: inverse`` weights classes by inverse frequency, scaled to mean 1 over
the classes present (so the loss keeps CE's scale: no hidden change of the learning rate).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.nn import functional as F

from clients.objectives import CountsOptions, LocalObjective, inverse_frequency
from fedtail.registry import OBJECTIVES


def focal_loss(
    logits: torch.Tensor, y: torch.Tensor, gamma: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the batch of ``-w_y (1 - p_y)^gamma log p_y`` (w = 1 without ``weight``)."""
    logp = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    loss = -((1.0 - logp.exp()).clamp_min(0.0) ** gamma) * logp
    if weight is not None:
        loss = loss * weight[y]
    return loss.mean()


@OBJECTIVES.register("focal")
class Focal(LocalObjective):
    class Options(CountsOptions):
        """``gamma``: focusing parameter (2 in the paper); ``alpha``: none or inverse-frequency weights
        (from ``counts``)."""

        gamma: float = Field(2.0, ge=0.0, le=10.0)
        alpha: Literal["none", "inverse"] = "none"

    def begin(self) -> None:
        self.weight = None
        if self.options.alpha == "inverse":
            w = inverse_frequency(self.class_counts(self.options.counts))
            self.weight = w / w[w > 0].mean()

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, y, self.options.gamma, self.weight)
