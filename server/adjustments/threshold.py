"""Decision-threshold calibration for binary problems (Abdelhamid & Desai, "Balancing the Scales: A
Comprehensive Study on Tackling Class Imbalance in Binary Classification", arXiv:2409.19751, 2024).

A model trained on imbalanced data ranks well but thresholds badly: at the default 0.5 the minority
class is rarely predicted. The paper's most consistent remedy keeps the model and moves the threshold on
the minority class's probability to the one that maximises the target metric on held-out data. Here
the held-out data is a seeded, stratified ``calibration_fraction`` of the test split (the evaluator then
scores every metric, plain and adjusted, on the rest), re-tuned at every evaluation with scikit-learn's
`TunedThresholdClassifierCV` (``cv="prefit"``: the federated model is already trained; 100 candidate
thresholds between the lowest and highest score). Predicting the minority class when ``p >= t`` equals
subtracting ``log(t / (1 - t))`` from its logit, which is how the adjustment is applied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import TunedThresholdClassifierCV

from fedtail.registry import ADJUSTMENTS, PluginOptions
from server.adjustments import Adjustment

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig


class _Scores(ClassifierMixin, BaseEstimator):
    """A fitted binary classifier whose only feature is its own positive-class probability."""

    def __init__(self) -> None:
        self.classes_ = np.array([0, 1])

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Scores:
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        p = np.asarray(x, dtype=np.float64)[:, 0]
        return np.column_stack([1.0 - p, p])


def tune_threshold(proba: np.ndarray, positive: np.ndarray, metric: str) -> float:
    """The threshold on ``proba`` (the positive class's probability) maximising ``metric`` for the
    labels ``positive`` (bool), by scikit-learn; 0.5 when it cannot tune (one class, constant scores)."""
    if positive.all() or not positive.any() or np.ptp(proba) == 0:
        return 0.5
    tuner = TunedThresholdClassifierCV(_Scores(), scoring=metric, cv="prefit", refit=False, thresholds=100)
    return float(tuner.fit(proba[:, None], positive.astype(int)).best_threshold_)


@ADJUSTMENTS.register("threshold")
class ThresholdCalibration(Adjustment):
    class Options(PluginOptions):
        """``metric`` the threshold maximises (the paper's primary one is F1); ``calibration_fraction`` of
        the test split held out to tune it."""

        metric: Literal["f1", "balanced_accuracy"] = Field("f1")
        calibration_fraction: float = Field(0.2, gt=0.0, lt=1.0)

    def __init__(self, options: dict, class_counts: np.ndarray) -> None:
        super().__init__(options, class_counts)
        self.threshold = 0.5
        self.positive = int(np.argmin(self.class_counts))  # the minority class is the one to detect

    @property
    def calibration_fraction(self) -> float:
        return self.options.calibration_fraction

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        if cfg.num_classes != 2:
            return (
                f"evaluation.adjustment='threshold' calibrates a binary decision, but {cfg.dataset.name!r} "
                f"has {cfg.num_classes} classes: choose two with dataset.classes (e.g. [3, 8]) or another "
                "adjustment (posthoc_la, tau_norm)"
            )
        return None

    def calibrate(self, logits: torch.Tensor, y: np.ndarray, seen: Sequence[int]) -> None:
        seen = list(seen)
        if self.positive not in seen or len(seen) != 2:
            self.threshold = 0.5
            return
        column = seen.index(self.positive)
        proba = torch.softmax(logits.double(), dim=1)[:, column].cpu().numpy()
        self.threshold = tune_threshold(proba, np.asarray(y) == self.positive, self.options.metric)

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        t = min(max(self.threshold, 1e-12), 1 - 1e-12)
        out = logits.clone()
        out[:, self.positive] -= math.log(t / (1.0 - t))
        return out
