"""Data augmentations for semi-supervised learning: the weak and the strong view of an unlabeled sample
that FixMatch-family methods compare, registered by name in `fedtail.registry.AUGMENTATIONS` (config
``semisup.weak`` / ``semisup.strong``).

One module per augmentation, each registering an `Augmentation` subclass. An augmentation transforms a
whole batch on the device it lives on, every local step, so each one is vectorised over the batch: its
random parameters (one draw per sample) come from a CPU ``torch.Generator`` and are moved to the batch's
device, so a seed gives the same views on every device and engine. It sees samples through the dataset's
`DatasetSpec.view`, (C,H,W) for images and (C,L) for signals, and refuses (`Augmentation.check`) a
dataset of another modality before any work.

The helpers below are shared: integer translation and flips of images, and vectorised torch versions of
the ``mnist1d`` package's transforms, whose own functions draw from numpy's global RNG and work on one
sample at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from fedtail.registry import AUGMENTATIONS, PluginOptions

if TYPE_CHECKING:
    from fedtail.datasets.base import DatasetSpec

MODALITIES = frozenset({"image", "signal"})
_VIEW_RANK = {"image": 3, "signal": 2}  # (C,H,W) / (C,L)


def view_of(spec: DatasetSpec) -> tuple[int, ...]:
    """The (C,H,W) or (C,L) shape a stored sample of ``spec`` is seen as."""
    return tuple(spec.view) if spec.view is not None else tuple(spec.input_shape)


def _name_of(cls: type) -> str:
    """The name ``cls`` is registered under (its class name when it is not registered)."""
    return next((n for n in AUGMENTATIONS.names() if AUGMENTATIONS.get(n) is cls), cls.__name__)


def choices_for(modality: str) -> list[str]:
    """The registered augmentations that accept data of ``modality``."""
    return [n for n in AUGMENTATIONS.names() if modality in AUGMENTATIONS.get(n).modalities]


class Augmentation:
    """Base class: a batch in, the same batch shape, dtype and device out, drawn from ``generator``.

    Subclasses implement `apply` on the batch seen through the dataset's view; `__call__` checks the
    shape and restores the stored layout.
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions
    modalities: ClassVar[frozenset[str]] = MODALITIES

    def __init__(self, spec: DatasetSpec, options: Mapping[str, Any] | PluginOptions | None = None) -> None:
        reason = self.check(spec)
        if reason is not None:
            raise ValueError(reason)
        self.spec = spec
        self.view = view_of(spec)
        self.options = self.Options.model_validate(options if options is not None else {})

    @classmethod
    def check(cls, spec: DatasetSpec) -> str | None:
        """Why this augmentation cannot run on ``spec``'s data (another modality, or a view that is not
        a (C,H,W) image / (C,L) signal of the stored size), or None."""
        name = _name_of(cls)
        if spec.modality not in cls.modalities:
            return (
                f"augmentation {name!r} works on {' or '.join(sorted(cls.modalities))} data, but dataset "
                f"{spec.name!r} holds {spec.modality!r} data; augmentations for it: "
                f"{', '.join(choices_for(spec.modality)) or 'none registered'}"
            )
        view, rank = view_of(spec), _VIEW_RANK.get(spec.modality)
        if rank is not None and (len(view) != rank or math.prod(view) != math.prod(spec.input_shape)):
            return (
                f"augmentation {name!r}: dataset {spec.name!r} ({spec.modality}) stores samples of shape "
                f"{tuple(spec.input_shape)} but its view {view} is not a "
                f"{'(C,H,W)' if rank == 3 else '(C,L)'} shape of that size"
            )
        return None

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x`` (N, *input_shape) augmented, one random draw per sample from the CPU ``generator``."""
        if tuple(x.shape[1:]) != tuple(self.spec.input_shape):
            raise ValueError(
                f"augmentation {_name_of(type(self))!r} expects a batch of shape (N, "
                f"{', '.join(map(str, self.spec.input_shape))}) for dataset {self.spec.name!r}, got "
                f"{tuple(x.shape)}"
            )
        out = self.apply(x.reshape(len(x), *self.view), generator)
        return out.reshape(x.shape)

    def apply(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The batch seen as (N, C, H, W) or (N, C, L), augmented (a new tensor; ``x`` is kept)."""
        return x


@AUGMENTATIONS.register("none")
class NoAugmentation(Augmentation):
    """No augmentation: the sample as stored (every modality)."""

    class Options(PluginOptions):
        """No settings."""


def uniform(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """U[0, 1) draws on the CPU, float64 so that derived parameters do not depend on the batch dtype."""
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def integers(generator: torch.Generator, low: int, high: int, n: int) -> torch.Tensor:
    """``n`` integers uniform in [low, high] (both ends included), on the CPU."""
    return torch.randint(low, high + 1, (n,), generator=generator)


def to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Parameters drawn on the CPU, moved to the batch's device (floats in its dtype)."""
    return t.to(like.device, like.dtype if t.is_floating_point() else t.dtype)


# --- images (N, C, H, W) ----------------------------------------------------------------------------------


def background(x: torch.Tensor) -> torch.Tensor:
    """Each sample's per-channel minimum (N, C, 1, 1): the background of a standardised image.

    Standardisation moves black away from 0 (to ``-mean/std``) and the stored data does not say where;
    a sample's darkest value is the best guess, and filling with it keeps every value in the sample's range.
    """
    return x.amin(dim=(-2, -1), keepdim=True)


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Each image moved down by ``dy[n]`` and right by ``dx[n]`` whole pixels (integer (N,) tensors on
    the CPU or ``x``'s device), the uncovered border set to ``fill`` (broadcast to (N, C, 1, 1)).

    One gather for the whole batch: ``out[n, :, i, j] = x[n, :, i - dy[n], j - dx[n]]``.
    """
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device) - dy.to(x.device)[:, None]  # (N, H)
    cols = torch.arange(w, device=x.device) - dx.to(x.device)[:, None]  # (N, W)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    moved = x.permute(0, 2, 3, 1)[batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    return torch.where(inside[:, None], moved.permute(0, 3, 1, 2), fill)


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The images where ``mask`` (N,) is true mirrored left-right, the others kept."""
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)


def flip_and_shift(
    x: torch.Tensor, generator: torch.Generator, flip_images: bool, max_shift: float
) -> torch.Tensor:
    """FixMatch's weak view: a flip with probability 0.5 (when ``flip_images``), then a translation by
    up to ``int(max_shift * side)`` pixels on each axis (4 of 32, 3 of 28, 1 of 8), filled with the
    `background`. The flip is drawn only when asked for, so turning it off changes the stream."""
    n, _, h, w = x.shape
    if flip_images:
        x = flip(x, uniform(generator, n) < 0.5)
    mh, mw = int(max_shift * h), int(max_shift * w)
    dy, dx = integers(generator, -mh, mh, n), integers(generator, -mw, mw, n)
    return translate(x, dy, dx, background(x))


# --- signals (N, C, L): the mnist1d package's transforms (Greydanus 2020) ---------------------------------


def roll(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each signal shifted circularly right by ``shifts[n]`` steps (any sign): mnist1d's ``translate``,
    ``concatenate([x[-k:], x[:-k]])``, which is ``np.roll(x, k)``."""
    length = x.shape[-1]
    index = (torch.arange(length, device=x.device) - shifts.to(x.device)[:, None]) % length  # (N, L)
    return x.gather(-1, index[:, None, :].expand(-1, x.shape[1], -1))


def scale_factor(u: torch.Tensor, coeff: float) -> torch.Tensor:
    """mnist1d's amplitude factor ``1 + coeff * (u - 0.5)`` for U[0,1) draws ``u``."""
    return 1.0 + coeff * (u - 0.5)


def shear(x: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """mnist1d's ``shear``: ``x - coeff[n] * linspace(-0.5, 0.5, L)``, a per-sample linear trend (the
    package draws ``coeff = scale * (u - 0.5)``)."""
    ramp = torch.linspace(-0.5, 0.5, x.shape[-1], dtype=torch.float64).to(x.device, x.dtype)
    return x - coeff.to(x.device, x.dtype)[:, None, None] * ramp


def gaussian_filter1d(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter1d`` along the last axis, with scipy's defaults exactly: the kernel
    cut at ``int(truncate * sigma + 0.5)`` steps and mode ``'reflect'`` (half-sample symmetric,
    ``d c b a | a b c d | d c b a``, which no ``F.pad`` mode is, hence the index map). mnist1d's
    ``corr_noise_like`` is this filter with sigma 2 on white noise."""
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.device, x.dtype)
    length = x.shape[-1]
    index = torch.arange(-radius, length + radius, device=x.device) % (2 * length)
    index = torch.where(index >= length, 2 * length - 1 - index, index)
    padded = x[..., index].reshape(-1, 1, length + 2 * radius)
    return F.conv1d(padded, kernel.view(1, 1, -1)).reshape(x.shape)
