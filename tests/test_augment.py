"""Semi-supervised augmentations: every registered one on each dataset its modality allows (layout,
seeding, value ranges), the special cases of each, the mnist1d primitives against the package's own
functions, and the modality check that refuses a config before any work."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import scipy.ndimage
import torch

from clients.augment import background, choices_for, gaussian_filter1d, roll, shear, translate
from clients.augment.randaugment import OPS, PHOTOMETRIC_OPS, cutout, geometric_matrices, normalised, warp
from fedtail.catalog import entries
from fedtail.datasets.base import DatasetSpec
from fedtail.registry import AUGMENTATIONS, DATASETS, check_options

DIGITS = DATASETS.get("digits")
m1d = importlib.import_module("mnist1d.transform")  # the package exports a function of that name
MNIST1D = DATASETS.get("mnist1d")
COLOUR = dataclasses.replace(DATASETS.get("cifar10"), name="tiny-colour", input_shape=(3, 8, 8))
SPECS = (DIGITS, MNIST1D, COLOUR)
N = 32
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
PAIRS = [
    pytest.param(name, spec, id=f"{name}-{spec.name}")
    for name in AUGMENTATIONS.names()
    for spec in SPECS
    if spec.modality in AUGMENTATIONS.get(name).modalities
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(spec: DatasetSpec, n: int = N, seed: int = 0) -> torch.Tensor:
    """Standardised-looking data; images get a flat background (ties, as in digits)."""
    x = torch.randn(n, *spec.input_shape, generator=_gen(seed))
    return x.clamp_min(-0.8) if spec.modality == "image" else x


def _make(name: str, spec: DatasetSpec, **options: object):
    return AUGMENTATIONS.get(name)(spec, options)


def _per_channel(x: torch.Tensor, spec: DatasetSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's per-channel min and max, (N, C)."""
    flat = x.reshape(len(x), (spec.view or spec.input_shape)[0], -1)
    return flat.amin(-1), flat.amax(-1)


def _within(out: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: DatasetSpec) -> bool:
    o_lo, o_hi = _per_channel(out, spec)
    return bool((o_lo >= lo).all() and (o_hi <= hi).all())


def test_every_pair_is_covered_and_the_specs_declare_their_view() -> None:
    assert {"none", "flip_shift", "shift", "randaugment", "signal_weak", "signal_strong"} <= set(
        AUGMENTATIONS.names()
    )
    assert (DIGITS.modality, DIGITS.view) == ("image", (1, 8, 8))
    assert (MNIST1D.modality, MNIST1D.view) == ("signal", (1, 40))
    cifar = DATASETS.get("cifar10")
    assert (cifar.modality, cifar.view, cifar.input_shape) == ("image", None, (3, 32, 32))
    assert (DIGITS.revision, MNIST1D.revision, cifar.revision) == (1, 1, 0)  # the data did not change


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "spec"), PAIRS)
def test_layout_seeding_and_per_sample_draws(name: str, spec: DatasetSpec, device: str) -> None:
    aug = _make(name, spec)
    assert aug.check(spec) is None
    x = _batch(spec).to(device)
    before = x.clone()
    out = aug(x, _gen(1))
    assert (out.shape, out.dtype, out.device) == (x.shape, x.dtype, x.device)
    assert torch.equal(x, before)  # the input is not changed in place
    assert torch.isfinite(out).all()
    assert torch.equal(out, aug(x, _gen(1)))  # the generator's state alone decides
    same = x[:1].expand_as(x).contiguous()
    views = aug(same, _gen(3))
    if name == "none":
        assert torch.equal(out, x) and torch.equal(views, same)
    else:
        assert not torch.equal(out, aug(x, _gen(2)))
        assert len(torch.unique(views.reshape(N, -1), dim=0)) > 1  # one draw per sample, not per batch
    if device != "cpu":  # parameters are drawn on the CPU: the device only changes the arithmetic
        torch.testing.assert_close(out.cpu(), aug(x.cpu(), _gen(1)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "spec"), PAIRS)
def test_values_stay_in_the_stated_range(name: str, spec: DatasetSpec) -> None:
    """Geometric ops with nearest sampling and a background fill keep each sample-channel's range;
    randaugment's photometric ops clip to it and Cutout adds 0; the signals scale by at most 1 ± c/2,
    and the strong one adds noise and a trend of a few tenths."""
    x = _batch(spec, n=64)
    out = _make(name, spec)(x, _gen(4))
    lo, hi = _per_channel(x, spec)
    if name in ("none", "flip_shift", "shift"):
        assert _within(out, lo, hi, spec)
    elif name == "randaugment":
        assert _within(out, lo.clamp_max(0.0), hi.clamp_min(0.0), spec)
    elif name in ("signal_weak", "signal_strong"):
        c, margin = (0.1, 0.0) if name == "signal_weak" else (0.4, 1.0)
        bound = (1 + c / 2) * x.abs().amax(dim=1) + margin + 1e-6
        assert (out.abs().amax(dim=1) <= bound).all()


@pytest.mark.parametrize("spec", [DIGITS, COLOUR], ids=lambda s: s.name)
def test_zero_strength_is_the_identity(spec: DatasetSpec) -> None:
    x = _batch(spec)
    assert torch.equal(_make("shift", spec, max_shift=0.0)(x, _gen(0)), x)
    assert torch.equal(_make("flip_shift", spec, flip=False, max_shift=0.0)(x, _gen(0)), x)
    assert torch.equal(_make("randaugment", spec, num_ops=0, cutout=0.0)(x, _gen(0)), x)


def test_signal_zero_strength_is_the_identity() -> None:
    x = _batch(MNIST1D)
    assert torch.equal(_make("signal_weak", MNIST1D, max_shift=0, scale_coeff=0.0)(x, _gen(0)), x)
    zero = {k: 0.0 for k in ("scale_coeff", "corr_noise_scale", "iid_noise_scale", "shear_scale")}
    torch.testing.assert_close(_make("signal_strong", MNIST1D, max_shift=0, **zero)(x, _gen(0)), x)


def test_shift_moves_by_whole_pixels_up_to_an_eighth_of_the_side() -> None:
    """On 8x8 digits an eighth is 1 pixel: each output is the input moved by (dy, dx) in {-1, 0, 1}^2."""
    x = _batch(DIGITS)
    out = _make("shift", DIGITS)(x, _gen(5)).reshape(N, 1, 8, 8)
    img = x.reshape(N, 1, 8, 8)
    fill = background(img)
    found = torch.zeros(N, dtype=torch.bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            moved = translate(img, torch.full((N,), dy), torch.full((N,), dx), fill)
            found |= (moved == out).flatten(1).all(1)
    assert found.all()


def test_translate_moves_down_and_right_and_fills_the_border() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = translate(x, torch.tensor([1]), torch.tensor([-2]), torch.full((1, 1, 1, 1), -1.0))
    expected = torch.tensor([[-1, -1, -1, -1], [2, 3, -1, -1], [6, 7, -1, -1], [10, 11, -1, -1.0]])
    assert torch.equal(out[0, 0], expected)


def test_flip_twice_is_the_identity() -> None:
    x = _batch(COLOUR)
    aug = _make("flip_shift", COLOUR, max_shift=0.0)
    once = aug(x, _gen(6))
    assert torch.equal(aug(once, _gen(6)), x)
    flipped = (once == x.flip(-1)).flatten(1).all(1)
    kept = (once == x).flatten(1).all(1)
    assert (flipped | kept).all() and flipped.any() and kept.any()


def test_cutout_fills_the_expected_pixels() -> None:
    ones = torch.ones(3, 3, 8, 8)
    out = cutout(ones, torch.tensor([4, 0, 7]), torch.tensor([4, 0, 3]), (4, 4))
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert zeros.tolist() == [16 * 3, 4 * 3, 3 * 4 * 3]  # inside; cut to 2x2 at a corner; 3 rows at the edge
    assert torch.equal(
        (out[0] == 0).nonzero()[:, 1:].unique(dim=0), torch.cartesian_prod(*[torch.arange(2, 6)] * 2)
    )
    # randaugment's default on 8x8: a square of side 4 at a random centre, clipped at the border
    only_cutout = _make("randaugment", COLOUR, num_ops=0)(torch.ones(N, 3, 8, 8), _gen(7))
    cut = (only_cutout == 0).sum(dim=(1, 2, 3)) // 3
    assert set(cut.tolist()) <= {4, 6, 8, 9, 12, 16} and (cut == 16).any()


def test_randaugment_geometry_follows_the_stated_conventions() -> None:
    """translate_x by +2 pixels is `translate` right by 2; rotate by +90° turns x towards y (down), which
    is rot90 with k=-1; composed slots act in order."""
    x = _batch(COLOUR, n=2)
    fill = background(x)

    def run(ops: list[str], magnitude: list[float], sign: list[float]) -> torch.Tensor:
        maps = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
        for op, m, s in zip(ops, magnitude, sign, strict=True):
            ids = torch.tensor([OPS.index(op)] * 2)
            mags = torch.full((2,), m, dtype=torch.float64)
            maps = maps @ geometric_matrices(ids, mags, torch.full((2,), s, dtype=torch.float64), 8, 8)
        return warp(x, normalised(maps, 8, 8).float(), fill)

    assert torch.equal(
        run(["translate_x"], [2 / (0.3 * 8)], [1.0]),
        translate(x, *[torch.tensor([0, 0])], torch.tensor([2, 2]), fill),
    )
    assert torch.equal(
        run(["translate_y"], [1 / (0.3 * 8)], [-1.0]),
        translate(x, torch.tensor([-1, -1]), torch.tensor([0, 0]), fill),
    )
    assert torch.equal(run(["rotate"], [3.0], [1.0]), torch.rot90(x, -1, (-2, -1)))  # 3 x 30°
    assert torch.equal(run(["identity", "shear_x"], [0.7, 0.0], [1.0, 1.0]), x)
    right_then_turn = run(["translate_x", "rotate"], [1 / (0.3 * 8), 3.0], [1.0, 1.0])
    expected = torch.rot90(translate(x, torch.tensor([0, 0]), torch.tensor([1, 1]), fill), -1, (-2, -1))
    assert torch.equal(right_then_turn, expected)


def test_photometric_ops_on_standardised_values() -> None:
    x = torch.tensor([0.0, 1.0, 2.0, 10.0]).reshape(1, 1, 2, 2)
    lo, hi = torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 10.0)
    m = torch.zeros(1, 1, 1, 1)
    equalized = PHOTOMETRIC_OPS["equalize"](x, m, lo, hi)
    torch.testing.assert_close(equalized.flatten(), torch.tensor([0.0, 10 / 3, 20 / 3, 10.0]))
    assert torch.equal(PHOTOMETRIC_OPS["solarize"](x, m, lo, hi), 10.0 - x)  # threshold lo: all inverted
    coarse = PHOTOMETRIC_OPS["posterize"](x, torch.full((1, 1, 1, 1), 0.99), lo, hi)  # 4 bits: 16 levels
    expected = torch.tensor([0.0, 16.0, 48.0, 240.0]) / 255 * 10
    torch.testing.assert_close(coarse.flatten(), expected)
    torch.testing.assert_close(PHOTOMETRIC_OPS["brightness"](x, m, lo, hi), 0.05 * x)  # factor 0.05
    grey = torch.ones(1, 1, 2, 2)
    assert torch.equal(PHOTOMETRIC_OPS["color"](grey, m, lo, hi), grey)  # no colour to change
    assert torch.equal(PHOTOMETRIC_OPS["equalize"](grey, m, lo, hi), grey)


def test_photometric_ops_match_torchvision_on_uint8_range() -> None:
    """On an image spanning [0, 255] the range-based operations are torchvision's own on uint8:
    posterize keeps the high bits, solarize inverts above the threshold, brightness blends with black."""
    from torchvision.transforms.v2 import functional as TF

    gen = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (1, 1, 6, 6), generator=gen, dtype=torch.uint8)
    img[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)  # the range is [0, 255]
    x = img.float()
    lo, hi = torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 255.0)
    for m, bits in ((0.0, 8), (0.3, 7), (0.99, 4)):
        out = PHOTOMETRIC_OPS["posterize"](x, torch.full((1, 1, 1, 1), m), lo, hi)
        torch.testing.assert_close(out, TF.posterize(img, bits).float())
    bright = PHOTOMETRIC_OPS["brightness"](x, torch.full((1, 1, 1, 1), 0.5), lo, hi)  # factor 0.5
    torch.testing.assert_close(bright, TF.adjust_brightness(img.float() / 255, 0.5) * 255)


# --- the mnist1d primitives against the package (Greydanus 2020) -----------------------------------------

SIGNAL = np.random.default_rng(0).normal(size=40)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))[None, None]


@pytest.mark.parametrize("seed", range(4))
def test_roll_is_mnist1d_translate(seed: int) -> None:
    np.random.seed(seed)
    expected = m1d.translate(SIGNAL, 8)
    np.random.seed(seed)
    k = int(np.random.choice(8))  # the package's draw
    assert np.array_equal(roll(_t(SIGNAL), torch.tensor([k]))[0, 0].numpy(), expected)
    assert np.array_equal(roll(_t(SIGNAL), torch.tensor([-3]))[0, 0].numpy(), np.roll(SIGNAL, -3))


@pytest.mark.parametrize("seed", range(4))
def test_shear_is_mnist1d_shear(seed: int) -> None:
    np.random.seed(seed)
    expected = m1d.shear(SIGNAL, 0.75)
    np.random.seed(seed)
    coeff = 0.75 * (np.random.rand() - 0.5)
    np.testing.assert_allclose(shear(_t(SIGNAL), torch.tensor([coeff]))[0, 0].numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_gaussian_filter_is_mnist1d_corr_noise(seed: int) -> None:
    """scipy's 'reflect' boundary is matched exactly, edges included."""
    np.random.seed(seed)
    expected = m1d.corr_noise_like(SIGNAL, 0.25)
    np.random.seed(seed)
    noise = 0.25 * np.random.randn(40)
    np.testing.assert_allclose(gaussian_filter1d(_t(noise), 2.0)[0, 0].numpy(), expected, atol=1e-12)


def test_gaussian_filter_matches_scipy_when_the_kernel_outgrows_the_signal() -> None:
    short = SIGNAL[:5]  # radius 8 > 5 steps: the reflection wraps more than once
    for sigma in (0.5, 2.0, 3.0):
        np.testing.assert_allclose(
            gaussian_filter1d(_t(short), sigma)[0, 0].numpy(),
            scipy.ndimage.gaussian_filter1d(short, sigma),
            atol=1e-12,
        )


def test_signal_strong_strengths_are_the_packages() -> None:
    """Each mnist1d transformation alone, at the package's default strength."""
    x = _batch(MNIST1D, n=512)
    off = {
        "max_shift": 0,
        "scale_coeff": 0.0,
        "corr_noise_scale": 0.0,
        "iid_noise_scale": 0.0,
        "shear_scale": 0.0,
    }
    iid = _make("signal_strong", MNIST1D, **{**off, "iid_noise_scale": 0.02})(x, _gen(8)) - x
    assert abs(iid.std().item() - 0.02) < 0.001
    corr = _make("signal_strong", MNIST1D, **{**off, "corr_noise_scale": 0.25})(x, _gen(8)) - x
    taps = np.exp(-0.5 * (np.arange(-8, 9) / 2.0) ** 2)
    expected = 0.25 * np.sqrt(((taps / taps.sum()) ** 2).sum())  # white noise through the filter
    assert abs(corr.std().item() / expected - 1) < 0.1
    trend = _make("signal_strong", MNIST1D, **{**off, "shear_scale": 0.75})(x, _gen(8)) - x
    slope = (trend[:, 0] - trend[:, -1]).double()  # coeff * (0.5 - (-0.5))
    ramp = torch.linspace(-0.5, 0.5, 40, dtype=torch.float64)
    torch.testing.assert_close(trend.double(), -slope[:, None] * ramp, atol=1e-5, rtol=0)
    assert slope.abs().max() <= 0.375 and slope.abs().max() > 0.3
    scaled = _make("signal_weak", MNIST1D, max_shift=0)(x, _gen(8)) / x
    factor = scaled[:, :1]
    torch.testing.assert_close(scaled, factor.expand_as(scaled))
    assert ((factor >= 0.95) & (factor <= 1.05)).all()


def test_signal_shifts_are_circular_and_bounded() -> None:
    x = _batch(MNIST1D)
    out = _make("signal_weak", MNIST1D, scale_coeff=0.0)(x, _gen(9))
    shifts = [next(k for k in range(-4, 5) if torch.equal(out[i], x[i].roll(k))) for i in range(N)]
    assert len(set(shifts)) > 3


# --- refusing data of another modality --------------------------------------------------------------------


def test_check_refuses_another_modality_naming_the_choices() -> None:
    message = AUGMENTATIONS.get("signal_weak").check(DIGITS)
    assert "'signal_weak'" in message and "'digits'" in message and "'image'" in message
    assert message.endswith(": " + ", ".join(choices_for("image")))
    assert choices_for("image") == ["flip_shift", "none", "randaugment", "shift"]
    message = AUGMENTATIONS.get("randaugment").check(MNIST1D)
    assert "'randaugment'" in message and "'mnist1d'" in message
    assert message.endswith(": none, signal_strong, signal_weak")
    with pytest.raises(ValueError, match="augmentation 'flip_shift' works on image data"):
        AUGMENTATIONS.get("flip_shift")(MNIST1D)
    assert (
        AUGMENTATIONS.get("none").check(MNIST1D) is None and AUGMENTATIONS.get("none").check(DIGITS) is None
    )


def test_check_refuses_a_view_that_does_not_fit() -> None:
    flat = dataclasses.replace(DIGITS, view=None)  # 64 values are no (C,H,W) image
    assert "view (64,) is not a (C,H,W) shape" in AUGMENTATIONS.get("shift").check(flat)
    wrong = dataclasses.replace(DIGITS, view=(1, 7, 7))
    assert "is not a (C,H,W) shape of that size" in AUGMENTATIONS.get("randaugment").check(wrong)


def test_a_batch_of_another_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"expects a batch of shape \(N, 64\) for dataset 'digits'"):
        _make("shift", DIGITS)(torch.zeros(2, 8, 8), _gen(0))


def test_options_are_checked_and_every_plugin_is_described() -> None:
    assert check_options(AUGMENTATIONS, "flip_shift", {}) == {"flip": True, "max_shift": 0.125}
    assert check_options(AUGMENTATIONS, "signal_strong", {})["iid_noise_scale"] == 0.02
    with pytest.raises(ValueError, match="unknown option 'flip'"):
        check_options(AUGMENTATIONS, "shift", {"flip": False})
    with pytest.raises(ValueError, match="option 'cutout'"):
        check_options(AUGMENTATIONS, "randaugment", {"cutout": 1.5})
    listed = entries(AUGMENTATIONS)
    assert len({e.summary for e in listed}) == len(listed)  # one description per plug-in, not per file
    assert all(e.paper for e in listed if e.name != "none")
