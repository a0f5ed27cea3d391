"""Twin-sight: a supervised and an unsupervised model per client, tied by a neighbourhood-preserving
constraint, both aggregated (Zhang et al., "Robust Training of Federated Models with Extremely Label
Deficiency", ICLR 2024; official code visitworld123/Twin-sight, ``trainers/normal_trainer.py``, the
partial-data trainer with ``SemiFed_SimCLR``).

The supervised model f (fedtail's model) learns from labels and from FreeMatch pseudo-labels; the twin
g (the same feature extractor plus a SimCLR projector) learns by instance discrimination, without
labels. Per step, over the batch's B labeled and unlabeled samples:

    L = L_sup(f) + lambda_u L_FreeMatch(f) + lambda_ins L_InfoNCE(g) + lambda_sim L_sim,
    L_sim = sum_ij (G^g_ij - G^f_ij)^2 / B^2,   G_ij = <z_i / |z_i|, z_j / |z_j|>,

G the Gram matrices of each model's normalised features of the weak views: the twins keep the same
neighbourhoods, so the twin's label-free structure reaches the supervised model. InfoNCE (SimCLR,
temperature 0.07) pairs each sample's weak and strong view among the 2B projections. FreeMatch's
self-adaptive threshold is time_p * p_model[k] / max p_model, with time_p the EMA (0.999) of the mean
confidence and p_model of the mean prediction, both starting at 1/C at every local training as in the
official trainer.

fedtail's reading: the twin is the method's module ``model.extra["twin"]``, part of the global model,
so FedAvg (or the configured strategy) averages both models; evaluation uses the supervised one. The
labeled batch as stored is the labeled samples' weak view (the loop's); their strong view comes from
the run's strong augmentation. The official code divides L_sim by ``B ^ 2``, Python's XOR; here B^2.
The official default also adds FedProx (mu 0.5): here that is ``strategy.name: fedprox``, not this
method. The projector keeps the official proportions to the feature size (ResNet-18's 512 features:
4096 hidden, 2048 out): 8x and 4x the feature dimension. Defaults: lambda_ins 0.5 (``insDis``),
lambda_sim 1 (``sim``) as published; lambda_u 0 where the official code has 5 (``PD_ulb_loss_ratio``):
on digits with ~55 long-tailed labels over 10 clients (benchmarks/sweeps/semisup-digits.yaml) the
official 5 collapses (balanced accuracy 0.16, every unlabeled sample pseudo-labelled: FreeMatch's
threshold starts at 1/C at every local training and 0.999 moves it little in a round's steps) and 1
too (0.28), while the twin and its constraint alone reach 0.70 (supervised-only 0.68). Set
``semisup.options.lambda_u: 5`` for the published objective.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clients.semisup import SemiSupervised, UnlabeledLoss, UnlabeledStep, consistency_loss
from fedtail.models import build_features
from fedtail.registry import SEMISUP, PluginOptions

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig

TWIN = "twin"


class TwinSightOptions(PluginOptions):
    """The official defaults (configs/default.py), but lambda_u (see the module docstring)."""

    lambda_u: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="Weight of FreeMatch's unlabeled loss (official: 5; see the docstring).",
    )
    lambda_ins: float = Field(0.5, ge=0.0, le=100.0, description="Weight of the twin's InfoNCE loss.")
    lambda_sim: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the Gram-matrix constraint.")
    temperature: float = Field(0.07, gt=0.0, le=10.0, description="InfoNCE temperature.")
    ema: float = Field(0.999, ge=0.0, lt=1.0, description="FreeMatch's EMA momentum.")


class Twin(nn.Module):
    """The unsupervised twin: a feature extractor like the model's and a SimCLR projector."""

    def __init__(self, features: nn.Module, dim: int) -> None:
        super().__init__()
        self.features = features
        self.projector = nn.Sequential(
            nn.Linear(dim, 8 * dim),
            nn.BatchNorm1d(8 * dim),
            nn.ReLU(inplace=True),
            nn.Linear(8 * dim, 4 * dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.features(x)
        return z, self.projector(z)


def gram_loss(z_twin: torch.Tensor, z_sup: torch.Tensor) -> torch.Tensor:
    """sum (G_twin - G_sup)^2 / B^2 over the normalised features' Gram matrices."""
    a, b = F.normalize(z_twin, dim=1), F.normalize(z_sup, dim=1)
    return ((a @ a.T - b @ b.T) ** 2).sum() / z_twin.shape[0] ** 2


def info_nce(projections: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over 2B projections (first B one view, next B the other): each row's positive
    is the other view of its sample, the other 2B - 2 rows its negatives (the official info_nce_loss)."""
    n = projections.shape[0] // 2
    z = F.normalize(projections, dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def freematch_threshold(time_p: torch.Tensor, p_model: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """FreeMatch's self-adaptive class threshold of each pseudo-label: time_p p_model[k] / max p_model."""
    return time_p * (p_model / p_model.max())[labels]


@SEMISUP.register("twinsight")
class TwinSight(SemiSupervised):
    """FreeMatch on the supervised model, SimCLR on its twin, their feature neighbourhoods tied."""

    Options = TwinSightOptions

    @classmethod
    def modules(
        cls, cfg: FedtailConfig, input_shape: tuple[int, ...], feature_dim: int
    ) -> dict[str, nn.Module]:
        features, dim = build_features(cfg.model_name(), input_shape, cfg.model.hidden, cfg.model.depth)
        return {TWIN: Twin(features, dim)}

    def begin(self, index: np.ndarray) -> None:
        c, device = self.num_classes, self.ctx.device
        self.p_model = torch.full((c,), 1.0 / c, device=device)
        self.time_p = self.p_model.mean()

    def loss(self, step: UnlabeledStep) -> UnlabeledLoss:
        o = self.options
        weak, strong = step.views["weak"], step.views["strong"]
        with torch.no_grad():
            probs = torch.softmax(weak.logits.detach().float(), dim=1)
            confidence, labels = probs.max(dim=1)
            self.time_p = o.ema * self.time_p + (1 - o.ema) * confidence.mean()
            self.p_model = o.ema * self.p_model + (1 - o.ema) * probs.mean(dim=0)
            mask = (confidence >= freematch_threshold(self.time_p, self.p_model, labels)).float()
        loss = o.lambda_u * consistency_loss(strong.logits, labels, mask)
        x_l = step.labeled.x
        twin = self.module(TWIN)
        inputs_w = torch.cat([x_l, weak.x])
        inputs_s = torch.cat([step.augment("strong", x_l), strong.x]) if len(x_l) else strong.x
        z, proj = twin(torch.cat([inputs_w, inputs_s]))
        b = len(inputs_w)
        if o.lambda_ins > 0:
            loss = loss + o.lambda_ins * info_nce(proj, o.temperature)
        if o.lambda_sim > 0:
            z_sup = torch.cat([step.labeled.features[: len(x_l)], weak.features])
            loss = loss + o.lambda_sim * gram_loss(z[:b], z_sup)
        return UnlabeledLoss(loss, labels, mask if o.lambda_u > 0 else torch.zeros_like(mask))
