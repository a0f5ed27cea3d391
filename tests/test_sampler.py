"""The local batch stream: shuffle (a permutation) and class-balanced sampling (Kang et al. 2020)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from clients.local import epoch_order
from tests.test_objectives import _tail_recall

Y = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)


def test_shuffle_is_torchs_permutation() -> None:
    """The default stream is what it always was: runs keep their results."""
    got = epoch_order(Y, "shuffle", torch.Generator().manual_seed(4))
    assert torch.equal(got, torch.randperm(len(Y), generator=torch.Generator().manual_seed(4)))


def test_class_balanced_draws_are_torchs_weighted_sampler_with_inverse_class_weights() -> None:
    """P(i) = 1 / (C n_{y_i}): the same draws as torch's WeightedRandomSampler given those weights."""
    weights = 1.0 / torch.bincount(Y)[Y].double()
    sampler = WeightedRandomSampler(
        weights, len(Y), replacement=True, generator=torch.Generator().manual_seed(7)
    )
    got = epoch_order(Y, "class_balanced", torch.Generator().manual_seed(7))
    assert got.tolist() == list(sampler)


def test_class_balanced_stream_is_uniform_over_classes_and_within_each() -> None:
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([epoch_order(Y, "class_balanced", gen) for _ in range(60)])  # 60,000 draws
    share = np.bincount(Y[draws].numpy(), minlength=3) / draws.numel()
    np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.01)
    tail = np.bincount(draws[Y[draws] == 2].numpy() - 990, minlength=10)  # the 10 tail samples
    assert tail.min() > 0.8 * tail.mean() and tail.max() < 1.2 * tail.mean()
    with pytest.raises(ValueError, match="allowed: shuffle, class_balanced"):
        epoch_order(Y, "smote", gen)


def test_class_balanced_sampling_recovers_the_tail_class() -> None:
    assert _tail_recall("ce", sampler="class_balanced") > _tail_recall("ce") + 0.2
