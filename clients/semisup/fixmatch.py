"""FixMatch: confidence-thresholded pseudo-labels from a weak view train the strong view (Sohn et al.,
"FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence", NeurIPS 2020).

For each unlabeled sample u_b, q_b = softmax(f(weak(u_b))) with no gradient; its pseudo-label is
argmax q_b, used when max q_b >= tau; the unlabeled loss (eq. 4) is

    l_u = 1 / (mu B) sum_b 1(max q_b >= tau) H(argmax q_b, f(strong(u_b)))

added with weight lambda_u to the labeled loss. Defaults are the paper's: tau 0.95, lambda_u 1 (mu 7 is
``semisup.mu``); its weak and strong views are ``semisup.weak`` / ``semisup.strong``.
"""

from __future__ import annotations

import torch

from clients.semisup import (
    ConfidenceOptions,
    SemiSupervised,
    UnlabeledLoss,
    UnlabeledStep,
    consistency_loss,
)
from fedtail.registry import SEMISUP


def confident_pseudo_labels(
    logits_weak: torch.Tensor, threshold: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pseudo-labels, confidences, mask) of the weak view's logits: argmax and max of the softmax (no
    gradient), and 1.0 where the confidence reaches ``threshold`` (one value, or one per pseudo-label
    class given as a (C,) tensor)."""
    with torch.no_grad():
        confidence, labels = torch.softmax(logits_weak.detach().float(), dim=1).max(dim=1)
        bound = threshold[labels] if isinstance(threshold, torch.Tensor) else threshold
        mask = (confidence >= bound).to(logits_weak.dtype)
    return labels, confidence, mask


@SEMISUP.register("fixmatch")
class FixMatch(SemiSupervised):
    """Hard pseudo-labels of the weak view above a fixed confidence train the strong view."""

    Options = ConfidenceOptions

    def loss(self, step: UnlabeledStep) -> UnlabeledLoss:
        labels, _, mask = confident_pseudo_labels(step.views["weak"].logits, self.options.threshold)
        strong = step.views["strong"].logits
        return UnlabeledLoss(self.options.lambda_u * consistency_loss(strong, labels, mask), labels, mask)
