"""Scaling (boosting) attack: the client sends x + s (y - x), its update multiplied by ``factor`` so it
outweighs the honest ones in an average (Bhagoji et al., 2019, "Analyzing Federated Learning through an
Adversarial Lens", ICML, explicit boosting; factor 10, the order of the number of clients there)."""

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
