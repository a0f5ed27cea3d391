"""Evaluation-time adjustments: post-hoc logit adjustment (Menon 2021) and tau-normalisation (Kang 2020),
their math on small cases, and the evaluator scoring them beside the plain model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtail.config import ConfigError, build_config
from fedtail.datasets.base import Splits
from fedtail.metrics import classification_metrics
from fedtail.models import build_model, to_arrays
from fedtail.registry import ADJUSTMENTS
from server.evaluation import Evaluator

COUNTS = np.array([80, 15, 5])


def test_posthoc_logit_adjustment_subtracts_tau_log_prior() -> None:
    """Menon et al. 2021, eq. 6: argmax_y f_y(x) - tau log pi_y."""
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 0.2, 0.1]])
    prior = COUNTS / COUNTS.sum()
    for tau in (1.0, 0.5, 0.0):
        adjusted = ADJUSTMENTS.get("posthoc_la")({"tau": tau}, COUNTS).logits(logits)
        np.testing.assert_allclose(adjusted.numpy(), logits.numpy() - tau * np.log(prior), rtol=1e-6)
    # the head class's win on the first sample flips to the tail class once the prior is taken out
    assert ADJUSTMENTS.get("posthoc_la")({}, COUNTS).logits(logits).argmax(1).tolist() == [2, 2]


def test_tau_normalisation_divides_each_class_weight_by_its_norm_to_the_tau() -> None:
    """Kang et al. 2020: w_j / ||w_j||^tau; the given model is left as it was."""
    model = build_model("mlp", (4,), 3, 8, seed=0)
    with torch.no_grad():
        model.classifier.weight.mul_(torch.tensor([[5.0], [1.0], [0.2]]))
    before = model.classifier.weight.detach().clone()
    norms = before.norm(dim=1)
    for tau in (1.0, 0.5, 0.0):
        adjusted = ADJUSTMENTS.get("tau_norm")({"tau": tau}, COUNTS).model(model)
        torch.testing.assert_close(adjusted.classifier.weight, before / norms[:, None] ** tau)
        torch.testing.assert_close(adjusted.classifier.bias, model.classifier.bias)
    torch.testing.assert_close(model.classifier.weight, before)
    unit = ADJUSTMENTS.get("tau_norm")({}, COUNTS).model(model).classifier.weight.norm(dim=1)
    torch.testing.assert_close(unit, torch.ones(3))


def test_adjustment_config_is_checked_before_work() -> None:
    with pytest.raises(ConfigError, match="known: none, posthoc_la, tau_norm"):
        build_config({"evaluation": {"adjustment": "bias_fix"}})
    with pytest.raises(ConfigError, match="tau"):
        build_config({"evaluation": {"adjustment": "posthoc_la", "options": {"tau": -1.0}}})
    with pytest.raises(ConfigError, match="model.classifier=linear"):
        build_config({"evaluation": {"adjustment": "tau_norm"}, "model": {"classifier": "cosine"}})


def test_evaluator_scores_the_adjusted_model_beside_the_plain_one() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    model = build_model("mlp", (4,), 3, 8, seed=1)
    arrays = to_arrays(model)
    plain = Evaluator(model, Splits(x, y, x, y), torch.device("cpu"))
    assert not [k for k in plain.evaluate(arrays, [0, 1, 2], [[0, 1, 2]]) if k.startswith("adjusted_")]
    adjustment = ADJUSTMENTS.get("posthoc_la")({}, COUNTS)
    both = Evaluator(model, Splits(x, y, x, y), torch.device("cpu"), adjustment=adjustment)
    res = both.evaluate(arrays, [0, 1, 2], [[0, 1, 2]])
    with torch.no_grad():
        by_hand = adjustment.logits(model(torch.from_numpy(x))).argmax(1).numpy()
    expected = classification_metrics(y, by_hand, [0, 1, 2])
    assert res["adjusted_balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert res["adjusted_accuracy"] == pytest.approx(expected["accuracy"])
    assert res["balanced_accuracy"] == pytest.approx(
        plain.evaluate(arrays, [0, 1, 2], [[0, 1, 2]])["balanced_accuracy"]
    )
