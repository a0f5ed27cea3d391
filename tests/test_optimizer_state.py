"""`train.keep_optimizer_state`: a client's optimiser state (SGD momentum, Adam's moments) carries over
from one round of a task to its next, exactly as if one optimiser had stepped through both; it starts
afresh at a new task and is never used unless asked for."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from clients.local import OPTIMIZER_KEY, make_optimizer, step_seed, train_local
from fedtail.config import build_config
from fedtail.models import build_model
from tests.conftest import local_context


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(24, 6)).astype(np.float32), rng.integers(0, 3, size=24)


def _setup(optimizer: str, keep: bool):
    cfg = build_config(
        {
            "dataset": {"name": "digits"},
            "tasks": {"classes_per_task": None},
            "train": {"optimizer": optimizer, "epochs": 1, "batch_size": 8, "keep_optimizer_state": keep},
        }
    )
    model = build_model("mlp", (6,), 10, 8, seed=0)
    return cfg, model


def _round(cfg, model, state: RecordDict, global_round: int, task: int = 0) -> torch.nn.Module:
    ctx = local_context(cfg, model, state=state, global_round=global_round, task=task)
    train_local(ctx, *_data())
    return model


def _by_hand(cfg, start: torch.nn.Module, optimizer_state: dict | None, global_round: int) -> torch.nn.Module:
    """One round of train_local written out: CE over every class, the seeded epoch order."""
    model = copy.deepcopy(start)
    ctx = local_context(cfg, model, global_round=global_round)
    optimizer = make_optimizer(model, ctx.job)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    x, y = (torch.from_numpy(a) for a in _data())
    order = torch.randperm(
        len(y), generator=torch.Generator().manual_seed(step_seed(cfg.seed, 0, global_round, 0))
    )
    model.train()
    for s in range(0, len(order), cfg.train.batch_size):
        b = order[s : s + cfg.train.batch_size]
        loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model, optimizer.state_dict()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_kept_state_continues_one_optimiser_across_rounds(optimizer: str) -> None:
    cfg, model = _setup(optimizer, keep=True)
    start = copy.deepcopy(model)
    state = RecordDict()
    _round(cfg, model, state, global_round=1)
    assert OPTIMIZER_KEY in state
    after_one = copy.deepcopy(model)
    _round(cfg, model, state, global_round=2)

    hand, opt_state = _by_hand(cfg, start, None, 1)
    for a, b in zip(hand.parameters(), after_one.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    hand2, _ = _by_hand(cfg, hand, opt_state, 2)
    for a, b in zip(hand2.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    fresh, _ = _by_hand(cfg, hand, None, 2)  # guards the check above: a fresh optimiser differs
    assert any(not torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))


def test_a_new_task_and_the_default_start_afresh() -> None:
    cfg, model = _setup("sgd", keep=True)
    state = RecordDict()
    _round(cfg, model, state, global_round=1, task=0)
    start = copy.deepcopy(model)
    _round(cfg, model, state, global_round=2, task=1)
    off, twin = _setup("sgd", keep=False)
    twin.load_state_dict(start.state_dict())
    _round(off, twin, RecordDict(), global_round=2, task=1)
    for a, b in zip(twin.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    kept_off = RecordDict()
    _round(off, twin, kept_off, global_round=3, task=1)
    assert OPTIMIZER_KEY not in kept_off
