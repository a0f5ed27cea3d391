"""Loss terms a server strategy adds to every local step: its client part (FedProx's proximal term,
SCAFFOLD's drift correction, FedLC's and FedRS's logit calibration).

The local step composes, in one forward pass: the features and logits of the batch; each term's
`LossTerm.adjust_logits` (what the objective scores); the objective's loss on them; the continual
method's `extra_loss`; each term's `LossTerm.loss`; after the backward pass each term's
`LossTerm.before_step` (a gradient correction). A term may keep state in the client's persistent
state (``ctx.state``) and add records to the train reply (``ctx.reply``), which reach the strategy's
`server_update`. A strategy names its term as ``client_term``; adding one never touches the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from fedtail.registry import PluginOptions

if TYPE_CHECKING:
    from torch import nn

    from clients.local import LocalContext
    from fedtail.config import FedtailConfig


@dataclass(frozen=True)
class Step:
    """One local step as the terms see it: the real samples' inputs and features, and every row's
    labels and logits (SMOTE's synthetic features add rows after the real ones)."""

    x: torch.Tensor
    y: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor


class LossTerm:
    """Base class of a strategy's client part; every hook defaults to doing nothing.

    Settings are the strategy's ``strategy.options`` (``Options`` is the strategy's, read typed as
    ``self.options``); what the server sends with the round is ``ctx.message`` (its config record and
    the strategy's `train_records`)."""

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        """Why the strategy's client part cannot run with ``cfg`` (checked before any work), or None."""
        return None

    def __init__(self, ctx: LocalContext, options: PluginOptions) -> None:
        self.ctx = ctx
        self.options = options

    def begin(self, model: nn.Module, lr: float, x: torch.Tensor, y: torch.Tensor) -> None:
        """Before the first step, with the model holding the received global weights, the local step
        size the optimiser uses and the round's real training samples ``x``, ``y`` (after the continual
        method's replay, on the CPU): what a term computes once per round (CReFF's real gradients)."""

    def adjust_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the objective scores (calibrated, restricted); the identity by default."""
        return logits

    def loss(self, step: Step) -> torch.Tensor | None:
        """A term added to the step's loss; None for nothing."""
        return None

    def before_step(self) -> None:
        """After the step's backward pass, before clipping and the optimiser step: a correction of the
        gradients themselves (SCAFFOLD's), which a loss term would also add to the reported loss."""

    def end(self, model: nn.Module, steps: int) -> None:
        """After the last step (``steps`` optimiser steps taken): update ``ctx.state``, add reply records
        to ``ctx.reply``."""


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters local training updates, by name (what drift corrections and proximal terms are
    over; buffers such as batch-norm statistics are not parameters)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
