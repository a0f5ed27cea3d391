"""Flip and shift: FixMatch's weak augmentation, a random horizontal flip and a small translation (Sohn
et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence", NeurIPS 2020).

Each image is mirrored with probability 0.5 and moved by up to 12.5 % of its side on each axis (4 of 32
pixels, as FixMatch's pad-4-and-crop), by whole pixels. The uncovered border takes the image's
background, its per-channel minimum (standardised data has no fixed black); FixMatch's reference code
pads by reflection instead, which would copy digit strokes into the border of small images. A mirrored
digit is another glyph, so digits take `shift` (no flip) as their weak view.
"""

from __future__ import annotations

import torch
from pydantic import Field

from clients.augment import Augmentation, flip_and_shift
from fedtail.registry import AUGMENTATIONS, PluginOptions


@AUGMENTATIONS.register("flip_shift")
class FlipShift(Augmentation):
    """A flip with probability 0.5, then a shift by up to ``max_shift`` of the side."""

    modalities = frozenset({"image"})

    class Options(PluginOptions):
        """Whether to flip, and the largest shift as a share of the image side."""

        flip: bool = True
        max_shift: float = Field(0.125, ge=0.0, le=0.5)

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return flip_and_shift(x, generator, self.options.flip, self.options.max_shift)
