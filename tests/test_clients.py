"""Client side without a federation: the local objective's math, seeded local training, the ClientApp
error path through the in-process Grid, model shapes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from clients.continual.finetune import Finetune
from clients.local import LocalContext, step_seed, train_local
from clients.objectives.ce import CrossEntropy
from fedtail.config import build_config
from fedtail.engines.inprocess import InProcessGrid, set_server_identity
from fedtail.models import build_model
from fedtail.protocol import Job


def _ctx(model: torch.nn.Module, **train) -> LocalContext:
    cfg = build_config({"train": {"epochs": 3, "batch_size": 8, "lr": 0.01, **train}})
    frozen = copy.deepcopy(model)
    return LocalContext(
        job=Job(cfg, Path("."), Path(".")),
        partition_id=0,
        task=0,
        global_round=1,
        task_classes=[0, 1],
        seen_classes=[0, 1],
        class_prior=np.full(10, 0.1),
        class_counts=np.zeros(10, dtype=np.int64),
        model=model,
        global_model_fn=lambda: frozen,
        state=RecordDict(),
        device=torch.device("cpu"),
    )


def _toy(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 64)).astype(np.float32) + 2.0 * y[:, None]
    return x.astype(np.float32), y.astype(np.int64)


def test_cross_entropy_is_mean_negative_log_softmax() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    y = torch.tensor([0, 2])
    expected = -(torch.log_softmax(logits, 1)[[0, 1], [0, 2]]).mean()
    loss = CrossEntropy(_ctx(build_model("mlp", (64,), 10, 8, 0))).loss(logits, y, torch.zeros(2, 1))
    assert float(loss) == pytest.approx(float(expected))
    by_hand = np.mean(
        [
            -np.log(np.exp(2) / (np.exp(2) + 1 + np.exp(-1))),
            -np.log(np.exp(3) / (2 * np.exp(0.5) + np.exp(3))),
        ]
    )
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)


def test_finetune_changes_nothing() -> None:
    method = Finetune(_ctx(build_model("mlp", (64,), 10, 8, 0)))
    x, y = torch.ones(3, 64), torch.tensor([0, 1, 0])
    assert method.training_data(x, y) == (x, y)
    assert method.extra_loss(torch.zeros(3, 10), y, x) is None


def test_local_training_is_seeded_and_learns() -> None:
    x, y = _toy()
    runs = []
    for _ in range(2):
        ctx = _ctx(build_model("mlp", (64,), 10, 16, 0))
        loss, n = train_local(ctx, x, y)
        runs.append((loss, [p.detach().clone() for p in ctx.model.parameters()]))
        assert n == len(y)
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    assert runs[0][0] < np.log(10)  # better than the uniform guess it starts from


def test_step_seed_is_stable_and_distinct() -> None:
    assert step_seed(0, 1, 2, 3) == step_seed(0, 1, 2, 3)
    assert len({step_seed(0, t, r, c) for t in range(3) for r in range(3) for c in range(3)}) == 27


def test_no_samples_means_no_update() -> None:
    ctx = _ctx(build_model("mlp", (64,), 10, 8, 0))
    before = [p.detach().clone() for p in ctx.model.parameters()]
    assert train_local(ctx, np.zeros((0, 64), np.float32), np.zeros(0, np.int64)) == (0.0, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.model.parameters(), strict=True))


failing_app = ClientApp()


@failing_app.train()
def _boom(msg: Message, context) -> Message:
    raise RuntimeError("client exploded")


def test_inprocess_grid_turns_client_exceptions_into_error_replies() -> None:
    set_server_identity()
    grid = InProcessGrid("tests.test_clients:failing_app", num_nodes=2)
    msgs = [
        Message(RecordDict({"config": ConfigRecord({"a": 1})}), dst_node_id=n, message_type=MessageType.TRAIN)
        for n in grid.get_node_ids()
    ]
    replies = list(grid.send_and_receive(msgs))
    assert len(replies) == 2
    assert all(r.has_error() and "client exploded" in r.error.reason for r in replies)
    assert {r.metadata.src_node_id for r in replies} == set(grid.get_node_ids())
