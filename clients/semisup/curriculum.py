"""Curriculum labeling: pseudo-labels of the most confident share of the unlabeled samples, a share that
grows by a fixed step each self-training stage (Cascante-Bonilla et al., "Curriculum Labeling:
Revisiting Pseudo-Labeling for Semi-Supervised Learning", AAAI 2021).

Each stage the model labels the unlabeled samples (argmax of its softmax) and keeps those whose
confidence lies in the top x % (the threshold is the (100 - x)-th percentile of the confidences), x =
delta, 2 delta, ..., 100 %, and trains on them with strong augmentation beside the labeled samples. The
paper runs a whole training per stage, restarting the model each time; a federation keeps its global
model, so here the stages are consecutive slices of the run's global rounds (100 / delta of them, 5 at
the paper's delta 20), the percentile is over the client's own unlabeled samples of the round, and the
pseudo-labels are fixed for the round from the model the client received (a stage's labelling pass).
The unlabeled loss is the cross-entropy of the strong view against them, averaged over the unlabeled
batch, with weight lambda_u. Defaults: the paper's delta 20 %; lambda_u 1.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from pydantic import Field

from clients.semisup import (
    SemiSupervised,
    UnlabeledLoss,
    UnlabeledStep,
    consistency_loss,
    received_pass,
)
from fedtail.registry import SEMISUP, PluginOptions


def stage_share(global_round: int, total_rounds: int, delta: float) -> float:
    """The share x of the unlabeled samples a round pseudo-labels: delta times its stage, the stages
    being equal slices of the run's rounds, at most 1."""
    stages = math.ceil(1.0 / delta)
    stage = max(1, math.ceil(stages * global_round / max(total_rounds, 1)))
    return min(1.0, stage * delta)


def curriculum_mask(confidence: np.ndarray, share: float) -> np.ndarray:
    """The samples whose confidence reaches the (100 - 100 share)-th percentile (ties kept)."""
    if confidence.size == 0:
        return np.zeros(0, dtype=bool)
    return confidence >= np.percentile(confidence, 100.0 * (1.0 - share))


class CurriculumOptions(PluginOptions):
    """The paper's stage step and the unlabeled weight."""

    delta: float = Field(
        0.2, gt=0.0, le=1.0, description="Share added to the pseudo-labeled samples per stage."
    )
    lambda_u: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the unlabeled loss.")


@SEMISUP.register("curriculum")
class CurriculumLabeling(SemiSupervised):
    """Pseudo-labels of a growing top share of confidences, fixed for the round, train the strong view."""

    Options = CurriculumOptions
    views: ClassVar[tuple[str, ...]] = ("strong",)

    def begin(self, index: np.ndarray) -> None:
        ctx, cfg = self.ctx, self.ctx.job.config
        n = len(ctx.data.x_unlabeled)
        x = ctx.data.x_unlabeled[index]
        probs = received_pass(ctx, x).cpu().numpy() if len(index) else np.zeros((0, 1))
        confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
        share = stage_share(ctx.global_round, cfg.num_tasks * cfg.task_rounds, self.options.delta)
        labels = np.full(n, -1, dtype=np.int64)  # -1: not pseudo-labeled this round
        chosen = curriculum_mask(confidence, share)
        if len(probs):
            labels[index[chosen]] = probs.argmax(axis=1)[chosen]
        self.labels = torch.from_numpy(labels).to(ctx.device)

    def loss(self, step: UnlabeledStep) -> UnlabeledLoss:
        labels = self.labels[step.index.to(self.labels.device)]
        mask = (labels >= 0).float()
        labels = labels.clamp_min(0)
        strong = step.views["strong"].logits
        return UnlabeledLoss(self.options.lambda_u * consistency_loss(strong, labels, mask), labels, mask)
