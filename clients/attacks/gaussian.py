"""Gaussian attack: the client sends x + N(0, sigma^2) instead of its trained model.

An update of pure noise: the Gaussian Byzantine workers of section 5 of (Blanchard et al., 2017,
"Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS)."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from clients.attacks import Arrays, Attack, floating
from fedtail.registry import ATTACKS, PluginOptions


@ATTACKS.register("gaussian")
class Gaussian(Attack):
    """x + N(0, sigma^2)."""

    class Options(PluginOptions):
        """The noise's standard deviation."""

        sigma: float = Field(1.0, gt=0.0, le=1000.0)

    def corrupt(self, received: Arrays, trained: Arrays, rng: np.random.Generator) -> Arrays:
        s = self.options.sigma
        return {
            k: (x + rng.normal(0.0, s, size=x.shape)).astype(x.dtype) if floating(k, x) else trained[k]
            for k, x in received.items()
        }
