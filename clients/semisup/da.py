"""FixMatch with distribution alignment to the federation's class prior (Berthelot et al., "ReMixMatch:
Semi-Supervised Learning with Distribution Matching and Augmentation Anchoring", ICLR 2020, sec. 3.2;
combined with FixMatch as in USB's FixMatch + DA).

Before thresholding, each weak-view prediction q is aligned (ReMixMatch eq. 1):

    q~ = Normalize(q * p(y) / p~(y)),

p~(y) the running mean of the client's predictions on its unlabeled batches (ReMixMatch: over the last
128 batches; here an exponential moving average with the same horizon, momentum 1 - 1/128, started
at the first batch's mean as USB's DistAlignEMAHook starts it, updated before aligning, and kept in the
client's state across rounds and resume), p(y) the class prior the server sends with every round, the
labeled counts summed over clients (ReMixMatch's labeled marginal). Pseudo-labels and confidences are
then FixMatch's on q~. On long-tailed data this moves pseudo-labels away from the head classes the model
over-predicts, towards the labeled distribution. Defaults: FixMatch's (tau 0.95, lambda_u 1).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from clients.semisup import ConfidenceOptions, SemiSupervised, UnlabeledLoss, UnlabeledStep, consistency_loss
from fedtail.registry import SEMISUP

RUNNING_MEAN = "da-running-mean"  # client state: p~(y)


def align(probs: torch.Tensor, prior: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
    """ReMixMatch's distribution alignment: each row times prior / running, renormalised."""
    aligned = probs * (prior / running.clamp_min(1e-12))
    return aligned / aligned.sum(dim=1, keepdim=True).clamp_min(1e-12)


def updated_mean(running: torch.Tensor | None, probs: torch.Tensor, momentum: float) -> torch.Tensor:
    """The running mean prediction after one batch: the batch's mean to start (USB's DistAlignEMAHook),
    then an exponential moving average with ``momentum``."""
    mean = probs.mean(dim=0)
    return mean if running is None else momentum * running + (1 - momentum) * mean


class DAOptions(ConfidenceOptions):
    """FixMatch's settings and the running mean's horizon."""

    momentum: float = Field(
        1.0 - 1.0 / 128, ge=0.0, lt=1.0, description="EMA momentum of the running prediction mean."
    )


@SEMISUP.register("da")
class DistributionAlignment(SemiSupervised):
    """FixMatch on weak-view predictions aligned to the federation's labeled class prior."""

    Options = DAOptions

    def begin(self, index: np.ndarray) -> None:
        c, device = self.num_classes, self.ctx.device
        prior = np.asarray(self.ctx.class_prior, dtype=np.float64)
        self.prior = torch.as_tensor(prior / max(prior.sum(), 1e-12), dtype=torch.float32, device=device)
        stored = self.stored(RUNNING_MEAN, "mean", (c,))
        self.running = None if stored is None else torch.tensor(stored, dtype=torch.float32, device=device)

    def loss(self, step: UnlabeledStep) -> UnlabeledLoss:
        o = self.options
        with torch.no_grad():
            probs = torch.softmax(step.views["weak"].logits.detach().float(), dim=1)
            self.running = updated_mean(self.running, probs, o.momentum)
            confidence, labels = align(probs, self.prior, self.running).max(dim=1)
            mask = (confidence >= o.threshold).float()
        strong = step.views["strong"].logits
        return UnlabeledLoss(o.lambda_u * consistency_loss(strong, labels, mask), labels, mask)

    def end(self, steps: int) -> None:
        if self.running is None:
            return
        self.store(RUNNING_MEAN, mean=self.running)
