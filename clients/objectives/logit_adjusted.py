"""Logit-adjusted loss (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, eq. 10).

``CE(z + tau * log pi, y)`` with pi the class prior: Fisher-consistent for the balanced error at
``tau = 1`` (the paper's default), where it coincides with Balanced Softmax; ``tau`` trades balanced for
plain accuracy. The prior is the global one the server derives from clients' counts (``counts:
local`` uses this client's round, normalised).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch.nn import functional as F

from clients.objectives import CountsOptions, LocalObjective, log_counts
from fedtail.registry import OBJECTIVES


@OBJECTIVES.register("logit_adjusted")
class LogitAdjusted(LocalObjective):
    class Options(CountsOptions):
        """``tau``: scale of the log-prior offset (1.0 in the paper); ``counts``: whose prior."""

        tau: float = Field(1.0, ge=0.0, le=10.0)

    def begin(self) -> None:
        counts = self.class_counts(self.options.counts)
        self.shift = self.options.tau * log_counts(counts / counts.sum().clamp_min(1.0))

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.shift, y)
