"""Local objectives: the loss a client minimises on its own (imbalanced) data.

One module per objective, each registering a `LocalObjective` subclass in
`fedtail.registry.OBJECTIVES`. An objective sees the `LocalContext` (its client's class counts, the
global class prior the server derived, the current task's classes, the global model, the persistent
client state) so that rebalancing losses (balanced softmax, logit adjustment, FedLC, FedRS, ...) and
proximal terms (FedProx, MOON, ...) fit the same hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from fedtail.registry import PluginOptions

if TYPE_CHECKING:
    from clients.local import LocalContext
    from fedtail.config import FedtailConfig


class LocalObjective:
    """Base class: override `loss`; `begin` and `end` bracket one round of local training.

    Settings come from ``train.options``, declared as a nested ``class Options(PluginOptions)`` (the config
    checks names and types before any work) and read typed as ``self.options``.
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, ctx: LocalContext) -> None:
        self.ctx = ctx
        self.options = self.Options.model_validate(ctx.job.config.train.options)

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        """Why this objective cannot run with ``cfg`` (naming the fields and what they must be), or
        None. Called while the config is validated, so a nonsense combination stops before any work."""
        return None

    def begin(self) -> None:
        """Called once before the first local step of a round."""

    def lr_scale(self) -> float:
        """Factor on ``train.lr`` for this round (after `begin`): an objective whose paper changes the
        learning rate at a point of its schedule (LDAM-DRW) says so here. 1.0: unchanged."""
        return 1.0

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def end(self) -> None:
        """Called once after the last local step (update client state here)."""

    def class_counts(self, source: str) -> torch.Tensor:
        """Per-class counts a rebalancing loss uses, as float on the model's device.

        ``global``: summed over every client by the server (the global label distribution the papers'
        centralised losses assume); ``local``: this round's training labels on this client (its own
        skew, as in client-side logit calibration). Classes with no sample count 0.
        """
        if source == "local":
            counts = self.ctx.train_counts
        else:
            counts = self.ctx.global_counts
            if counts is None:
                raise RuntimeError("global class counts missing from the train message (old server?)")
        if counts is None:
            raise RuntimeError("train_local sets the round's class counts before building the objective")
        return torch.as_tensor(
            np.asarray(counts, dtype=np.float64), dtype=torch.float32, device=self.ctx.device
        )


class CountsOptions(PluginOptions):
    """Options of objectives that rebalance by class counts: whose counts they use."""

    counts: Literal["global", "local"] = Field(
        "global", description="global: all clients' counts (server-derived); local: this client's round."
    )


def log_counts(counts: torch.Tensor) -> torch.Tensor:
    """log n_j, with classes that have no sample at log(1e-12): out of the softmax in effect (a class
    with no training sample gets no probability mass to learn from anyway), never -inf or NaN."""
    return torch.log(counts.clamp_min(1e-12))


def inverse_frequency(counts: torch.Tensor) -> torch.Tensor:
    """``n / (C n_c)`` over the C classes present (scikit-learn's ``class_weight="balanced"``), 0 else."""
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts[present].sum() / (int(present.sum()) * counts[present])
    return weights
