"""Continual-learning methods, one module each (PyCIL style), registered in `fedtail.registry.CONTINUAL`.

A method hooks the client's local training at task boundaries and inside each step: it may add samples
(replay memories), add a loss term (distillation, regularisation) and keep anything it needs across rounds
and tasks in the client's persistent state (``ctx.state``, Flower's ``context.state``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from fedtail.registry import PluginOptions

if TYPE_CHECKING:
    from clients.local import LocalContext


class ContinualMethod:
    """Base class; every hook defaults to doing nothing, which is exactly fine-tuning.

    Settings come from ``continual.options``, declared as a nested ``class Options(PluginOptions)`` (checked
    by the config before any work) and read typed as ``self.options``.
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, ctx: LocalContext) -> None:
        self.ctx = ctx
        self.options = self.Options.model_validate(ctx.job.config.continual.options)

    def training_data(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples to train on this round (replay methods append their memory)."""
        return x, y

    def extra_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """A term added to the objective's loss (distillation, EWC, ...); None for nothing."""
        return None

    def end_round(self) -> None:
        """Called after local training, with the trained model in ``ctx.model``."""
