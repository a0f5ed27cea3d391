"""Local objectives: the loss a client minimises on its own (imbalanced) data.

One module per objective, each registering a `LocalObjective` subclass in
`fedtail.registry.OBJECTIVES`. An objective sees the `LocalContext` (its client's class counts, the
global class prior the server derived, the current task's classes, the global model, the persistent
client state) so that rebalancing losses (balanced softmax, logit adjustment, FedLC, FedRS, ...) and
proximal terms (FedProx, MOON, ...) fit the same hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from fedtail.registry import PluginOptions

if TYPE_CHECKING:
    from clients.local import LocalContext


class LocalObjective:
    """Base class: override `loss`; `begin` and `end` bracket one round of local training.

    Settings come from ``train.options``, declared as a nested ``class Options(PluginOptions)`` (the config
    checks names and types before any work) and read typed as ``self.options``.
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, ctx: LocalContext) -> None:
        self.ctx = ctx
        self.options = self.Options.model_validate(ctx.job.config.train.options)

    def begin(self) -> None:
        """Called once before the first local step of a round."""

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def end(self) -> None:
        """Called once after the last local step (update client state here)."""
