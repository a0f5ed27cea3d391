"""RandAugment and Cutout: FixMatch's strong augmentation, random operations per image, then a grey square
(Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence", NeurIPS
2020).

RandAugment (Cubuk et al., "RandAugment: Practical Automated Data Augmentation with a Reduced Search
Space", CVPR Workshops 2020) applies N operations drawn uniformly from a pool; FixMatch's variant draws
the magnitude of each uniformly per sample instead of fixing it, and ends with Cutout (DeVries & Taylor,
"Improved Regularization of Convolutional Neural Networks with Cutout", arXiv 2017): a square of half the
image side (16 of 32 pixels, 4 of the 8x8 digits) set to grey.

The pool is FixMatch's (the ranges of its RandAugment table) read on standardised values: the uint8 range
[0, 255] the PIL operations assume becomes each sample's own per-channel range [lo, hi], which every
photometric operation clips to as PIL clips to [0, 255].

- geometric: rotate ±30°, shear_x / shear_y ±0.3, translate_x / translate_y ±30 % of the side, about the
  image centre with nearest sampling (values stay the image's own), the uncovered area filled with lo;
- photometric, blends ``ref + f (x - ref)`` with f in [0.05, 0.95]: brightness (ref lo, the background,
  as PIL blends with black), contrast (the sample mean), color (the per-pixel mean over channels: the
  identity on grey images), sharpness (PIL's 3x3 smoothing, border pixels kept);
- photometric on the range [lo, hi]: posterize to 4..8 bits, solarize (invert within [lo, hi]) above a
  threshold drawn in [lo, hi], equalize (each value replaced by its rank within its channel, spread over
  [lo, hi]): meaningful because they depend only on the order and the span of the values, not on where
  0 and 255 were;
- identity.

Dropped: autocontrast, which stretches each channel to its own range and so is the identity once that
range is the reference. Cutout fills with 0, the training mean after standardisation: FixMatch's grey.

Vectorised: the geometric operations of a sample compose into one affine matrix per sample, applied once
by ``F.affine_grid`` + ``F.grid_sample`` after the photometric ones (they commute up to the pixels the
geometry moves out of or into the frame, and one nearest resampling keeps values exact);
``torchvision.transforms.v2.functional.affine`` takes one parameter set per call, so per-sample
parameters would need a Python loop over the batch. Each photometric operation runs once per slot, on
the samples that drew it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field

from clients.augment import Augmentation, background, flip_and_shift, to, uniform
from fedtail.registry import AUGMENTATIONS, PluginOptions

GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
PHOTOMETRIC = ("brightness", "color", "contrast", "equalize", "posterize", "sharpness", "solarize")
OPS = ("identity", *PHOTOMETRIC, *GEOMETRIC)
MAX_ROTATE = 30.0  # degrees
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3  # share of the side
CUTOUT_FILL = 0.0  # the training mean once standardised: FixMatch's grey

Op = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A photometric operation: (images (M,C,H,W), magnitudes (M,1,1,1) in [0,1), lo, hi (M,C,1,1))."""


def _factor(m: torch.Tensor) -> torch.Tensor:
    return 0.05 + 0.9 * m  # FixMatch's [0.05, 0.95] for the PIL enhancers


def _brightness(x: torch.Tensor, m: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return lo + _factor(m) * (x - lo)


def _color(x: torch.Tensor, m: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    grey = x.mean(dim=1, keepdim=True)
    return grey + _factor(m) * (x - grey)


def _contrast(x: torch.Tensor, m: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + _factor(m) * (x - mean)


def _sharpness(x: torch.Tensor, m: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    if h < 3 or w < 3:
        return x
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13.0
    smooth = F.conv2d(x.reshape(n * c, 1, h, w), kernel.to(x.dtype).view(1, 1, 3, 3))
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth.reshape(n, c, h - 2, w - 2)
    return degenerate + _factor(m) * (x - degenerate)


def _posterize(x: torch.Tensor, m: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    step = torch.exp2(torch.floor(m * 5.0))  # keep 8 - floor(5 m) of 8 bits: 4..8
    span = (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)
    levels = torch.floor((x - lo) / span * 255.0)
    return lo + torch.floor(levels / step) * step / 255.0 * span


def _solarize(x: torch.Tensor, m: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= lo + m * (hi - lo), lo + hi - x, x)


def _equalize(x: torch.Tensor, m: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation as a rank transform: a value's share of its channel's values below it,
    over the share below the maximum, so the minimum maps to lo and the maximum to hi; ties keep one
    value (PIL's histogram does the same)."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w)
    ordered = flat.sort(dim=1).values
    below = torch.searchsorted(ordered, flat)
    top = torch.searchsorted(ordered, ordered[:, -1:].contiguous())
    rank = (below / top.clamp_min(1)).to(x.dtype).reshape(x.shape)
    constant = (top == 0).reshape(n, c, 1, 1)
    return torch.where(constant, x, lo + rank * (hi - lo))


PHOTOMETRIC_OPS: dict[str, Op] = {
    "brightness": _brightness,
    "color": _color,
    "contrast": _contrast,
    "equalize": _equalize,
    "posterize": _posterize,
    "sharpness": _sharpness,
    "solarize": _solarize,
}


def geometric_matrices(ops: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor, h: int, w: int):
    """One slot's (N,3,3) float64 inverse maps (output pixel -> input pixel, coordinates about the
    image centre, x right and y down) for op ids ``ops`` (N,) into `OPS`; the identity for a
    non-geometric op. Forward, rotate turns by +angle (x towards y), shear_x moves x by shear * y and
    translate_x moves the image right by the signed share of its width."""
    n = len(ops)
    s = (sign * magnitude).to(torch.float64)
    zero = torch.zeros(n, dtype=torch.float64)

    def pick(name: str, scale: float) -> torch.Tensor:
        return torch.where(ops == OPS.index(name), s * scale, zero)

    angle = pick("rotate", math.radians(MAX_ROTATE))
    shear_x, shear_y = pick("shear_x", MAX_SHEAR), pick("shear_y", MAX_SHEAR)
    shift_x, shift_y = pick("translate_x", MAX_TRANSLATE * w), pick("translate_y", MAX_TRANSLATE * h)
    cos, sin, one = torch.cos(angle), torch.sin(angle), torch.ones(n, dtype=torch.float64)

    def matrix(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, c: torch.Tensor, d: torch.Tensor, u):
        return torch.stack([a, b, t, c, d, u, zero, zero, one], dim=1).view(n, 3, 3)

    rotate = matrix(cos, sin, zero, -sin, cos, zero)  # R(-angle)
    shear_xm = matrix(one, -shear_x, zero, zero, one, zero)
    shear_ym = matrix(one, zero, zero, -shear_y, one, zero)
    translate = matrix(one, zero, -shift_x, zero, one, -shift_y)
    return translate @ shear_ym @ shear_xm @ rotate  # one of the four is not the identity


def normalised(matrices: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pixel-coordinate maps as ``F.affine_grid`` thetas (N,2,3), ``align_corners=False``: there a
    pixel centre about the image centre at u pixels sits at u / (w/2)."""
    scale = torch.diag(torch.tensor([w / 2.0, h / 2.0, 1.0], dtype=torch.float64))
    return (torch.linalg.inv(scale) @ matrices @ scale)[:, :2]


def warp(x: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``x`` resampled (nearest) through per-sample ``theta`` (N,2,3); where the map leaves the image,
    ``fill``. A channel of ones marks the inside, so kept values are exactly the image's own."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    marked = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    sampled = F.grid_sample(marked, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return torch.where(sampled[:, -1:] > 0.5, sampled[:, :-1], fill)


def cutout(
    x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: tuple[int, int], fill: float = CUTOUT_FILL
) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017): in each image, rows ``cy - size[0]//2`` .. ``+ size[0]`` and
    the same columns about ``cx`` set to ``fill`` in every channel, clipped at the border (a centre
    near an edge cuts less, as in FixMatch's code)."""
    _, _, h, w = x.shape
    top = (cy.to(x.device) - size[0] // 2)[:, None]
    left = (cx.to(x.device) - size[1] // 2)[:, None]
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + size[0])
    in_cols = (cols >= left) & (cols < left + size[1])
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], fill)


@AUGMENTATIONS.register("randaugment")
class RandAugment(Augmentation):
    """``num_ops`` random operations of random magnitude per image, then Cutout."""

    modalities = frozenset({"image"})

    class Options(PluginOptions):
        """Operations per image; Cutout's side as a share of the image side (0: none); an optional weak
        flip / shift first, as FixMatch's reference code does on CIFAR (off: the paper's RA + Cutout,
        and a flipped digit is another glyph)."""

        num_ops: int = Field(2, ge=0, le=len(OPS))
        cutout: float = Field(0.5, ge=0.0, le=1.0)
        flip: bool = False
        max_shift: float = Field(0.0, ge=0.0, le=0.5)

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        o = self.options
        n, _, h, w = x.shape
        if o.flip or o.max_shift > 0:
            x = flip_and_shift(x, generator, o.flip, o.max_shift)
        ops = torch.randint(0, len(OPS), (n, o.num_ops), generator=generator)
        magnitude = uniform(generator, n, o.num_ops)
        sign = torch.where(uniform(generator, n, o.num_ops) < 0.5, -1.0, 1.0).to(torch.float64)
        cy, cx = (
            torch.randint(0, h, (n,), generator=generator),
            torch.randint(0, w, (n,), generator=generator),
        )
        lo, hi = background(x), x.amax(dim=(-2, -1), keepdim=True)
        out = x.clone()
        for slot in range(o.num_ops):
            for name, op in PHOTOMETRIC_OPS.items():
                chosen = (ops[:, slot] == OPS.index(name)).nonzero().flatten()
                if len(chosen):
                    d = chosen.to(x.device)
                    y = op(out[d], to(magnitude[chosen, slot], x).view(-1, 1, 1, 1), lo[d], hi[d])
                    out[d] = torch.minimum(torch.maximum(y, lo[d]), hi[d])
        geometric_ids = torch.tensor([OPS.index(g) for g in GEOMETRIC])
        moved = torch.isin(ops, geometric_ids).any(dim=1).nonzero().flatten()
        if len(moved):
            maps = torch.eye(3, dtype=torch.float64).expand(len(moved), 3, 3)
            for slot in range(o.num_ops):  # out = op_k(...op_1(x)): input = M_1 ... M_k output
                maps = maps @ geometric_matrices(
                    ops[moved, slot], magnitude[moved, slot], sign[moved, slot], h, w
                )
            d = moved.to(x.device)
            out[d] = warp(out[d], to(normalised(maps, h, w), x), lo[d])
        if o.cutout > 0:
            out = cutout(out, cy, cx, (int(o.cutout * h + 0.5), int(o.cutout * w + 0.5)))
        return out
