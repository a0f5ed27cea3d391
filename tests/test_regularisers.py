"""EWC and LwF: their defining math on small cases, their state across tasks, and that they act."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from clients.continual.ewc import EWC, empirical_fisher, ewc_penalty
from clients.continual.lwf import LwF, distillation_loss
from clients.local import ClientData
from fedtail.config import build_config
from fedtail.models import build_model
from tests.conftest import local_context


def _data(per_class: dict[int, int], dim: int = 4) -> ClientData:
    rng = np.random.default_rng(0)
    y = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in per_class.items()])
    x = (rng.normal(size=(y.size, dim)) + y[:, None]).astype(np.float32)
    return ClientData(x=x, y=y, x_unlabeled=np.zeros((0, dim), dtype=np.float32))


def _ctx(method: str, data: ClientData, task_classes, seen, previous, **options):
    cfg = build_config({"continual": {"method": method, "options": options}})
    model = copy.deepcopy(previous)
    for p in model.parameters():  # the model being trained has moved away from the teacher
        p.data += 0.1
    return local_context(
        cfg,
        model,
        data=data,
        task_classes=task_classes,
        seen_classes=seen,
        task=1,
        previous_model_fn=lambda: copy.deepcopy(previous),
    )


def test_empirical_fisher_is_the_mean_squared_per_sample_gradient() -> None:
    model = build_model("mlp", (3,), 4, 5, 0)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    want = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(7):  # one backward per sample, by hand
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            want[k] += p.grad.pow(2) / 7
    got = empirical_fisher(model, x, y, batch_size=3)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-8)


def test_fisher_over_the_seen_classes_leaves_the_unseen_rows_free() -> None:
    model = build_model("mlp", (3,), 4, 5, 0)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    fisher = empirical_fisher(model, x, y, [0, 1])
    assert fisher["classifier.weight"][2:].abs().sum() == 0 and fisher["classifier.bias"][2:].abs().sum() == 0
    assert fisher["classifier.weight"][:2].abs().sum() > 0
    logits = model(x)[:, :2]  # the same as a two-class model's log-likelihood
    model.zero_grad()
    F.cross_entropy(logits[:1], y[:1]).backward()
    g = model.classifier.weight.grad
    torch.testing.assert_close(empirical_fisher(model, x[:1], y[:1], [0, 1])["classifier.weight"], g.pow(2))


def test_one_combined_penalty_has_the_gradient_of_one_penalty_per_task() -> None:
    model = build_model("mlp", (3,), 4, 5, 0)
    names = [k for k, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(1)
    fishers = [{k: torch.rand(p.shape, generator=gen) for k, p in model.named_parameters()} for _ in range(3)]
    stars = [{k: torch.randn(p.shape, generator=gen) for k, p in model.named_parameters()} for _ in range(3)]
    model.zero_grad()
    sum(ewc_penalty(model, f, s, 10.0) for f, s in zip(fishers, stars, strict=True)).backward()
    per_task = {k: p.grad.clone() for k, p in model.named_parameters()}
    total = {k: sum(f[k] for f in fishers) for k in names}
    anchor = {k: sum(f[k] * s[k] for f, s in zip(fishers, stars, strict=True)) / total[k] for k in names}
    model.zero_grad()
    ewc_penalty(model, total, anchor, 10.0).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, per_task[k], rtol=1e-4, atol=1e-6)


def test_ewc_consolidates_old_classes_once_and_accumulates_over_tasks() -> None:
    data = _data({0: 10, 1: 10, 2: 10, 3: 10, 4: 10, 5: 10})
    teacher = build_model("mlp", (4,), 10, 8, 0)
    ctx = _ctx("ewc", data, [2, 3], [0, 1, 2, 3], teacher)
    first = EWC(ctx)
    x, y = data.for_classes([0, 1])
    want = empirical_fisher(teacher, torch.from_numpy(x), torch.from_numpy(y), [0, 1])
    for k in want:
        torch.testing.assert_close(first.fisher[k], want[k])
        star = dict(teacher.named_parameters())[k].detach()
        torch.testing.assert_close(first.anchor[k][want[k] > 0], star[want[k] > 0])
    assert EWC(ctx).fisher.keys() == first.fisher.keys()  # a later round reads the state: same values
    again = EWC(ctx)
    for k in want:
        torch.testing.assert_close(again.fisher[k], first.fisher[k])
    later = _ctx("ewc", data, [4, 5], [0, 1, 2, 3, 4, 5], teacher)
    later.state = ctx.state
    x2, y2 = data.for_classes([2, 3])
    add = empirical_fisher(teacher, torch.from_numpy(x2), torch.from_numpy(y2), [0, 1, 2, 3])
    third = EWC(later)
    for k in want:
        torch.testing.assert_close(third.fisher[k], want[k] + add[k])
    assert third.extra_loss(torch.zeros(1, 10), torch.zeros(1), torch.zeros(1, 4)) > 0
    samples, nbytes = EWC.memory_footprint(later)
    assert samples == 0 and nbytes == 2 * sum(p.numel() * 4 for p in teacher.parameters())


def test_ewc_does_nothing_in_the_first_task() -> None:
    data = _data({0: 10, 1: 10})
    teacher = build_model("mlp", (4,), 10, 8, 0)
    ctx = _ctx("ewc", data, [0, 1], [0, 1], teacher)
    assert EWC(ctx).extra_loss(torch.zeros(1, 10), torch.zeros(1), torch.zeros(1, 4)) is None


def test_lwf_distils_the_old_classes_with_tempered_softmax() -> None:
    student = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    t = 2.0
    p = np.exp(teacher.numpy() / t) / np.exp(teacher.numpy() / t).sum(1, keepdims=True)
    q = np.exp(student.numpy() / t) / np.exp(student.numpy() / t).sum(1, keepdims=True)
    want = float(-(p * np.log(q)).sum(1).mean())
    assert distillation_loss(student, teacher, t).item() == pytest.approx(want, rel=1e-6)
    assert distillation_loss(teacher, teacher, t) < distillation_loss(student, teacher, t)


def test_lwf_term_uses_the_previous_models_old_class_logits() -> None:
    data = _data({0: 4, 1: 4, 2: 4, 3: 4})
    teacher = build_model("mlp", (4,), 10, 8, 0)
    ctx = _ctx("lwf", data, [2, 3], [0, 1, 2, 3], teacher, lam=0.5, temperature=3.0)
    x = torch.from_numpy(data.x[:5])
    logits = ctx.model(x)
    got = LwF(ctx).extra_loss(logits, torch.zeros(5), x)
    want = 0.5 * distillation_loss(logits[:, [0, 1]], teacher(x)[:, [0, 1]], 3.0)
    torch.testing.assert_close(got, want)
    first = _ctx("lwf", data, [0, 1], [0, 1], teacher)
    assert LwF(first).extra_loss(logits, torch.zeros(5), x) is None


def test_ewc_caps_the_stiffness_at_what_sgd_can_follow() -> None:
    """lr * lam * F above 2 (1 + momentum) diverges; the penalty's stiffness stops at half of that."""
    data = _data({0: 10, 1: 10, 2: 10, 3: 10})
    teacher = build_model("mlp", (4,), 10, 8, 0)
    ctx = _ctx("ewc", data, [2, 3], [0, 1, 2, 3], teacher, lam=1e6)
    method = EWC(ctx)
    t = ctx.job.config.train
    cap = (1 + t.momentum) / (t.lr * 1e6)
    x, y = data.for_classes([0, 1])
    raw = empirical_fisher(teacher, torch.from_numpy(x), torch.from_numpy(y), [0, 1])
    for k in raw:
        torch.testing.assert_close(method.fisher[k], raw[k].clamp(max=cap))
        assert (raw[k] > cap).any() or k.endswith("bias")
        star = dict(teacher.named_parameters())[k].detach()
        torch.testing.assert_close(method.anchor[k][raw[k] > 0], star[raw[k] > 0])  # anchors unchanged
