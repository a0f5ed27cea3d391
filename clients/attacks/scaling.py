"""Scaling attack: the client sends x + factor (y - x).

Its update is boosted so it outweighs the honest ones in an average: the explicit boosting of (Bhagoji et
al., 2019, "Analyzing Federated Learning through an Adversarial Lens", ICML); factor 10 by default."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from clients.attacks import Arrays, Attack, floating
from fedtail.registry import ATTACKS, PluginOptions


@ATTACKS.register("scaling")
class Scaling(Attack):
    """x + factor (y - x)."""

    class Options(PluginOptions):
        """The boost."""

        factor: float = Field(10.0, gt=0.0, le=1e6)

    def corrupt(self, received: Arrays, trained: Arrays, rng: np.random.Generator) -> Arrays:
        f = self.options.factor
        return {
            k: (x + f * (trained[k] - x)).astype(x.dtype) if floating(k, x) else trained[k]
            for k, x in received.items()
        }
