"""Twin-sight (`clients.semisup.twinsight`): the Gram-matrix constraint, SimCLR's InfoNCE against the
official formulation, FreeMatch's threshold, and the twin as part of the model: built with it, trained by
the same optimizer, sent and averaged with it, never evaluated."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clients.local import train_local
from clients.semisup.twinsight import TWIN, freematch_threshold, gram_loss, info_nce
from fedtail.config import build_config
from fedtail.models import model_for
from tests.test_semisup import _context


def _official_info_nce(features: torch.Tensor, batch_size: int, temperature: float) -> torch.Tensor:
    """Twin-sight's ssl_model/ssl_utils.py info_nce_loss, as published, then its cross-entropy."""
    labels = torch.cat([torch.arange(batch_size) for _ in range(2)], dim=0)
    labels = (labels.unsqueeze(0) == labels.unsqueeze(1)).float()
    features = F.normalize(features, dim=1)
    similarity = features @ features.T
    mask = torch.eye(labels.shape[0], dtype=torch.bool)
    labels = labels[~mask].view(labels.shape[0], -1)
    similarity = similarity[~mask].view(similarity.shape[0], -1)
    positives = similarity[labels.bool()].view(labels.shape[0], -1)
    negatives = similarity[~labels.bool()].view(similarity.shape[0], -1)
    logits = torch.cat([positives, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


def test_info_nce_matches_the_official_loss() -> None:
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(info_nce(z, 0.07), _official_info_nce(z, 4, 0.07))


def test_gram_loss_is_zero_for_the_same_neighbourhoods_and_counts_every_pair() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert gram_loss(z, 3 * z).item() == 0.0  # scale does not change the normalised Gram matrix
    other = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # both samples one neighbourhood: G_01 = 1 vs 0
    assert gram_loss(other, z).item() == pytest.approx(2 * 1.0 / 4)


def test_freematch_threshold_scales_the_global_one_by_the_class_share() -> None:
    p_model = torch.tensor([0.5, 0.25, 0.25])
    out = freematch_threshold(torch.tensor(0.8), p_model, torch.tensor([0, 1, 2]))
    assert out.tolist() == pytest.approx([0.8, 0.4, 0.4])


def test_the_twin_is_part_of_the_model_with_its_own_seed() -> None:
    cfg = build_config({"semisup": {"method": "twinsight"}, "partition": {"labeled_fraction": 0.5}})
    plain = build_config({"partition": {"labeled_fraction": 0.5}})
    model, reference = model_for(cfg, (64,)), model_for(plain, (64,))
    state, plain_state = model.state_dict(), reference.state_dict()
    assert any(k.startswith(f"extra.{TWIN}.projector") for k in state)
    assert {k for k in state if not k.startswith("extra.")} == set(plain_state)
    assert all(torch.equal(state[k], v) for k, v in plain_state.items())  # the same initial model
    x = torch.randn(3, 64)
    torch.testing.assert_close(model(x), reference(x))  # evaluation sees the supervised model only


def test_local_training_trains_both_twins_deterministically() -> None:
    def run() -> tuple[float, dict[str, np.ndarray]]:
        ctx, data = _context("twinsight", 20, 60)
        ctx.model = model_for(ctx.job.config, (64,))
        before = {k: v.numpy().copy() for k, v in ctx.model.state_dict().items()}
        loss, _ = train_local(ctx, data.x, data.y)
        after = {k: v.numpy().copy() for k, v in ctx.model.state_dict().items()}
        twin = [k for k in after if k.startswith(f"extra.{TWIN}.features")]
        assert twin and any(not np.array_equal(before[k], after[k]) for k in twin)
        return loss, after

    loss, first = run()
    loss2, again = run()
    assert math.isfinite(loss) and loss == loss2
    assert all(np.array_equal(first[k], again[k]) for k in first)
