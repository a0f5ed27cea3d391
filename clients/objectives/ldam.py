"""LDAM loss with deferred re-weighting (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-
Aware Margin Loss", NeurIPS 2019; official code kaidic/LDAM-DRW).

Class j gets the margin ``m_j = C / n_j^(1/4)`` with C set so that the largest margin is ``max_m`` (0.5);
the loss is ``CE(s * (cos - m_y 1_y), y)`` on a normalised (cosine) classifier with scale ``s`` (30): rarer
classes must win by a wider margin, which tightens their generalisation bound (eq. 9-11). DRW (Algorithm
1): plain weights first, then from a switch point on class-balanced weights ``(1 - beta) / (1 - beta^n_j)``
(beta 0.9999, normalised to sum to the classes present), the paper's epoch 160 of 200; here the switch is
the share ``drw_start`` of each task's rounds (0.8 = the same share; 1.0 = LDAM without DRW). The official
code also steps the learning rate down by 0.01 at that epoch (``adjust_learning_rate``); ``drw_lr_scale``
(0.01) does the same to ``train.lr`` from the switch on. Without it the tail's large weights at the full
rate made two of three digits runs collapse a class in the last rounds.

The model's cosine classifier already outputs ``s * cos`` (``model.cosine_scale`` is s), so the margin
enters as ``s * m_y``; the config requires ``model.classifier: cosine``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from pydantic import Field
from torch.nn import functional as F

from clients.objectives import CountsOptions, LocalObjective
from clients.objectives.class_balanced import class_balanced_weights
from fedtail.registry import OBJECTIVES

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig


def ldam_margins(counts: torch.Tensor, max_m: float) -> torch.Tensor:
    """``n_j^(-1/4)`` scaled so the largest is ``max_m``; 0 for classes with no sample."""
    present = counts > 0
    margins = torch.zeros_like(counts)
    margins[present] = counts[present].pow(-0.25)
    return margins * (max_m / margins.max())


def drw_active(round_in_task: int, rounds_per_task: int, start: float) -> bool:
    """Whether round ``round_in_task`` (1-based) of a task re-weights: from round floor(start R) + 1 on,
    as the paper's ``epoch // 160`` switches at epoch 160 (0-based) of 200."""
    return round_in_task - 1 >= math.floor(start * rounds_per_task)


@OBJECTIVES.register("ldam")
class LDAM(LocalObjective):
    class Options(CountsOptions):
        """``max_m``: largest margin (0.5); ``drw_start``: share of a task's rounds before re-weighting
        (0.8; 1.0 = off); ``beta``: DRW's class-balanced beta (0.9999); ``drw_lr_scale``: factor on the
        learning rate once re-weighting (0.01, the official code); ``counts``: whose counts."""

        max_m: float = Field(0.5, gt=0.0, le=10.0)
        drw_start: float = Field(0.8, ge=0.0, le=1.0)
        beta: float = Field(0.9999, ge=0.0, lt=1.0)
        drw_lr_scale: float = Field(0.01, gt=0.0, le=1.0)

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        if cfg.model.classifier != "cosine":
            return (
                f"train.objective='ldam' needs the normalised classifier LDAM is defined on: set "
                f"model.classifier=cosine (now {cfg.model.classifier!r}); model.cosine_scale is its s"
            )
        return None

    def begin(self) -> None:
        cfg = self.ctx.job.config
        counts = self.class_counts(self.options.counts)
        self.margins = cfg.model.cosine_scale * ldam_margins(counts, self.options.max_m)
        rounds = cfg.federation.rounds_per_task
        round_in_task = self.ctx.global_round - self.ctx.task * cfg.task_rounds
        self.weight = (
            class_balanced_weights(counts, self.options.beta)
            if drw_active(round_in_task, rounds, self.options.drw_start)
            else None
        )

    def lr_scale(self) -> float:
        return 1.0 if self.weight is None else self.options.drw_lr_scale

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shifted = logits - F.one_hot(y, logits.shape[1]) * self.margins[y][:, None]
        return F.cross_entropy(shifted, y, weight=self.weight)
