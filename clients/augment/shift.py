"""Shift: FixMatch's weak translation without its flip, the weak view for digits (Sohn et al., "FixMatch:
Simplifying Semi-Supervised Learning with Consistency and Confidence", NeurIPS 2020). A mirrored digit is
another glyph.

Each image moves by up to 12.5 % of its side on each axis in whole pixels (1 of 8 for the 8x8 digits, 3
of 28, 4 of 32), the uncovered border filled with the image's per-channel minimum, its background once
standardised.
"""

from __future__ import annotations

import torch
from pydantic import Field

from clients.augment import Augmentation, flip_and_shift
from fedtail.registry import AUGMENTATIONS, PluginOptions


@AUGMENTATIONS.register("shift")
class Shift(Augmentation):
    """A shift by up to ``max_shift`` of the side."""

    modalities = frozenset({"image"})

    class Options(PluginOptions):
        """The largest shift as a share of the image side (0: identity)."""

        max_shift: float = Field(0.125, ge=0.0, le=0.5)

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return flip_and_shift(x, generator, False, self.options.max_shift)
