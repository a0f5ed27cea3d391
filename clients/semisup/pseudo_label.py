"""Pseudo-labeling with confirmation-bias remedies: soft pseudo-labels, mixup and a minimum of labeled
samples per batch (Arazo et al., "Pseudo-Labeling and Confirmation Bias in Deep Semi-Supervised
Learning", IJCNN 2020; official code EricArazo/PseudoLabeling).

Each unlabeled sample carries a soft pseudo-label h: the network's softmax on the sample as stored
(`PLAIN`, no augmentation), initialised from the received model at the client's first round (the
paper's relabelling after warm-up) and replaced by the latest prediction at the end of every round (the
paper: of every epoch), kept in the client's state across rounds and resume. Each step mixes the whole
batch, labeled samples (one-hot targets) and the weak view of the unlabeled ones (targets h), with one
lambda ~ Beta(alpha, alpha) and a permutation (mixup), and minimises (eq. 6 with mixup, eq. 7-8)

    lambda CE(mixed, t) + (1 - lambda) CE(mixed, t[perm]) + reg_prior R_A + reg_entropy R_H,

R_A = -sum_c p_c log(mean_batch softmax_c) against the uniform prior p (the paper's; ``prior: labeled``
uses the federation's labeled class prior instead) and R_H the mean entropy of the mixed predictions.
The paper's other remedy, a minimum of labeled samples per batch (16 of 100), holds by construction:
every step has ``train.batch_size`` labeled samples beside ``mu`` times as many unlabeled (1 in 8 at
mu 7; a client without labels has none to keep). Defaults are the official code's: alpha 1, reg_prior
0.8, reg_entropy 0.4. The objective's own loss on the clean labeled batch is kept beside it (the
composition every method shares).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from clients.semisup import PLAIN, SemiSupervised, UnlabeledLoss, UnlabeledStep, received_pass
from fedtail.registry import SEMISUP, PluginOptions

SOFT_LABELS = "pseudo-label-soft"  # client state: (unlabeled samples, C) soft labels, NaN rows unset
MIXED = "mixed"


def mixup_loss(logits: torch.Tensor, targets: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    """lambda CE(logits, t) + (1 - lambda) CE(logits, t[perm]), soft targets (mixup, Zhang et al. 2018)."""
    log_p = F.log_softmax(logits, dim=1)
    return lam * -(targets * log_p).sum(1).mean() + (1 - lam) * -(targets[perm] * log_p).sum(1).mean()


def regularisers(logits: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_A, R_H): -sum_c p_c log(mean softmax_c), and the mean entropy of the softmax."""
    prob = F.softmax(logits, dim=1)
    r_a = -(prior * torch.log(prob.mean(dim=0).clamp_min(1e-12))).sum()
    r_h = -(prob * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return r_a, r_h


class PseudoLabelOptions(PluginOptions):
    """The official code's settings."""

    alpha: float = Field(1.0, gt=0.0, le=100.0, description="Mixup's Beta(alpha, alpha).")
    reg_prior: float = Field(0.8, ge=0.0, le=100.0, description="Weight of R_A (reg1).")
    reg_entropy: float = Field(0.4, ge=0.0, le=100.0, description="Weight of R_H (reg2).")
    prior: Literal["uniform", "labeled"] = Field("uniform", description="The prior R_A pulls towards.")
    lambda_u: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the whole term.")


@SEMISUP.register("pseudo_label")
class PseudoLabel(SemiSupervised):
    """Soft pseudo-labels from the previous round, mixup over labeled and unlabeled, prior and entropy
    regularisation."""

    Options = PseudoLabelOptions
    views: ClassVar[tuple[str, ...]] = (PLAIN, "weak")

    def begin(self, index: np.ndarray) -> None:
        ctx, c = self.ctx, self.num_classes
        n = len(ctx.data.x_unlabeled)
        soft = self.stored(SOFT_LABELS, "soft", (n, c))
        soft = np.full((n, c), np.nan, np.float32) if soft is None else soft
        unset = index[np.isnan(soft[index, 0])]
        if len(unset):  # the received model's predictions (the paper relabels after its warm-up)
            soft[unset] = received_pass(ctx, ctx.data.x_unlabeled[unset]).cpu().numpy()
        self.soft = torch.from_numpy(soft).to(ctx.device)
        self.latest = self.soft.clone()
        prior = np.full(c, 1.0 / c) if self.options.prior == "uniform" else np.asarray(ctx.class_prior, float)
        self.prior = torch.as_tensor(prior / prior.sum(), dtype=torch.float32, device=ctx.device)

    def extra_inputs(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor,
        views: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        inputs = torch.cat([x, views["weak"]])
        targets = torch.cat([F.one_hot(y, self.num_classes).float(), self.soft[index.to(self.soft.device)]])
        seed = int(torch.randint(2**31, (1,), generator=generator))  # numpy's Beta, seeded from the stream
        self.lam = float(np.random.default_rng(seed).beta(self.options.alpha, self.options.alpha))
        self.perm = torch.randperm(len(inputs), generator=generator).to(inputs.device)
        self.targets = targets
        return {MIXED: self.lam * inputs + (1 - self.lam) * inputs[self.perm]}

    def loss(self, step: UnlabeledStep) -> UnlabeledLoss:
        o = self.options
        mixed = step.views[MIXED].logits
        r_a, r_h = regularisers(mixed, self.prior)
        loss = mixup_loss(mixed, self.targets, self.perm, self.lam) + o.reg_prior * r_a + o.reg_entropy * r_h
        with torch.no_grad():
            self.latest[step.index.to(self.latest.device)] = torch.softmax(
                step.views[PLAIN].logits.float(), dim=1
            )
        n_l = len(step.labeled.x)
        soft = self.targets[n_l:]
        return UnlabeledLoss(o.lambda_u * loss, soft.argmax(dim=1), torch.ones(len(soft), device=soft.device))

    def end(self, steps: int) -> None:
        self.store(SOFT_LABELS, soft=self.latest)
