"""DER++: reservoir sampling, the stored logits and labels, and the two replay terms of eq. 6."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from clients.continual.derpp import DERpp, reservoir_slots
from clients.continual.memory import Memory
from clients.local import ClientData
from fedtail.config import build_config
from fedtail.models import build_model
from tests.conftest import local_context


def test_reservoir_fills_then_keeps_each_item_with_probability_size_over_n() -> None:
    rng = np.random.default_rng(0)
    assert reservoir_slots(0, 4, 6, rng).tolist() == [0, 1, 2, 3]
    size, n, trials = 5, 20, 4000
    kept = np.zeros(n)
    for _ in range(trials):
        buffer = np.full(size, -1)
        for start in range(0, n, 3):  # batches of 3, as steps deliver them
            batch = np.arange(start, min(start + 3, n))
            for item, slot in zip(batch, reservoir_slots(start, batch.size, size, rng), strict=True):
                if slot >= 0:
                    buffer[slot] = item
        kept[buffer] += 1
    np.testing.assert_allclose(kept / trials, size / n, atol=0.03)  # uniform over the stream


def _ctx(memory: Memory | None = None):
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 6)
    data = ClientData(rng.normal(size=(24, 4)).astype(np.float32), y, np.zeros((0, 4), np.float32))
    cfg = build_config({"continual": {"method": "derpp", "options": {"memory_size": 10, "alpha": 0.3}}})
    ctx = local_context(
        cfg,
        build_model("mlp", (4,), 10, 8, 0),
        data=data,
        task=1,
        task_classes=[2, 3],
        seen_classes=[0, 1, 2, 3],
    )
    if memory is not None:
        memory.save(ctx.state)
    return ctx, data


def test_after_step_stores_the_samples_with_their_logits_and_labels() -> None:
    ctx, data = _ctx()
    method = DERpp(ctx)
    x, y = data.for_classes([2, 3])
    method.training_data(torch.from_numpy(x), torch.from_numpy(y))
    logits = torch.randn(4, 10)
    index = torch.tensor([0, 5, 7, 11])  # positions in the task's samples
    method.after_step(logits, torch.from_numpy(y[[0, 5, 7, 11]]), index)
    method.end_round()
    memory = Memory.load(ctx.state)
    want = np.flatnonzero(np.isin(data.y, [2, 3]))[[0, 5, 7, 11]]
    assert memory.indices.tolist() == want.tolist()
    assert memory.labels.tolist() == data.y[want].tolist()
    np.testing.assert_array_equal(memory.logits, logits.numpy())
    assert DERpp.memory_footprint(ctx) == (4, 4 * (16 + 8) + 4 * 10 * 4)


def test_the_replay_terms_are_logit_matching_and_label_ce_on_two_buffer_batches() -> None:
    stored = np.random.default_rng(2).normal(size=(6, 10)).astype(np.float32)
    memory = Memory(np.array([0, 1, 6, 7, 12, 13]), np.array([0, 0, 1, 1, 2, 2]), stored)
    ctx, data = _ctx(memory)
    method = DERpp(ctx)
    x = torch.from_numpy(data.x[18:21])
    picks = torch.Generator().manual_seed(method.generator.initial_seed())
    first = torch.randint(6, (3,), generator=picks).numpy()
    second = torch.randint(6, (3,), generator=picks).numpy()
    model = ctx.model
    want = 0.3 * F.mse_loss(
        model(torch.from_numpy(data.x[memory.indices[first]])), torch.from_numpy(stored[first])
    )
    want = want + 0.5 * F.cross_entropy(
        model(torch.from_numpy(data.x[memory.indices[second]])), torch.from_numpy(memory.labels[second])
    )
    torch.testing.assert_close(method.extra_loss(model(x), torch.zeros(3), x), want)


def test_an_empty_buffer_adds_nothing() -> None:
    ctx, data = _ctx()
    x = torch.from_numpy(data.x[:3])
    assert DERpp(ctx).extra_loss(ctx.model(x), torch.zeros(3), x) is None


@pytest.mark.parametrize("options", [{"memory_size": 0}, {"alpha": -1.0}, {"gamma": 1.0}])
def test_bad_derpp_options_are_refused(options: dict) -> None:
    from fedtail.config import ConfigError

    with pytest.raises(ConfigError, match="continual.options"):
        build_config({"continual": {"method": "derpp", "options": options}})


def test_the_buffer_keeps_the_round_samples_own_positions() -> None:
    """With blurry boundaries the round's samples are not its classes' samples: the buffer must store
    the positions the client app gave (ctx.sample_index), not recompute them from the task's classes."""
    ctx, data = _ctx()
    ctx.sample_index = np.array([1, 4, 13, 20, 22])  # e.g. classes 0 and 3 leaked into this round
    method = DERpp(ctx)
    x, y = data.x[ctx.sample_index], data.y[ctx.sample_index]
    method.training_data(torch.from_numpy(x), torch.from_numpy(y))
    method.after_step(torch.randn(3, 10), torch.from_numpy(y[[0, 2, 4]]), torch.tensor([0, 2, 4]))
    method.end_round()
    memory = Memory.load(ctx.state)
    assert memory.indices.tolist() == [1, 13, 22]
    assert memory.labels.tolist() == data.y[[1, 13, 22]].tolist()
