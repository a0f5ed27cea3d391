"""TACLE (`clients.semisup.tacle`): the task-adaptive threshold (eq. 3), the class-aware weights, the
task-restricted weighted unlabeled loss on a hand-computed case, and local training in a class-incremental
task (task 1, task 0's classes seen) with LwF: finite, seeded, pseudo-labels among the task's classes."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from clients.local import ClientData, LocalContext, train_local
from clients.semisup import PSEUDO_LABELS
from clients.semisup.tacle import (
    TACLEOptions,
    class_weights,
    confident_counts,
    tacle_loss,
    task_threshold,
)
from fedtail import protocol as P
from fedtail.config import ConfigError, build_config
from fedtail.models import array_to_numpy, build_model
from fedtail.protocol import Job

# --- the math -----------------------------------------------------------------------------------------------


def test_task_threshold_falls_from_alpha_half_plus_beta_towards_beta() -> None:
    """Eq. 3, gamma_t = alpha / (1 + e^(alpha t)) + beta, 0-based t: the code's 0.9 at the first task."""
    assert task_threshold(0, 0.5, 0.65) == pytest.approx(0.9)
    assert task_threshold(1, 0.5, 0.65) == pytest.approx(0.5 / (1 + math.exp(0.5)) + 0.65)
    assert task_threshold(2, 0.5, 0.65) == pytest.approx(0.5 / (1 + math.e) + 0.65)
    schedule = [task_threshold(t, 0.5, 0.65) for t in range(10)]
    assert all(a > b for a, b in zip(schedule, schedule[1:], strict=False)) and schedule[-1] > 0.65


def test_class_weights_favour_the_class_with_fewest_confident_pseudo_labels() -> None:
    """Counts (9, 4, 0) + 1 = h (10, 5, 1): the code's 1 + min h / h, the paper's 2 - h / max h."""
    counts = torch.tensor([9, 4, 0])
    torch.testing.assert_close(class_weights(counts, "balanced"), torch.tensor([1.1, 1.2, 2.0]).double())
    torch.testing.assert_close(class_weights(counts, "linear"), torch.tensor([1.0, 1.5, 1.9]).double())
    assert class_weights(counts, "none").tolist() == [1.0, 1.0, 1.0]
    even = torch.tensor([3, 3])  # nothing to favour: every class alike
    assert class_weights(even, "balanced").tolist() == [2.0, 2.0]
    assert class_weights(even, "linear").tolist() == [1.0, 1.0]


def test_unlabeled_loss_is_restricted_to_the_task_classes_and_weighted() -> None:
    """Task classes (2, 3) of 4: the pseudo-label is the argmax over the task's softmax only (sample 0's
    old class 0 is ignored), used above gamma strictly, its CE over the task's logits times wbar, over
    the whole batch; the old classes' logits get no gradient."""
    classes = torch.tensor([2, 3])
    weak = torch.tensor([[5.0, 0.0, 0.0, 3.0], [0.0, 0.0, 1.0, 1.5]])
    strong = torch.tensor([[0.0, 0.0, 1.0, 2.0], [4.0, 0.0, 2.0, 0.0]], requires_grad=True)
    weights = torch.tensor([1.2, 1.5])
    threshold = 0.9  # sample 0: e^3 / (1 + e^3) = 0.953 passes; sample 1: 0.622 does not
    loss, labels, weight, local = tacle_loss(weak, strong, classes, threshold, weights)
    assert labels.tolist() == [3, 3] and local.tolist() == [1, 1]
    assert weight.tolist() == pytest.approx([1.5, 0.0])
    ce = -math.log(math.exp(2) / (math.exp(1) + math.exp(2)))
    assert loss.item() == pytest.approx(1.5 * ce / 2)
    loss.backward()
    assert strong.grad[:, :2].abs().sum().item() == 0.0 and strong.grad[0, 2:].abs().sum().item() > 0
    at_threshold = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # 0.5 confidence, threshold 0.5: not above it
    _, _, none, _ = tacle_loss(at_threshold, at_threshold, classes, 0.5, weights)
    assert none.tolist() == [0.0]


def test_confident_counts_are_per_task_class_and_leave_the_training_mode() -> None:
    model = torch.nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[9.0, 9.0], [0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]))
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.3, 0.2]])  # 2, 2, 3, unsure
    model.train()
    counts = confident_counts(model, x, torch.tensor([2, 3]), 0.9)
    assert counts.tolist() == [2, 1] and model.training


def test_options_refuse_a_first_threshold_of_one() -> None:
    with pytest.raises(ValueError, match="first task's threshold"):
        TACLEOptions(alpha=1.0, beta=0.5)
    with pytest.raises(ConfigError, match="first task's threshold") as refused:
        build_config(
            {
                "semisup": {"method": "tacle", "options": {"alpha": 0.4, "beta": 0.8}},
                "partition": {"labeled_fraction": 0.5},
            }
        )
    assert "option ''" not in str(refused.value) and "Value error" not in str(refused.value)


# --- local training, class-incremental ---------------------------------------------------------------------

TASK_CLASSES, OLD_CLASSES = [2, 3], [0, 1]
ROUNDS_PER_TASK = 5  # warm-up: the first floor(0.2 * 5) = 1 round of each task


def _context(task_round: int, **options) -> tuple[LocalContext, ClientData]:
    """A digits-shaped client (64 inputs, 10 classes) in task 1 of 2-class tasks, task 0's classes seen,
    with LwF: 16 labeled and 48 unlabeled samples of the task's classes."""
    cfg = build_config(
        {
            "semisup": {"method": "tacle", "options": options},
            "partition": {"labeled_fraction": 0.5},
            "tasks": {"classes_per_task": 2},
            "federation": {"rounds_per_task": ROUNDS_PER_TASK},
            "continual": {"method": "lwf"},
            "train": {"epochs": 2, "batch_size": 8},
        }
    )
    rng = np.random.default_rng(0)
    y = np.array(TASK_CLASSES * 32)
    x = (rng.normal(size=(len(y), 64)) + y[:, None] * 0.5).astype(np.float32)
    data = ClientData(
        x=x[:16],
        y=y[:16],
        x_unlabeled=x[16:],
        y_hidden=y[16:],
        index=np.arange(16),
        index_unlabeled=np.arange(16, len(y)),
    )
    model = build_model("mlp", (64,), 10, 16, 0)
    received, previous = copy.deepcopy(model), build_model("mlp", (64,), 10, 16, 1)
    task = 1
    ctx = LocalContext(
        job=Job(cfg, Path("."), Path(".")),
        partition_id=0,
        task=task,
        global_round=task * cfg.task_rounds + task_round,
        task_classes=TASK_CLASSES,
        seen_classes=OLD_CLASSES + TASK_CLASSES,
        class_prior=np.full(10, 0.1),
        class_counts=data.class_counts(10),
        model=model,
        global_model_fn=lambda: received,
        previous_model_fn=lambda: previous,
        state=RecordDict(),
        device=torch.device("cpu"),
        data=data,
        sample_index=np.arange(16),
        unlabeled_index=np.arange(48),
        message=RecordDict({P.CONFIG: ConfigRecord()}),
    )
    return ctx, data


def _train(task_round: int, **options) -> tuple[LocalContext, float, dict[str, np.ndarray]]:
    ctx, data = _context(task_round, **options)
    loss, _ = train_local(ctx, data.x, data.y)
    counts = {k: array_to_numpy(v) for k, v in ctx.reply[PSEUDO_LABELS].items()}
    return ctx, loss, counts


def _params(ctx: LocalContext) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ctx.model.parameters()]


def test_tacle_trains_a_class_incremental_task_seeded_with_task_class_pseudo_labels() -> None:
    """Round 3 of task 1 (threshold 0.839): a low beta so that pseudo-labels pass on random features."""
    first, loss, counts = _train(3, beta=0.3)
    again, loss2, counts2 = _train(3, beta=0.3)
    assert math.isfinite(loss) and loss == loss2
    assert all(torch.equal(a, b) for a, b in zip(_params(first), _params(again), strict=True))
    assert all(np.array_equal(counts[k], counts2[k]) for k in counts)
    others = [c for c in range(10) if c not in TASK_CLASSES]
    assert counts["predicted"][TASK_CLASSES].sum() > 0 and counts["predicted"][others].sum() == 0
    assert counts["seen"].sum() == 2 * math.ceil(16 / 8) * 48  # mu B = 56 capped at the 48 samples
    assert not first.state  # nothing kept between rounds: resume repeats the round exactly
    silent, _, _ = _train(3, beta=0.3, lambda_u=0.0)
    assert any(not torch.equal(a, b) for a, b in zip(_params(first), _params(silent), strict=True))


def test_the_first_rounds_of_a_task_warm_up_on_the_labeled_loss_alone() -> None:
    """Round 1 of 5 with warmup_fraction 0.2: the same model as lambda_u = 0, no pseudo-label used."""
    warm, _, counts = _train(1, beta=0.3)
    silent, _, _ = _train(1, beta=0.3, lambda_u=0.0, warmup_fraction=0.0)
    assert counts["used_true"].sum() == 0
    for a, b in zip(_params(warm), _params(silent), strict=True):
        torch.testing.assert_close(a, b)
