"""tau-normalisation (Kang et al., "Decoupling Representation and Classifier for Long-Tailed
Recognition", ICLR 2020, section 4).

Each class's classifier weight vector is rescaled, ``w_j <- w_j / ||w_j||^tau``: after long-tailed
training, head classes have larger weight norms, which biases decisions toward them; ``tau = 1`` fully
normalises, ``tau = 0`` changes nothing. The paper's classifier has no bias term; here the bias is kept
as trained. The paper picks ``tau`` on a validation set in [0, 1]; the default here is 1. Needs a linear
classifier (a cosine one is normalised already).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import nn

from fedtail.registry import ADJUSTMENTS, PluginOptions
from server.adjustments import Adjustment


@ADJUSTMENTS.register("tau_norm")
class TauNormalisation(Adjustment):
    class Options(PluginOptions):
        """``tau``: exponent of the weight-norm division (0: unchanged, 1: unit norms)."""

        tau: float = Field(1.0, ge=0.0, le=2.0)

    def model(self, model: nn.Module) -> nn.Module:
        head = model.classifier
        if not isinstance(head, nn.Linear):
            raise TypeError(f"tau_norm needs a linear classifier, got {type(head).__name__}")
        adjusted = copy.deepcopy(model)
        with torch.no_grad():
            w = adjusted.classifier.weight
            w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(self.options.tau))
        return adjusted

    @classmethod
    def check_config(cls, cfg) -> str | None:  # noqa: ANN001 - FedtailConfig, imported lazily
        if cfg.model.classifier != "linear":
            return (
                "evaluation.adjustment='tau_norm' needs model.classifier=linear (a cosine head is normalised)"
            )
        return None
