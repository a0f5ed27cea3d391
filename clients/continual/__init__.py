"""Continual-learning methods, one module each (PyCIL style), registered in `fedtail.registry.CONTINUAL`.

A method hooks the client's local training at task boundaries and inside each step: it may add samples
(replay memories), add a loss term (distillation, regularisation) and keep anything it needs across rounds
and tasks in the client's persistent state (``ctx.state``, Flower's ``context.state``). It sees all of the
client's data (``ctx.data``: exemplars are chosen from it) and, if it declares `uses_previous_model`, the
global model as it was at the end of the previous task (``ctx.previous_model``), which the server sends.

Methods that need the server to know something about the clients' data once a task is done (iCaRL's
class means, BiC's bias layer, a prototype classifier's class statistics) return `statistics_rounds`:
the server then sends every client the end-of-task model, each client returns sums (`task_statistics`),
the server adds them up over clients and turns them into the method's *head* (`head_from_statistics`),
which the end-of-task and final evaluations score through (`evaluation_logits`). Only sums travel, never
samples; the head is checkpointed with the run and sent to the clients with the next task's messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedtail.registry import PluginOptions

if TYPE_CHECKING:
    from torch import nn

    from clients.local import LocalContext
    from fedtail.config import FedtailConfig


def linear_head_problem(cfg: FedtailConfig, needs: str) -> str | None:
    """Why a method that works on a linear classifier's rows cannot run with ``cfg``'s head, or None;
    ``needs`` says what it does with them."""
    if cfg.model.classifier == "linear":
        return None
    return (
        f"continual.method={cfg.continual.method!r} {needs}; model.classifier={cfg.model.classifier!r} "
        "has normalised rows, not a linear classifier: use linear"
    )


Head = dict[str, np.ndarray]
"""A method's server-side state: named arrays (class means, bias parameters); empty by default."""


class ContinualMethod:
    """Base class; every hook defaults to doing nothing, which is exactly fine-tuning.

    Settings come from ``continual.options``, declared as a nested ``class Options(PluginOptions)`` (checked
    by the config before any work) and read typed as ``self.options``.
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions
    acts_across_tasks: ClassVar[bool] = False
    """True for a method that does something only from the second task on (memories, penalties,
    distillation): the config refuses it with a single task, where it would silently be fine-tuning."""
    uses_previous_model: ClassVar[bool] = False
    """True: from task 1 on, every train message carries the end-of-previous-task global model (one
    model more per message), as ``ctx.previous_model``; the same teacher for every client, whichever
    round of the task it is first sampled in."""

    @classmethod
    def statistics_rounds(cls, cfg: FedtailConfig) -> int:
        """End-of-task exchanges with every client (after `end_task_on_server`); 0: none."""
        return 0

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        """Why this method cannot run with ``cfg`` (checked with the config, before any work), or None."""
        if cls.acts_across_tasks and cfg.num_tasks < 2:
            return (
                f"continual.method={cfg.continual.method!r} acts from the second task on, but the schedule "
                "has one task: set tasks.classes_per_task (or tasks.sizes) for several tasks, or use "
                "finetune"
            )
        return None

    def __init__(self, ctx: LocalContext) -> None:
        self.ctx = ctx
        self.options = self.Options.model_validate(ctx.job.config.continual.options)

    def training_data(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples to train on this round (replay methods append their memory)."""
        return x, y

    def objective_weight(self) -> float:
        """Factor on the objective's loss before `extra_loss` is added (WA's ``1 - lambda``). 1.0: none."""
        return 1.0

    def lr_scale(self) -> float:
        """Factor on ``train.lr`` for this method's local training (a loss on another scale than
        cross-entropy's, as GLFC's class-averaged binary cross-entropy). 1.0: none."""
        return 1.0

    def objective_classes(self) -> list[int] | None:
        """The classes whose logits the objective's loss sees (the others are masked out of it, so it
        neither raises nor lowers them); None: every class. Methods that model the new task as its own
        head, as LwF and EWC do in class-incremental learning, return the current task's classes."""
        return None

    def extra_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """A term added to the objective's loss (distillation, EWC, ...); None for nothing."""
        return None

    def after_step(self, logits: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        """After each optimiser step, with the step's logits (detached, from before the step), labels and
        the samples' positions in what `training_data` returned (DER's reservoir stores them)."""

    def end_round(self) -> None:
        """Called after local training, with the trained model in ``ctx.model``."""

    @classmethod
    def end_task_on_server(cls, arrays: ArrayRecord, old: list[int], new: list[int]) -> ArrayRecord:
        """The global model once a task's rounds are done, before it is evaluated and the next task
        starts from it (WA's weight aligning). ``old``: classes of the earlier tasks; ``new``: the
        task's. Runs on the server; the identity by default."""
        return arrays

    def task_statistics(self, head: Head, exchange: int) -> Head:
        """Client side of end-of-task exchange ``exchange``: arrays the server adds up over clients
        (per-class sums and counts, sample-weighted parameters). ``ctx.model`` is the end-of-task global
        model (frozen); ``ctx`` is otherwise the task's, with the client's state read-only (changes to
        it are not kept). ``head``: the server's head so far (for exchange 0, the previous task's)."""
        return {}

    @classmethod
    def head_from_statistics(
        cls,
        sums: Head,
        head: Head,
        exchange: int,
        *,
        arrays: ArrayRecord,
        old: list[int],
        new: list[int],
        options: PluginOptions,
    ) -> tuple[ArrayRecord, Head]:
        """Server side of an exchange: the model and head from the clients' summed statistics (float64,
        added in partition order). The model returned is what is evaluated and what the next task
        starts from; the head is what `evaluation_logits` reads. ``options``: the method's, validated."""
        return arrays, head

    @classmethod
    def evaluation_logits(cls, model: nn.Module, x: torch.Tensor, head: Head) -> torch.Tensor:
        """Logits the end-of-task and final evaluations score (nearest-mean scores, bias-corrected
        logits); within a task's rounds the model's own logits are scored. Default: ``model(x)``."""
        return model(x)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The end-of-previous-task model's logits, as distillation's teacher sees them: the model's own
        by default; a method with a head applies it (BiC's old model includes its bias layer)."""
        return self.ctx.previous_model(x)

    @classmethod
    def memory_footprint(cls, ctx: LocalContext) -> tuple[int, int]:
        """(samples, bytes) the client keeps for this method between rounds, read from ``ctx.state``
        (and ``ctx.data``): exemplars, stored logits, Fisher matrices, model copies. Reported per client
        (``clients.csv``) and summed per task (``tasks.csv``)."""
        return 0, 0
