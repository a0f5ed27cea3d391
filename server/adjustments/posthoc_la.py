"""Post-hoc logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, eq. 6).

Predict ``argmax_y f_y(x) - tau * log pi_y`` with pi the training label prior: a model trained with plain
cross-entropy estimates the long-tailed posterior, and subtracting the log prior turns it into the
balanced one (Bayes-optimal for the balanced error at ``tau = 1``, the paper's default). The prior is the
global one the server derives from the clients' counts.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from fedtail.registry import ADJUSTMENTS, PluginOptions
from server.adjustments import Adjustment


@ADJUSTMENTS.register("posthoc_la")
class PosthocLogitAdjustment(Adjustment):
    class Options(PluginOptions):
        """``tau``: scale of the subtracted log prior (1.0 in the paper)."""

        tau: float = Field(1.0, ge=0.0, le=10.0)

    def __init__(self, options: dict, class_counts: np.ndarray) -> None:
        super().__init__(options, class_counts)
        prior = self.class_counts / max(self.class_counts.sum(), 1.0)
        self.shift = torch.as_tensor(self.options.tau * np.log(np.maximum(prior, 1e-12)), dtype=torch.float32)

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits - self.shift.to(logits.device)
