"""Learning without Forgetting (Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017).

While learning a new task, the outputs of the old classes are kept close to those of the model as it was
before the task, on the new task's own samples (no exemplars): ``L = L_new + lambda_o * L_old`` with the
knowledge-distillation loss of eq. 2, ``L_old = -sum_j y'_j log yhat'_j``, where ``y' = softmax(z_old / T)``
are the previous model's recorded responses and ``yhat' = softmax(z / T)`` the current model's, over the
old classes only; the paper's defaults ``lambda_o = 1``, ``T = 2``. ``L_new`` is the objective's loss over
the new task's classes only (`objective_classes`): the paper's new task has its own output head.

In the federation the "model before the task" is the global model at the end of the previous task, which
the server sends with every train message (`uses_previous_model`), so every client distils from the same
teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from pydantic import Field
from torch.nn import functional as F

from clients.continual import ContinualMethod
from fedtail.registry import CONTINUAL, PluginOptions

if TYPE_CHECKING:
    from clients.local import LocalContext


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Li & Hoiem's eq. 2 averaged over the batch: cross-entropy of the tempered teacher distribution
    against the tempered student one."""
    target = F.softmax(teacher / temperature, dim=1)
    return -(target * F.log_softmax(student / temperature, dim=1)).sum(dim=1).mean()


def old_class_distillation(
    ctx: LocalContext,
    old: list[int],
    logits: torch.Tensor,
    x: torch.Tensor,
    temperature: float,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """`distillation_loss` of the current logits of the ``old`` classes towards the end-of-previous-task
    model's on the same samples (``teacher``: its logits, default ``ctx.previous_model``); None when
    there is nothing to distil."""
    if not old or not len(x):
        return None
    columns = torch.as_tensor(old, device=logits.device)
    with torch.no_grad():
        teacher = (ctx.previous_model if teacher is None else teacher)(x)[:, columns]
    return distillation_loss(logits[:, columns], teacher, temperature)


@CONTINUAL.register("lwf")
class LwF(ContinualMethod):
    acts_across_tasks = True
    uses_previous_model = True

    class Options(PluginOptions):
        """``lam``: weight of the old-class distillation term (lambda_o); ``temperature``: T."""

        lam: float = Field(1.0, ge=0.0, le=1000.0)
        temperature: float = Field(2.0, gt=0.0, le=100.0)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.old = sorted(set(ctx.seen_classes) - set(ctx.task_classes))

    def objective_classes(self) -> list[int]:
        """The new task's own head (Li & Hoiem's new-task outputs): the objective's loss covers the
        current task's classes only, so it does not push the old classes' logits down; the distillation
        term holds those (PyCIL's class-incremental LwF does the same)."""
        return list(self.ctx.task_classes)

    def extra_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        term = old_class_distillation(self.ctx, self.old, logits, x, self.options.temperature)
        return None if term is None else self.options.lam * term
