"""Exemplar-free class-incremental learning with a distribution-based global classifier, in the spirit of
AMGC (Yao & Chang, "Adaptive Margin Global Classifier for Exemplar-Free Class-Incremental Learning",
arXiv 2409.13275, 2024), for clients that may not keep any sample.

Which formulation: AMGC builds the classifier of all classes seen so far from per-class feature
distributions (its DBGC: no sampling, so no imbalance between old and new classes), simulates the
degradation of old classes' distributions by enlarging their variance (VE), and shows that this equals
a softmax cross-entropy with adaptive margins (AMarX). Its exact margin could not be read (no code
published; only the abstract was available), so this module uses the closed form such an equivalence
takes for a Gaussian class distribution: the upper bound of the expected cross-entropy over
``f ~ N(mu_y, lambda_y Sigma_y)`` from ISDA (Wang et al., "Implicit Semantic Data Augmentation for Deep
Networks", NeurIPS 2019, eq. 7-8),

    L_y = -log softmax_j( w_j . mu_y + b_j + lambda_y / 2 (w_j - w_y)^T Sigma_y (w_j - w_y) )[y],

a margin that grows with the class's spread along the direction separating it from class j. Classes are
weighted equally (one term each); ``lambda_y = 1`` for the task's classes and ``variance_enlarge`` for
the old ones (VE; 2.5, the ratio IL2A uses for old prototypes). ``Sigma_y`` is diagonal.

Representation: the backbone keeps learning (as in AMGC), on the new task's classes only (a new head,
`objective_classes`), held near the previous one by IL2A's feature distillation ``kd_weight ||f(x) -
f_old(x)||_2`` over the batch (Zhu et al., "Class-Incremental Learning via Dual Augmentation",
NeurIPS 2021). IL2A's weight 10 goes with Adam at lr 0.001; with fedtail's SGD (lr 0.05, momentum 0.9)
it froze the features into uselessness, and on Split-digits with 10 clients (seed 0) the final
average accuracy was 0.46 / 0.69 / 0.79 / 0.71 / 0.37 at ``kd_weight`` 0 / 0.03 / 0.1 / 0.3 / 1: 0.1
is the default.

Federated: at the end of a task every client returns, for the task's classes, per-class sums of its
features under the end-of-task model, of their squares, and counts (`task_statistics`); the server
derives each new class's mean and variance exactly as if it held all the samples, keeps the old classes'
from their own task (no client keeps anything), and fits the classifier rows of every seen class on the
loss above (`head_from_statistics`): the global model the next task starts from and that is evaluated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord
from pydantic import Field
from torch.nn import functional as F

from clients.continual import ContinualMethod, Head, linear_head_problem
from clients.continual.memory import features_of
from fedtail.models import array_from_numpy, array_to_numpy
from fedtail.registry import CONTINUAL, PluginOptions

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig

SUM, SQUARES, COUNT = "feature-sums", "feature-squares", "counts"
MEAN, VARIANCE = "means", "variances"
WEIGHT, BIAS = "classifier.weight", "classifier.bias"


def margin_logits(
    weight: torch.Tensor,
    bias: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Row y: ``w_j . mu_y + b_j + scale_y / 2 sum_k (w_jk - w_yk)^2 Sigma_yk`` for every class j: the
    ISDA bound's logits for class y's distribution, with a diagonal ``Sigma_y`` (row y of ``variances``).
    ``weight``, ``bias``, ``means`` and ``variances`` have one row per class, in the same order."""
    diff = weight[None, :, :] - weight[:, None, :]  # (y, j, k): w_j - w_y
    margin = 0.5 * scale[:, None] * (diff.square() * variances[:, None, :]).sum(dim=2)
    return means @ weight.T + bias + margin


def fit_global_classifier(
    weight: np.ndarray,
    bias: np.ndarray,
    means: np.ndarray,
    variances: np.ndarray,
    scale: np.ndarray,
    steps: int,
    lr: float,
) -> tuple[np.ndarray, np.ndarray, float]:
    """The classifier of the classes in ``means``' rows (``weight``/``bias`` rows in the same order),
    trained from the given rows by ``steps`` full-batch Adam steps on the mean over classes of the
    margin cross-entropy (one term per class); returns the rows and the final loss."""
    w = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    mu, var, lam = (torch.as_tensor(a, dtype=torch.float64) for a in (means, variances, scale))
    target = torch.arange(len(means))
    optimizer = torch.optim.Adam([w, b], lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = F.cross_entropy(margin_logits(w, b, mu, var, lam), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        loss = F.cross_entropy(margin_logits(w, b, mu, var, lam), target)
    return w.detach().numpy(), b.detach().numpy(), float(loss)


@CONTINUAL.register("prototype")
class PrototypeClassifier(ContinualMethod):
    acts_across_tasks = True
    uses_previous_model = True

    class Options(PluginOptions):
        """``variance_enlarge``: lambda of the old classes (2.5); ``kd_weight``: feature distillation
        (0.1, see the module); ``head_steps`` / ``head_lr``: Adam steps and step size of the server's
        classifier fit (300, 0.01)."""

        variance_enlarge: float = Field(2.5, ge=1.0, le=100.0)
        kd_weight: float = Field(0.1, ge=0.0, le=10_000.0)
        head_steps: int = Field(300, ge=1, le=100_000)
        head_lr: float = Field(0.01, gt=0.0, le=10.0)

    @classmethod
    def statistics_rounds(cls, cfg: FedtailConfig) -> int:
        return 1

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        return super().check_config(cfg) or linear_head_problem(
            cfg, "fits a linear classifier on class distributions"
        )

    def objective_classes(self) -> list[int]:
        """The new task's own head: no exemplars, so the loss must not push old classes' rows down."""
        return list(self.ctx.task_classes)

    def extra_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        if self.ctx.task == 0 or not len(x) or self.options.kd_weight == 0:
            return None
        with torch.no_grad():
            old = self.ctx.previous_model.features(x)
        return self.options.kd_weight * torch.dist(self.ctx.model.features(x), old, 2)

    def task_statistics(self, head: Head, exchange: int) -> Head:
        """Per class of the task, the sums of this client's end-of-task features and of their squares,
        and how many samples; zero rows for every other class."""
        ctx = self.ctx
        classes = ctx.job.config.num_classes
        index = ctx.sample_index if ctx.sample_index is not None else np.arange(len(ctx.data.y))
        y = ctx.data.y[index]
        mine = np.isin(y, ctx.received(ctx.task_classes))  # a client absent from the task sends nothing
        phi = features_of(ctx.model, ctx.data.x[index[mine]], ctx.device)
        sums, squares = np.zeros((classes, phi.shape[1])), np.zeros((classes, phi.shape[1]))
        np.add.at(sums, y[mine], phi)
        np.add.at(squares, y[mine], phi**2)
        return {
            SUM: sums,
            SQUARES: squares,
            COUNT: np.bincount(y[mine], minlength=classes).astype(np.float64),
        }

    @classmethod
    def head_from_statistics(cls, sums, head, exchange, *, arrays, old, new, options):
        counts = sums[COUNT]
        means = np.array(head[MEAN]) if MEAN in head else np.zeros_like(sums[SUM])
        variances = np.array(head[VARIANCE]) if VARIANCE in head else np.zeros_like(sums[SUM])
        have = np.array(head[COUNT]) if COUNT in head else np.zeros_like(counts)
        fresh = [c for c in new if counts[c] > 0]
        for c in fresh:
            means[c] = sums[SUM][c] / counts[c]
            variances[c] = np.maximum(sums[SQUARES][c] / counts[c] - means[c] ** 2, 0.0)
            have[c] = counts[c]
        out_head = {MEAN: means, VARIANCE: variances, COUNT: have}
        classes = [c for c in sorted(set(old) | set(new)) if have[c] > 0]
        if len(classes) < 2:
            return arrays, out_head
        weight, bias = array_to_numpy(arrays[WEIGHT]), array_to_numpy(arrays[BIAS])
        scale = np.array([options.variance_enlarge if c in set(old) else 1.0 for c in classes])
        w, b, _ = fit_global_classifier(
            weight[classes], bias[classes], means[classes], variances[classes], scale,
            options.head_steps, options.head_lr,
        )  # fmt: skip
        new_weight, new_bias = weight.copy(), bias.copy()
        new_weight[classes], new_bias[classes] = w.astype(weight.dtype), b.astype(bias.dtype)
        out = ArrayRecord(dict(arrays.items()))
        out[WEIGHT], out[BIAS] = array_from_numpy(new_weight), array_from_numpy(new_bias)
        return out, out_head

    @classmethod
    def memory_footprint(cls, ctx) -> tuple[int, int]:
        return 0, 0  # nothing kept on the client: the class statistics live on the server
