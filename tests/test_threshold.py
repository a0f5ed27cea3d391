"""Decision-threshold calibration (Abdelhamid & Desai 2024) for binary problems, and `dataset.classes`
that makes a binary problem out of any dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from fedtail.config import ConfigError, build_config
from fedtail.datasets.base import Splits
from fedtail.models import build_model, to_arrays
from fedtail.registry import ADJUSTMENTS
from fedtail.staging import select_classes
from server.adjustments.threshold import tune_threshold
from server.evaluation import Evaluator

COUNTS = np.array([90, 10])  # class 1 is the minority: the one to detect


def test_tuned_threshold_maximises_f1_on_the_calibration_scores() -> None:
    negatives, positives = np.array([0.05, 0.1, 0.2, 0.25]), np.array([0.3, 0.35, 0.4])
    proba = np.r_[negatives, positives]
    positive = np.r_[np.zeros(4, bool), np.ones(3, bool)]
    t = tune_threshold(proba, positive, "f1")
    assert 0.25 < t <= 0.3  # every threshold there separates them; 0.5 would predict no positive
    assert f1_score(positive, proba >= t) == 1.0
    assert tune_threshold(proba, np.zeros(7, bool), "f1") == 0.5  # nothing to tune on


def test_threshold_moves_the_minority_logit_by_the_log_odds_of_t() -> None:
    """Predicting the minority class when p >= t is argmax after subtracting log(t / (1 - t))."""
    adjust = ADJUSTMENTS.get("threshold")({}, COUNTS)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.2]])
    p = torch.softmax(logits, 1)[:, 1]
    for t in (0.1, 0.3, 0.5, 0.8):
        adjust.threshold = t
        assert adjust.logits(logits).argmax(1).tolist() == (p >= t).long().tolist()


def test_threshold_is_for_binary_problems_only() -> None:
    with pytest.raises(ConfigError, match=r"binary.*dataset.classes"):
        build_config({"evaluation": {"adjustment": "threshold"}})
    cfg = build_config({"evaluation": {"adjustment": "threshold"}, "dataset": {"classes": [3, 8]}})
    assert cfg.num_classes == 2


@pytest.mark.parametrize("classes", [[3], [3, 3], [3, 10], [-1, 2]])
def test_dataset_classes_are_checked(classes: list[int]) -> None:
    with pytest.raises(ConfigError, match=r"dataset.classes.*allowed: 2 or more distinct class ids in 0..9"):
        build_config({"dataset": {"classes": classes}})


def test_select_classes_relabels_in_the_given_order() -> None:
    splits = Splits(
        np.arange(6, dtype=np.float32)[:, None],
        np.array([0, 3, 8, 3, 1, 8]),
        np.zeros((2, 1)),
        np.array([8, 2]),
    )
    out = select_classes(splits, [8, 3])
    assert out.y_train.tolist() == [1, 0, 1, 0] and out.x_train[:, 0].tolist() == [1, 2, 3, 5]
    assert out.y_test.tolist() == [0] and select_classes(splits, None) is splits


def test_evaluator_holds_out_a_stratified_calibration_split() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], [80, 20])
    x = (rng.normal(size=(100, 4)) + y[:, None]).astype(np.float32)
    splits = Splits(x, y, x, y)
    model = build_model("mlp", (4,), 2, 8, seed=0)
    adjust = ADJUSTMENTS.get("threshold")({"calibration_fraction": 0.25}, COUNTS)
    ev = Evaluator(model, splits, torch.device("cpu"), groups={}, adjustment=adjust, seed=0)
    assert len(ev.y_cal) == 25 and np.bincount(ev.y_cal).tolist() == [20, 5]
    assert len(ev.y) == 75  # every metric, plain and adjusted, is on the other samples
    out = ev.evaluate(to_arrays(model), [0, 1], [[0, 1]])
    assert "adjusted_balanced_accuracy" in out and 0.0 < adjust.threshold < 1.0
