"""GLFC's local learning (Dong et al., "Federated Class-Incremental Learning", CVPR 2022), after the official
code (github.com/conditionWang/FCIL, ``src/GLFC.py``: ``_compute_loss``, ``efficient_old_class_weight``).

GLFC is made for federated class-incremental learning: clients see new classes at different times and
hold few exemplars, so local training is imbalanced between old and new classes. Its client loss is

* **class-aware gradient compensation** ``L_GC``: per-class binary cross-entropy over the classes seen so
  far, each sample weighted by ``w_i = g_i / mean_{j in S(i)} g_j``, where ``g_i = 1 - sigmoid(z_{i,y_i})``
  is the size of its gradient at its own class and ``S(i)`` the batch's samples of old classes or of new
  classes, whichever ``i`` belongs to: both groups get the same average pull (``w = 1`` in the first task);
* **class-semantic relation distillation** ``L_RD``: the same binary cross-entropy against targets that
  are the previous model's sigmoid outputs on the old classes and the one-hot label on the new ones;
* ``L = 0.5 L_GC + 0.5 L_RD`` (``L_GC`` alone in the first task), with iCaRL's herding exemplar memory
  (`clients.continual.replay`).

Implemented: the two losses and the memory, exactly as the official code computes them. Left out: the
proxy server, which reconstructs images from clients' prototype gradients by gradient inversion to
choose the best old model (a privacy attack by design, and hundreds of L-BFGS iterations a task); here
the teacher is the global model at the end of the previous task. Also left out: detecting new tasks
from the entropy of the outputs, since fedtail's clients are told the schedule.

GLFC's loss is its own classification loss, so it replaces the configured objective (only ``ce``, which
it stands for, is accepted). Averaged over the ``C`` seen classes as well as the samples, its gradients
are about ``1/C`` of cross-entropy's; the official code makes up for it with a fixed lr of 2.0 where
cross-entropy baselines use 0.1 (20x, for CIFAR-100's 100 classes). Here the ``lr_scale`` option
defaults to ``C``, the number of classes seen in the task, which gives GLFC's update cross-entropy's size
at ``train.lr``: a fixed 20 (on 10 classes) diverged or fell to half of it on one client holding all the
data (Split-digits with a 10:1 tail, 20 epochs a task: final average accuracy 0.51 at 20x, 0.93 at 10x,
0.92 at 3x, seed 0), since such a client takes many more steps a task than a federated one (issue 18).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field
from torch.nn import functional as F

from clients.continual.replay import MemoryOptions, Replay
from fedtail.registry import CONTINUAL

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig


def gradient_compensation_weights(logits: torch.Tensor, y: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``w_i = g_i / mean_{j in S(i)} g_j`` with ``g_i = |sigmoid(z_{i,y_i}) - 1|`` (detached), the mean
    taken over the batch's old-class or new-class samples (``old``: bool per sample); all ones when no
    class is old yet (``old`` None).

    A group whose every sample is fit to float precision (``g`` exactly 0: a logit above ~17) has equal
    ``g`` and gets the weights of equal ``g``, 1; the official code divides 0 by 0 there, and one NaN
    batch ended a run that fit its first task well (issue 18)."""
    g = (1.0 - torch.sigmoid(logits.detach().gather(1, y[:, None]))).squeeze(1)
    if old is None:
        return torch.ones_like(g)
    w = torch.zeros_like(g)
    for group in (old, ~old):
        if group.any():
            mean = g[group].mean()
            w[group] = g[group] / mean if mean > 0 else torch.ones_like(g[group])
    return w


def glfc_loss(
    logits: torch.Tensor, y: torch.Tensor, old_classes: list[int], teacher: torch.Tensor | None
) -> torch.Tensor:
    """GLFC's local loss over ``logits`` restricted to the seen classes (columns; ``y`` indexes them):
    ``0.5 L_GC + 0.5 L_RD``, or ``L_GC`` without a ``teacher`` (its logits on the ``old_classes``
    columns, in that order)."""
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    old = None
    if old_classes:
        old = torch.isin(y, torch.as_tensor(old_classes, device=y.device))
    w = gradient_compensation_weights(logits, y, old)
    l_gc = torch.mean(w[:, None] * F.binary_cross_entropy_with_logits(logits, target, reduction="none"))
    if teacher is None or not old_classes:
        return l_gc
    distill = target.clone()
    distill[:, old_classes] = torch.sigmoid(teacher)
    l_rd = F.binary_cross_entropy_with_logits(logits, distill)
    return 0.5 * l_gc + 0.5 * l_rd


@CONTINUAL.register("glfc")
class GLFC(Replay):
    class Options(MemoryOptions):
        """Replay's memory options, and ``lr_scale``: factor on ``train.lr`` (null: the number of classes
        seen in the task; see the module)."""

        lr_scale: float | None = Field(None, gt=0.0, le=1000.0)

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        if (problem := super().check_config(cfg)) is not None:
            return problem
        if cfg.train.objective != "ce":
            return (
                "continual.method='glfc' trains with its own loss (gradient-compensated binary "
                f"cross-entropy), which replaces train.objective={cfg.train.objective!r}; allowed: ce"
            )
        if cfg.train.oversample != "none":
            return (
                f"continual.method='glfc' trains with its own loss, which the synthetic features of "
                f"train.oversample={cfg.train.oversample!r} (seen by the objective only) would not reach; "
                "allowed: none"
            )
        return None

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        present = [] if ctx.sample_index is None else ctx.data.y[ctx.sample_index].tolist()
        self.seen = sorted(set(ctx.seen_classes) | set(present))  # blurry tasks bring the next one's
        column = {c: i for i, c in enumerate(self.seen)}
        self.old = [column[c] for c in sorted(set(ctx.seen_classes) - set(ctx.task_classes))]
        self.columns = torch.as_tensor(self.seen, device=ctx.device)
        self.lookup = torch.full((ctx.job.config.num_classes,), -1, dtype=torch.int64, device=ctx.device)
        self.lookup[self.columns] = torch.arange(len(self.seen), device=ctx.device)

    def lr_scale(self) -> float:
        return float(len(self.seen)) if self.options.lr_scale is None else self.options.lr_scale

    def objective_weight(self) -> float:
        return 0.0  # GLFC's loss is the whole loss

    def extra_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        if not len(x):
            return None
        teacher = None
        if self.old:
            with torch.no_grad():
                teacher = self.teacher_logits(x)[:, self.columns[self.old]]
        return glfc_loss(logits[:, self.columns], self.lookup[y], self.old, teacher)
