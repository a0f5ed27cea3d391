"""Evaluation-time adjustments: change how the global model is read at evaluation, not how it is trained.

One module per adjustment, each registering an `Adjustment` subclass in
`fedtail.registry.ADJUSTMENTS`. An adjustment may rewrite the model (`model`, e.g. classifier weight
normalisation) and the logits (`logits`, e.g. subtracting a log prior); the server reports the metrics of
the adjusted model beside the plain ones. It sees the global class counts the server derived from the
clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from fedtail.registry import ADJUSTMENTS, PluginOptions

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig


class Adjustment:
    """Base: the identity. Settings from ``evaluation.options`` as ``self.options``."""

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    @property
    def calibration_fraction(self) -> float:
        """Share of the test split the evaluator holds out for `calibrate` (then every metric of the run,
        plain and adjusted, is computed on the rest). 0: the adjustment needs no data."""
        return 0.0

    def __init__(self, options: dict, class_counts: np.ndarray) -> None:
        self.options = self.Options.model_validate(options)
        self.class_counts = np.asarray(class_counts, dtype=np.float64)

    def model(self, model: nn.Module) -> nn.Module:
        """The model to evaluate (a changed copy, never ``model`` itself changed)."""
        return model

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over all classes, adjusted (the evaluator restricts them to the seen classes after)."""
        return logits

    def calibrate(self, logits: torch.Tensor, y: np.ndarray, seen: Sequence[int]) -> None:
        """Fit the adjustment to the held-out calibration samples before each evaluation: ``logits`` of
        the `model` over ``seen`` (columns in ``seen``'s order), ``y`` their labels."""

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        """Why this adjustment cannot run with ``cfg``, or None (checked with the config)."""
        return None


@ADJUSTMENTS.register("none")
class NoAdjustment(Adjustment):
    """No adjustment: only the plain metrics are reported."""
