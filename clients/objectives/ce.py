"""Plain cross-entropy over all classes: the unadjusted baseline every rebalancing loss is compared with."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from clients.objectives import LocalObjective
from fedtail.registry import OBJECTIVES, PluginOptions


@OBJECTIVES.register("ce")
class CrossEntropy(LocalObjective):
    class Options(PluginOptions):
        """Plain cross-entropy has no settings: ``train.options`` must be empty."""

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)
