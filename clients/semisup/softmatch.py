"""SoftMatch: every pseudo-label trains, weighted by a truncated Gaussian of its confidence, after
uniform distribution alignment (Chen et al., "SoftMatch: Addressing the Quantity-Quality Trade-off in
Semi-Supervised Learning", ICLR 2023; official code in USB).

With q the weak view's softmax, aligned to the uniform prior (``q~ = Normalize(q / E[q])``, E[q] an
exponential moving average of the batches' mean q, UA, sec. 3.3), the sample weight (eq. 7) is

    lambda(q~) = lambda_max                                     if max q~ >= mu_t
               = lambda_max exp(-(max q~ - mu_t)^2 / (2 sigma_t^2 / n_sigma^2))   otherwise,

mu_t and sigma_t^2 exponential moving averages (momentum m) of the batch mean and unbiased variance of
max q~, updated before weighting; the loss is FixMatch's consistency term with these weights instead of
the 0/1 mask. USB's defaults: m 0.999, n_sigma 2, lambda_max = lambda_u 1, mu_0 = 1/C, sigma_0^2 = 1,
E[q] started at the first batch's mean. The moving averages are the client's state, kept across rounds
and resume.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from clients.semisup import SemiSupervised, UnlabeledLoss, UnlabeledStep, consistency_loss
from clients.semisup.da import align, updated_mean
from fedtail.registry import SEMISUP, PluginOptions

STATE = "softmatch-ema"  # client state: mu_t, sigma_t^2 and E[q]


def soft_weights(max_probs: torch.Tensor, mu: float, var: float, n_sigma: float) -> torch.Tensor:
    """SoftMatch's truncated Gaussian weights (1 at or above the mean confidence ``mu``)."""
    return torch.exp(-(torch.clamp(max_probs - mu, max=0.0) ** 2) / (2 * var / n_sigma**2))


class SoftMatchOptions(PluginOptions):
    """USB's SoftMatch settings."""

    lambda_u: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the unlabeled loss (lambda_max).")
    momentum: float = Field(0.999, ge=0.0, lt=1.0, description="EMA momentum of mu_t, sigma_t^2 and E[q].")
    n_sigma: float = Field(2.0, gt=0.0, le=100.0, description="Width of the Gaussian in standard deviations.")
    uniform_alignment: bool = Field(True, description="Align predictions to the uniform prior first (UA).")


@SEMISUP.register("softmatch")
class SoftMatch(SemiSupervised):
    """Confidence-weighted pseudo-labels (a truncated Gaussian) on uniformly aligned predictions."""

    Options = SoftMatchOptions

    def begin(self, index: np.ndarray) -> None:
        c = self.num_classes
        p_model, moments = self.stored(STATE, "p_model", (c,)), self.stored(STATE, "moments", (2,))
        if p_model is not None and moments is not None:
            self.mu, self.var = float(moments[0]), float(moments[1])
            self.p_model = torch.tensor(p_model, device=self.ctx.device)
        else:
            self.mu, self.var, self.p_model = 1.0 / c, 1.0, None
        self.uniform = torch.full((c,), 1.0 / c, device=self.ctx.device)

    def loss(self, step: UnlabeledStep) -> UnlabeledLoss:
        o = self.options
        with torch.no_grad():
            probs = torch.softmax(step.views["weak"].logits.detach().float(), dim=1)
            if o.uniform_alignment:
                self.p_model = updated_mean(self.p_model, probs, o.momentum)
                probs = align(probs, self.uniform, self.p_model)
            max_probs, labels = probs.max(dim=1)
            var = float(max_probs.var(unbiased=True)) if len(max_probs) > 1 else 0.0
            self.mu = o.momentum * self.mu + (1 - o.momentum) * float(max_probs.mean())
            self.var = o.momentum * self.var + (1 - o.momentum) * var
            weights = soft_weights(max_probs, self.mu, self.var, o.n_sigma)
        strong = step.views["strong"].logits
        return UnlabeledLoss(o.lambda_u * consistency_loss(strong, labels, weights), labels, weights)

    def end(self, steps: int) -> None:
        p_model = self.p_model if self.p_model is not None else self.uniform
        self.store(STATE, moments=np.array([self.mu, self.var], dtype=np.float64), p_model=p_model)
