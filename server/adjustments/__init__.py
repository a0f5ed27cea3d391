"""Evaluation-time adjustments: change how the global model is read at evaluation, not how it is trained.

One module per adjustment, each registering an `Adjustment` subclass in
`fedtail.registry.ADJUSTMENTS`. An adjustment may rewrite the model (`model`, e.g. classifier weight
normalisation) and the logits (`logits`, e.g. subtracting a log prior); the server reports the metrics of
the adjusted model beside the plain ones. It sees the global class counts the server derived from the
clients.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fedtail.registry import ADJUSTMENTS, PluginOptions


class Adjustment:
    """Base: the identity. Settings from ``evaluation.options`` as ``self.options``."""

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: dict, class_counts: np.ndarray) -> None:
        self.options = self.Options.model_validate(options)
        self.class_counts = np.asarray(class_counts, dtype=np.float64)

    def model(self, model: nn.Module) -> nn.Module:
        """The model to evaluate (a changed copy, never ``model`` itself changed)."""
        return model

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over all classes, adjusted (the evaluator restricts them to the seen classes after)."""
        return logits


@ADJUSTMENTS.register("none")
class NoAdjustment(Adjustment):
    """No adjustment: only the plain metrics are reported."""
