"""Signal strong: MNIST-1D's own scaling, circular shift, noise and shear, at the package's strength
(Greydanus, "Scaling down Deep Learning", arXiv 2020).

In the order of ``mnist1d.transform.transform``, with the defaults of ``mnist1d.data.get_dataset_args``
(``scale_coeff`` 0.4, ``corr_noise_scale`` 0.25, ``iid_noise_scale`` 0.02, ``shear_scale`` 0.75) and a
shift of up to 8 steps either way (the package's ``max_translation`` 48 is counted on the 72-step
template before it is subsampled to 40 steps; 8 of 40 keeps a digit's features in view). The package adds the
correlated noise (white noise through a Gaussian filter of sigma 2) only where its padded template is
zero; a finished signal has no such background, so it is added everywhere. Re-implemented vectorised
with a seeded torch generator (the package draws from numpy's global RNG, one sample at a time) and
applied to the stored, per-step standardised signal, so noise scales are in its units.
"""

from __future__ import annotations

import torch
from pydantic import Field

from clients.augment import Augmentation, gaussian_filter1d, integers, roll, scale_factor, shear, to, uniform
from fedtail.registry import AUGMENTATIONS, PluginOptions

CORR_NOISE_SIGMA = 2.0  # mnist1d's corr_noise_like: gaussian_filter(noise, 2)


@AUGMENTATIONS.register("signal_strong")
class SignalStrong(Augmentation):
    """Scale, circular shift, correlated and white noise, shear: every MNIST-1D transformation but the
    padding and the resampling."""

    modalities = frozenset({"signal"})

    class Options(PluginOptions):
        """The largest shift in steps and the package's strengths (noise scales are standard deviations,
        before the correlated noise's filter)."""

        max_shift: int = Field(8, ge=0, le=1000)
        scale_coeff: float = Field(0.4, ge=0.0, lt=2.0)
        corr_noise_scale: float = Field(0.25, ge=0.0, le=100.0)
        iid_noise_scale: float = Field(0.02, ge=0.0, le=100.0)
        shear_scale: float = Field(0.75, ge=0.0, le=100.0)

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        o, n = self.options, len(x)
        factor = scale_factor(uniform(generator, n), o.scale_coeff)
        shifts = integers(generator, -o.max_shift, o.max_shift, n)
        corr = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        iid = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        coeff = o.shear_scale * (uniform(generator, n) - 0.5)
        out = roll(x * to(factor, x)[:, None, None], shifts)
        out = out + gaussian_filter1d(to(o.corr_noise_scale * corr, x), CORR_NOISE_SIGMA)
        out = out + to(o.iid_noise_scale * iid, x)
        return shear(out, coeff)
