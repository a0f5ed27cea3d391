"""Sign-flipping attack: the client sends x - scale (y - x).

Its update reversed, the sign-flipping attack of (Li et al., 2019, "RSA: Byzantine-Robust Stochastic
Aggregation Methods for Distributed Learning from Heterogeneous Datasets", AAAI); scale 1 by default."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from clients.attacks import Arrays, Attack, floating
from fedtail.registry import ATTACKS, PluginOptions


@ATTACKS.register("sign_flip")
class SignFlip(Attack):
    """x - scale (y - x)."""

    class Options(PluginOptions):
        """How far the reversed update goes."""

        scale: float = Field(1.0, gt=0.0, le=1000.0)

    def corrupt(self, received: Arrays, trained: Arrays, rng: np.random.Generator) -> Arrays:
        s = self.options.scale
        return {
            k: (x - s * (trained[k] - x)).astype(x.dtype) if floating(k, x) else trained[k]
            for k, x in received.items()
        }
