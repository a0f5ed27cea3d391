"""GLFC's local loss against the official code's formulas on small cases, and what it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clients.continual.glfc import GLFC, glfc_loss, gradient_compensation_weights
from clients.local import ClientData
from fedtail.config import ConfigError, build_config
from fedtail.models import build_model
from tests.conftest import local_context


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _bce(z: float, t: float) -> float:
    return -(t * math.log(_sigmoid(z)) + (1 - t) * math.log(1 - _sigmoid(z)))


def test_weights_equalise_the_mean_gradient_of_old_and_new_samples() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 0.5], [1.0, 0.0, 3.0]])
    y = torch.tensor([0, 1, 2, 2])
    old = torch.tensor([True, True, False, False])  # classes 0, 1 old; 2 new
    g = [1 - _sigmoid(2.0), 1 - _sigmoid(-1.0), 1 - _sigmoid(0.5), 1 - _sigmoid(3.0)]
    want = [g[0] / ((g[0] + g[1]) / 2), g[1] / ((g[0] + g[1]) / 2)]
    want += [g[2] / ((g[2] + g[3]) / 2), g[3] / ((g[2] + g[3]) / 2)]
    w = gradient_compensation_weights(logits, y, old)
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-6)
    assert float(w[old].mean()) == pytest.approx(1.0) and float(w[~old].mean()) == pytest.approx(1.0)
    assert gradient_compensation_weights(logits, y, None).tolist() == [1.0] * 4  # first task


def test_the_loss_is_half_compensated_bce_half_relation_distillation() -> None:
    logits = torch.tensor([[0.5, -0.5, 1.0], [-1.0, 2.0, 0.0]])
    y = torch.tensor([2, 1])  # columns: class 0 old, classes 1 and 2 new
    teacher = torch.tensor([[0.3], [-2.0]])  # the previous model's logit of the old class
    w = gradient_compensation_weights(logits, y, torch.tensor([False, False]))
    l_gc = 0.0
    l_rd = 0.0
    for i in range(2):
        for c in range(3):
            onehot = float(y[i] == c)
            l_gc += float(w[i]) * _bce(float(logits[i, c]), onehot)
            target = _sigmoid(float(teacher[i, 0])) if c == 0 else onehot
            l_rd += _bce(float(logits[i, c]), target)
    want = 0.5 * l_gc / 6 + 0.5 * l_rd / 6
    assert float(glfc_loss(logits, y, [0], teacher)) == pytest.approx(want, rel=1e-6)
    first = sum(_bce(float(logits[i, c]), float(y[i] == c)) for i in range(2) for c in range(3)) / 6
    assert float(glfc_loss(logits, y, [], None)) == pytest.approx(first, rel=1e-6)


def test_the_method_scores_the_seen_classes_and_replaces_the_objective() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 5)
    data = ClientData(rng.normal(size=(20, 4)).astype(np.float32), y, np.zeros((0, 4), np.float32))
    cfg = build_config({"continual": {"method": "glfc", "options": {"memory_size": 10}}})
    teacher = build_model("mlp", (4,), 10, 8, 1)
    ctx = local_context(
        cfg, build_model("mlp", (4,), 10, 8, 0), data=data, task=1, task_classes=[2, 3],
        seen_classes=[0, 1, 2, 3], sample_index=data.positions([2, 3]), previous_model_fn=lambda: teacher,
    )  # fmt: skip
    method = GLFC(ctx)
    assert method.objective_weight() == 0.0 and method.lr_scale() == 4.0  # the 4 seen classes
    x, labels = torch.from_numpy(data.x[:8]), torch.from_numpy(y[:8])
    logits = torch.randn(8, 10)
    with torch.no_grad():
        want = glfc_loss(logits[:, :4], labels, [0, 1], teacher(x)[:, :2])
    assert float(method.extra_loss(logits, labels, x)) == pytest.approx(float(want), rel=1e-6)


def test_glfc_refuses_another_objective() -> None:
    with pytest.raises(ConfigError, match="train.objective='focal'.*allowed: ce"):
        build_config({"continual": {"method": "glfc"}, "train": {"objective": "focal"}})


def test_glfc_refuses_synthetic_oversampling() -> None:
    with pytest.raises(ConfigError, match="train.oversample='smote'.*allowed: none"):
        build_config({"continual": {"method": "glfc"}, "train": {"oversample": "smote"}})


def test_lr_scale_can_be_set_as_the_paper_sets_it() -> None:
    cfg = build_config({"continual": {"method": "glfc", "options": {"memory_size": 10, "lr_scale": 20.0}}})
    data = ClientData(np.zeros((4, 4), np.float32), np.arange(4), np.zeros((0, 4), np.float32))
    ctx = local_context(cfg, build_model("mlp", (4,), 10, 8, 0), data=data, seen_classes=[0, 1])
    assert GLFC(ctx).lr_scale() == 20.0


def test_a_group_fit_to_float_precision_gets_weight_one_not_nan() -> None:
    """Logits above ~17 make ``1 - sigmoid`` exactly 0 in float32: the official mean-normalisation divides
    0 by 0, and the NaN ended a run that had fit its first task (issue 18)."""
    logits = torch.tensor([[40.0, -40.0], [40.0, -40.0], [0.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    old = torch.tensor([True, True, False, False])
    w = gradient_compensation_weights(logits, y, old)
    assert torch.isfinite(w).all()
    assert w[:2].tolist() == [1.0, 1.0]
    g = 1.0 - torch.sigmoid(torch.tensor([0.0, 1.0]))
    assert torch.allclose(w[2:], g / g.mean())
    assert torch.isfinite(glfc_loss(logits, y, [0], torch.zeros(4, 1)))
