"""FlexMatch: FixMatch with class-wise thresholds from curriculum pseudo labeling (Zhang et al.,
"FlexMatch: Boosting Semi-Supervised Learning with Curriculum Pseudo Labeling", NeurIPS 2021; official
code TorchSSL).

Each unlabeled sample keeps the class of its latest prediction that reached the fixed threshold tau
(-1 before any). With sigma(c) the client's unlabeled samples so marked as c and N their number, the
warmed-up learning effect (eq. 11) and the class-wise threshold (eq. 6 with the convex mapping
M(x) = x / (2 - x), eq. 12) are

    beta(c) = sigma(c) / max(max_c sigma(c), N - sum_c sigma(c)),    T(c) = M(beta(c)) tau,

re-computed before every step; a weak-view pseudo-label of class c trains the strong view when its
confidence reaches T(c). Classes the model learns slowly (the tail) get lower thresholds, so more of
their pseudo-labels are used. The per-sample marks are the client's state, kept across rounds, tasks
and resume; sigma counts the samples of the current task's unlabeled part. Defaults are the paper's
(tau 0.95, lambda_u 1).
"""

from __future__ import annotations

import numpy as np
import torch

from clients.semisup import ConfidenceOptions, SemiSupervised, UnlabeledLoss, UnlabeledStep, consistency_loss
from clients.semisup.fixmatch import confident_pseudo_labels
from fedtail.registry import SEMISUP

SELECTED = "flexmatch-selected"  # client state: each unlabeled sample's latest confident class, -1 if none


def learning_effect(selected: torch.Tensor, num_classes: int) -> torch.Tensor:
    """beta(c) with threshold warm-up (eq. 11) from the marks of the counted samples (-1: unmarked)."""
    sigma = torch.bincount(selected[selected >= 0], minlength=num_classes).double()
    unused = float(selected.numel()) - sigma.sum()
    return sigma / torch.clamp(torch.maximum(sigma.max(), unused), min=1.0)


def flexible_thresholds(beta: torch.Tensor, threshold: float) -> torch.Tensor:
    """T(c) = M(beta(c)) tau with FlexMatch's convex mapping M(x) = x / (2 - x)."""
    return beta / (2.0 - beta) * threshold


@SEMISUP.register("flexmatch")
class FlexMatch(SemiSupervised):
    """FixMatch whose threshold of each class follows how many of its pseudo-labels are confident."""

    Options = ConfidenceOptions

    def begin(self, index: np.ndarray) -> None:
        n = len(self.ctx.data.x_unlabeled)
        marks = self.stored(SELECTED, "selected", (n,))
        marks = np.full(n, -1, dtype=np.int64) if marks is None else marks
        self.selected = torch.from_numpy(marks).to(self.ctx.device)
        self.counted = torch.from_numpy(np.asarray(index, dtype=np.int64)).to(self.ctx.device)

    def loss(self, step: UnlabeledStep) -> UnlabeledLoss:
        o = self.options
        thresholds = flexible_thresholds(
            learning_effect(self.selected[self.counted], self.num_classes), o.threshold
        )
        labels, confidence, mask = confident_pseudo_labels(step.views["weak"].logits, thresholds.float())
        over = confidence >= o.threshold
        index = step.index.to(self.selected.device)
        self.selected[index[over]] = labels[over]
        strong = step.views["strong"].logits
        return UnlabeledLoss(o.lambda_u * consistency_loss(strong, labels, mask), labels, mask)

    def end(self, steps: int) -> None:
        self.store(SELECTED, selected=self.selected)
