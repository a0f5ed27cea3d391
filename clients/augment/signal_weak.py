"""Signal weak: MNIST-1D's own circular shift and amplitude scaling, at low strength (Greydanus, "Scaling
down Deep Learning", arXiv 2020).

The ``mnist1d`` package builds each sample by scaling (``1 + scale_coeff (u - 0.5)``), circularly
translating, adding noise and shearing a digit template; the weak view keeps the two that leave the
shape intact, re-implemented vectorised with a seeded torch generator (the package draws from numpy's
global RNG, one sample at a time). The shift is symmetric, up to ``max_shift`` steps either way, where
the package's draws ``[0, max_translation)`` to the right of a template it padded on the right. Applied
to the stored, per-step standardised signal, so amplitudes are in its units.
"""

from __future__ import annotations

import torch
from pydantic import Field

from clients.augment import Augmentation, integers, roll, scale_factor, to, uniform
from fedtail.registry import AUGMENTATIONS, PluginOptions


@AUGMENTATIONS.register("signal_weak")
class SignalWeak(Augmentation):
    """A circular shift by up to ``max_shift`` steps of a signal scaled by ``1 + scale_coeff (u - 0.5)``."""

    modalities = frozenset({"signal"})

    class Options(PluginOptions):
        """The largest shift in steps and the amplitude range (factor in 1 ± scale_coeff / 2)."""

        max_shift: int = Field(4, ge=0, le=1000)
        scale_coeff: float = Field(0.1, ge=0.0, lt=2.0)

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(x)
        factor = scale_factor(uniform(generator, n), self.options.scale_coeff)
        shifts = integers(generator, -self.options.max_shift, self.options.max_shift, n)
        return roll(x * to(factor, x)[:, None, None], shifts)
