"""Logit calibrations by the client's own label counts, the client parts of FedLC and FedRS.

* FedLC (Zhang et al., 2022, "Federated Learning with Label Distribution Skew via Logits Calibration",
  ICML, eq. 9): the objective scores z_c - tau n_c^(-1/4), n_c the client's count of class c in the
  round's training labels; a class it has none of (n_c = 0) gets -inf, i.e. leaves the softmax. The paper
  writes the denominator over y' != y; like the public re-implementations (FL-bench, fluke) this uses
  the full softmax, which keeps the loss a cross-entropy (bounded below).
* FedRS (Li & Zhan, 2021, "FedRS: Federated Learning with Restricted Softmax for Label Distribution
  Non-IID Data", KDD, eq. 6): the logits of the classes the client has no sample of are scaled by
  alpha in [0, 1] (1: FedAvg; 0: the softmax over the local classes only), so the client pushes the
  missing classes' weights down less.

Both act on the logits the objective sees; the continual method's terms get the raw logits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clients.local import HIDDEN_LOGIT
from clients.terms import LossTerm


def fedlc_shift(counts: np.ndarray, tau: float) -> np.ndarray:
    """tau n_c^(-1/4) per class; for a class with no sample, the size of `HIDDEN_LOGIT` (its logit leaves the
    softmax exactly, with no gradient, as -inf would but without inf arithmetic)."""
    counts = np.asarray(counts, dtype=np.float64)
    shift = np.full(counts.shape, -HIDDEN_LOGIT)
    present = counts > 0
    shift[present] = tau * counts[present] ** -0.25
    return shift


def fedrs_scale(counts: np.ndarray, alpha: float) -> np.ndarray:
    """1 for a class the client has samples of, alpha for the others."""
    return np.where(np.asarray(counts) > 0, 1.0, alpha)


def _counts(term: LossTerm) -> np.ndarray:
    counts = term.ctx.train_counts
    return term.ctx.class_counts if counts is None else counts


class FedLCTerm(LossTerm):
    """FedLC's calibrated logits: z - tau n^(-1/4)."""

    def begin(self, model: nn.Module, lr: float, x: torch.Tensor, y: torch.Tensor) -> None:
        shift = fedlc_shift(_counts(self), self.options.tau)
        self.shift = torch.as_tensor(shift, dtype=torch.float32, device=self.ctx.device)

    def adjust_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits - self.shift


class FedRSTerm(LossTerm):
    """FedRS's restricted softmax: the missing classes' logits times alpha."""

    def begin(self, model: nn.Module, lr: float, x: torch.Tensor, y: torch.Tensor) -> None:
        scale = fedrs_scale(_counts(self), self.options.alpha)
        self.scale = torch.as_tensor(scale, dtype=torch.float32, device=self.ctx.device)

    def adjust_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scale
