"""TACLE: a task-adaptive confidence threshold and class-aware weighted cross-entropy on the current task's
unlabeled samples, exemplar-free (Kalla, Kumar & Biswas, "TACLE: Task and Class-aware Exemplar-free
Semi-supervised Class Incremental Learning", WACV 2025, pp. 6944-6954, arXiv:2407.08041; official code
github.com/rokmr/TACLE, ``models/tacle.py`` run with
``configs/cifar10/tacle_cifar10-imagenet_pretrained_0.8%.json``).

Why: as tasks add classes, the model's confidence on a new task's unlabeled samples drops (the paper's
Fig. 2), so a fixed FixMatch threshold uses fewer of them each task; and within a task the samples that
pass it are imbalanced across classes, which biases training towards the classes with most pseudo-labels.

Task-adaptive threshold (eq. 3), with t the 0-based task index (the code's ``_cur_task``; the paper's
Algorithm 1 counts tasks from 1, which would start at 0.839, not the code's 0.9):

    gamma_t = alpha / (1 + exp(alpha t)) + beta     (alpha 0.5, beta 0.65: 0.900, 0.839, 0.784, 0.741, ...)

Unlabeled loss (eq. 2 with eq. 4's weights; the code's ``restrictions``): with C_t the current task's
classes, p_b = softmax of the weak view's logits over C_t (no gradient) and yhat_b = argmax p_b, a class
of C_t,

    L_u = lambda_u / (mu B) sum_b 1(max p_b > gamma_t) wbar(yhat_b) H(softmax(z_strong[b, C_t]), yhat_b).

A pseudo-label may only take one of the task's classes and the strong view's cross-entropy is over the
task's logits only (the paper's task head phi^(t)): the unlabeled samples are the task's (EFSS-CIL's
assumption, and fedtail's class-incremental protocol), and the old classes' logits are left to the
continual method (``continual.method``: LwF's or iCaRL's distillation, EWC, ...), which TACLE adds to.

Class-aware weights (eq. 4, Algorithm 1): h(c) = 1 + n(c) over c in C_t, n(c) the confident
pseudo-labels of class c counted so far this local epoch: each local epoch starts from an eval-mode pass
of the model over the round's unlabeled samples (the code's end-of-epoch pass), then adds every step's
confident pseudo-labels; the task's first round starts from n = 0 (uniform, Algorithm 1's start). Then

    balanced (the code: sklearn's "balanced" weights / their max + 1):  wbar(c) = 1 + min_c' h(c') / h(c)
    linear   (the paper's text: wbar = 2 - omega, omega = h / max h):   wbar(c) = 2 - h(c) / max_c' h(c')

both in [1, 2], the class with the fewest confident samples weighted most; ``none`` drops them (the
paper's ablation without C2). The two readings differ; the default is the code released with the
paper. The code also warms up each task on the labeled loss alone (lambda_u = 0 for epochs 1-2
of 10) and weighs the labeled loss by lambda_s = 0.5; here the first ``warmup_fraction`` of each task's
rounds (0.2: 2 of 10) and `labeled_weight`.

Federated reading: everything is per client and per round, from the client's own unlabeled samples of
the task (the server never sees them; each client's local update is biased by its own pseudo-label
imbalance); task progress is ``ctx.task``, so every round of a task shares gamma_t. Nothing is kept
between rounds: the model the client receives stands in for the model at the previous epoch's end, so a
resumed run repeats the same numbers. TACLE itself stores no samples (exemplar-free); an exemplar
memory comes only with a continual method that keeps one (iCaRL).

Left out: (i) the class-aware weights on the labeled loss (eq. 4's w^l): the loop only takes one factor
on the objective's loss, not one per class; (ii) stage 2, classifier alignment (eq. 5, SLCA's): after
each task every head is retrained on features sampled from per-class Gaussians fitted on labeled and
confident unlabeled features; it is an end-of-task stage over class statistics, not an unlabeled loss
(fedtail's cRT stage, ``crt.rounds``, is the nearest: classifier retraining on real features); (iii)
SLCA's slow backbone learning rate and the pre-trained ViT, which are the optimiser's and model's
settings. The code's end-of-epoch pass uses weak views and the softmax over all seen classes with >=;
here it uses the stored inputs (the seeded view stream stays untouched) and the same task-restricted
softmax and strict > as training, so the counted pseudo-labels are those the loss would use.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from clients.semisup import SemiSupervised, UnlabeledLoss, UnlabeledStep
from fedtail.registry import SEMISUP, PluginOptions

EVAL_BATCH = 1024  # samples per forward pass of the epoch's counting pass


def task_threshold(task: int, alpha: float, beta: float) -> float:
    """Eq. 3's gamma_t = alpha / (1 + exp(alpha t)) + beta: lower each task, towards beta."""
    return alpha / (1.0 + math.exp(alpha * task)) + beta


def class_weights(counts: torch.Tensor, kind: str) -> torch.Tensor:
    """wbar over the task's classes from their confident pseudo-label counts (each counted once more,
    as the code's histogram starts with one of each class, so no class is empty)."""
    h = counts.double() + 1.0
    if kind == "balanced":
        return 1.0 + h.min() / h
    if kind == "linear":
        return 2.0 - h / h.max()
    return torch.ones_like(h)


def tacle_pseudo_labels(
    logits_weak: torch.Tensor, classes: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(task-local pseudo-labels, confident): argmax of the weak view's softmax over the task's classes
    ``classes`` and whether its maximum exceeds ``threshold`` (no gradient)."""
    with torch.no_grad():
        confidence, local = torch.softmax(logits_weak.detach()[:, classes].float(), dim=1).max(dim=1)
    return local, confidence > threshold


def tacle_loss(
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor,
    classes: torch.Tensor,
    threshold: float,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unlabeled term before lambda_u, averaged over the whole batch (masked rows count as zeros);
    returns (loss, global pseudo-labels, each sample's weight: wbar or 0, task-local pseudo-labels)."""
    local, confident = tacle_pseudo_labels(logits_weak, classes, threshold)
    weight = weights.to(logits_strong.dtype)[local] * confident.to(logits_strong.dtype)
    if local.numel() == 0:
        return logits_strong.sum() * 0.0, classes[local], weight, local
    ce = F.cross_entropy(logits_strong[:, classes], local, reduction="none")
    return (ce * weight).mean(), classes[local], weight, local


def confident_counts(
    model: nn.Module, x: torch.Tensor, classes: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Per task class, the samples of ``x`` whose task-restricted pseudo-label is confident, by the model
    in eval mode without gradient (BatchNorm statistics and the training mode are left as they were)."""
    counts = torch.zeros(len(classes), dtype=torch.int64, device=classes.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for chunk in x.split(EVAL_BATCH):
            local, confident = tacle_pseudo_labels(model(chunk), classes, threshold)
            counts += torch.bincount(local[confident], minlength=len(classes))
    model.train(was_training)
    return counts


class TACLEOptions(PluginOptions):
    """Eq. 3's alpha and beta (the paper's, all datasets), the official config's loss weights and the
    code's per-task warm-up."""

    alpha: float = Field(0.5, gt=0.0, le=10.0, description="Eq. 3's alpha: the threshold's drop and rate.")
    beta: float = Field(0.65, ge=0.0, lt=1.0, description="Eq. 3's beta: the threshold's floor.")
    lambda_u: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the unlabeled loss.")
    lambda_s: float = Field(
        0.5, ge=0.0, le=100.0, description="Factor on the labeled (objective's) loss; the code's 0.5."
    )
    warmup_fraction: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Share of each task's rounds (rounded down) on the labeled loss alone; the code's "
        "2 of 10 epochs.",
    )
    class_weights: Literal["balanced", "linear", "none"] = Field(
        "balanced",
        description="Class-aware weights: balanced (the code's 1 + min h / h), linear (the paper's "
        "2 - h / max h), none (unweighted).",
    )

    @model_validator(mode="after")
    def _first_threshold_below_one(self) -> TACLEOptions:
        if self.alpha / 2 + self.beta >= 1.0:
            raise ValueError(
                f"alpha / 2 + beta = {self.alpha / 2 + self.beta:g}, the first task's threshold, must be "
                "below 1 (no softmax exceeds it)"
            )
        return self


@SEMISUP.register("tacle")
class TACLE(SemiSupervised):
    """Confident pseudo-labels among the task's classes, above a threshold that falls task by task,
    weighted towards the classes with the fewest of them, train the strong view."""

    Options = TACLEOptions

    def labeled_weight(self) -> float:
        return self.options.lambda_s

    def begin(self, index: np.ndarray) -> None:
        ctx, cfg, o = self.ctx, self.ctx.job.config, self.options
        self.classes = torch.as_tensor(list(ctx.task_classes), dtype=torch.int64, device=ctx.device)
        self.threshold = task_threshold(ctx.task, o.alpha, o.beta)
        task_round = ctx.global_round - ctx.task * cfg.task_rounds  # 1-based within the task
        self.warming = task_round <= math.floor(o.warmup_fraction * cfg.federation.rounds_per_task)
        x = np.asarray(ctx.data.x_unlabeled[np.asarray(index, dtype=np.int64)], dtype=np.float32)
        self.x = torch.from_numpy(x).to(ctx.device)
        self.running = torch.zeros(len(self.classes), dtype=torch.int64, device=ctx.device)
        self.previous = self._counts() if task_round > 1 else torch.zeros_like(self.running)

    def _counts(self) -> torch.Tensor:
        return confident_counts(self.ctx.model, self.x, self.classes, self.threshold)

    def loss(self, step: UnlabeledStep) -> UnlabeledLoss:
        o = self.options
        per_epoch = max(step.total_steps // self.ctx.job.config.train.epochs, 1)
        if step.step > 0 and step.step % per_epoch == 0:  # a new local epoch: recount, as the code does
            self.previous, self.running = self._counts(), torch.zeros_like(self.running)
        weights = class_weights(self.previous + self.running, o.class_weights)
        strong = step.views["strong"].logits
        loss, labels, weight, local = tacle_loss(
            step.views["weak"].logits, strong, self.classes, self.threshold, weights
        )
        self.running += torch.bincount(local[weight > 0], minlength=len(self.classes))
        if self.warming:
            return UnlabeledLoss(strong.sum() * 0.0, labels, torch.zeros_like(weight))
        return UnlabeledLoss(o.lambda_u * loss, labels, weight)
