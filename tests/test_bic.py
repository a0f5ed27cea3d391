"""BiC: the bias layer of eq. 4, stage 2 solved federatedly to the pooled optimum, the class-balanced
validation split held out of stage 1, and the teacher that includes the previous bias layer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from scipy.optimize import minimize

from clients.continual.bic import (
    BiC,
    bias_correct,
    bias_loss_terms,
    parameters,
    validation_per_class,
)
from clients.local import ClientData
from fedtail.config import build_config
from fedtail.models import build_model
from tests.conftest import local_context


def test_the_bias_layer_rescales_and_shifts_only_the_new_classes() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0]])
    corrected = torch.tensor([False, False, True, True])
    out = bias_correct(logits, corrected, torch.tensor(0.5), torch.tensor(-1.0))
    assert out.tolist() == [[1.0, 2.0, 0.5 * 3.0 - 1.0, 0.5 * -1.0 - 1.0]]


def _pooled_loss(theta: np.ndarray, logits: torch.Tensor, y: torch.Tensor, corrected: torch.Tensor) -> float:
    out = bias_correct(logits.double(), corrected, torch.tensor(theta[0]), torch.tensor(theta[1]))
    return float(torch.nn.functional.cross_entropy(out, y))


def test_newton_exchanges_reach_the_optimum_of_the_pooled_validation_loss() -> None:
    """Two clients, each holding a split of different classes: the server's Newton steps on their summed
    gradients and Hessians reach the (alpha, beta) that one validation set of both splits gives."""
    rng = np.random.default_rng(0)
    corrected = torch.tensor([False, False, True, True])
    splits = []
    for classes in ([0, 2], [1, 3, 2]):
        y = torch.as_tensor(rng.choice(classes, size=12))
        logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(len(classes)))
        logits[:, 2:] += 2.0  # new classes' logits inflated: the bias BiC corrects
        logits[torch.arange(12), y] += 1.5
        splits.append((logits, y))
    n = sum(len(y) for _, y in splits)
    head: dict = {}
    for exchange in range(8):
        alpha, beta = parameters(head) if exchange else (1.0, 0.0)
        terms = [bias_loss_terms(lg, y, corrected, alpha, beta) for lg, y in splits]
        sums = {
            "gradient": sum(t[0] for t in terms),
            "hessian": sum(t[1] for t in terms),
            "loss": np.array([sum(t[2] for t in terms)]),
            "weight": np.array([float(n)]),
        }
        _, head = BiC.head_from_statistics(
            sums, head, exchange, arrays=None, old=[0, 1], new=[2, 3], options=BiC.Options()
        )
    pooled = (torch.cat([lg for lg, _ in splits]), torch.cat([y for _, y in splits]))
    best = minimize(_pooled_loss, x0=[1.0, 0.0], args=(*pooled, corrected), method="BFGS", tol=1e-12).x
    np.testing.assert_allclose(parameters(head), best, atol=1e-5)
    assert head["corrected"].tolist() == [2, 3]
    grad, _, _ = bias_loss_terms(*pooled, corrected, *parameters(head))
    assert np.abs(grad).max() < 1e-6  # a stationary point of the convex pooled loss: its minimum


def test_no_correction_at_the_first_task_or_without_a_split() -> None:
    sums = {"gradient": np.ones(2), "hessian": np.eye(2), "loss": np.zeros(1), "weight": np.array([5.0])}
    assert (
        BiC.head_from_statistics(sums, {}, 0, arrays=None, old=[], new=[0, 1], options=BiC.Options())[1] == {}
    )
    sums["weight"] = np.zeros(1)
    assert (
        BiC.head_from_statistics(sums, {}, 0, arrays=None, old=[0], new=[1], options=BiC.Options())[1] == {}
    )


@pytest.mark.parametrize(("kept", "held"), [(1, 0), (2, 1), (10, 1), (20, 2), (35, 3)])
def test_validation_per_class_is_the_split_ratio_of_each_class_memory(kept: int, held: int) -> None:
    assert validation_per_class(kept, 0.1) == held


def _ctx(**fields):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    data = ClientData(
        (rng.normal(size=(40, 5)) + y[:, None]).astype(np.float32), y, np.zeros((0, 5), np.float32)
    )
    cfg = build_config({"continual": {"method": "bic", "options": {"memory_size": 40}}})
    model = build_model("mlp", (5,), 10, 8, 0)
    previous = build_model("mlp", (5,), 10, 8, 1)
    index = data.positions([2, 3])
    base = dict(
        data=data, task=1, task_classes=[2, 3], seen_classes=[0, 1, 2, 3], sample_index=index,
        previous_model_fn=lambda: copy.deepcopy(previous), state=RecordDict(),
    )  # fmt: skip
    return local_context(cfg, model, **{**base, **fields}), data, index


def test_the_validation_split_is_class_balanced_and_left_out_of_stage_one() -> None:
    ctx, data, index = _ctx()
    method = BiC(ctx)
    x, y = method.training_data(torch.from_numpy(data.x[index]), torch.from_numpy(data.y[index]))
    memory = method.memory
    assert np.bincount(memory.labels).tolist() == [10, 10]  # 40 slots, but only 10 samples a class
    keep, held = method.split(memory)
    per_class = np.bincount(data.y[held], minlength=4)
    assert per_class.tolist() == [2, 2, 2, 2]  # 0.1 of 20 a class (40 / 2 old classes), old and new alike
    assert len(y) == 40 - 8  # every sample of the task and every exemplar, less the split
    np.testing.assert_array_equal(BiC(ctx).split(memory)[1], held)  # the same split every round
    train_rows = {tuple(r) for r in x.numpy().round(6)}
    assert not any(tuple(r) in train_rows for r in data.x[held].round(6))


def test_the_teacher_is_the_previous_model_with_its_bias_layer() -> None:
    head = {"alpha": np.array([0.5]), "beta": np.array([-2.0]), "corrected": np.array([0, 1])}
    ctx, data, _ = _ctx(previous_head=head)
    x = torch.from_numpy(data.x[:6])
    plain = ctx.previous_model(x)
    teacher = BiC(ctx).teacher_logits(x)
    torch.testing.assert_close(teacher[:, :2], 0.5 * plain[:, :2] - 2.0)
    torch.testing.assert_close(teacher[:, 2:], plain[:, 2:])
    model = build_model("mlp", (5,), 10, 8, 2)
    torch.testing.assert_close(BiC.evaluation_logits(model, x, {}), model(x))  # empty head: identity
