"""FedBR's client part (Guo, Tang & Lin, 2023, "FedBR: Improving Federated Learning on Heterogeneous Data
via Local Learning Bias Reduction", ICML; official code LINs-lab/FedBR, ``fedbr/algorithms.py``
``FedBR.update``, whose constants are the defaults here).

Both components, on the shared pseudo-data x_p (the server's, sent with every round) and the received
global feature extractor phi_g (frozen), in each local step with the real batch (x, y):

* classifier bias reduction (the paper's eq. 2, second term): the local classifier should not prefer
  any class on pseudo-data, lam * CE(h(phi(x_p)), q) with q uniform over the seen classes;
* feature bias reduction (eq. 2, third term, and eq. 3): a min-max contrastive loss through a projection
  layer P (an MLP d -> 2d -> 2d -> d, federated: averaged by the server like the model). With
  e1 = P(phi(x_p)), e2 = P(phi_g(x_p)), e3 = P(phi(x)) and cosine similarities,
  l = log( exp(tau1 cos(e1, e2)) / (exp(tau1 cos(e1, e2)) + exp(tau2 cos(e1, e3))) ) row-wise (pseudo
  sample i paired with real sample i). First P takes one SGD step on gamma * mean(l) with the features
  detached (eq. 3: the projection separates local pseudo-features from global ones); then the model's
  loss gets mu * (-mean(l)) (eq. 2: local pseudo-features close to the global ones, away from the
  local real features).

The pseudo-data are built once, from the first round's clients: each sends ``num_pseudo`` means of
``samples_per_pseudo`` of its samples drawn at random (the official ``get_augmentation_mean_data``,
the code's default without ``--use_Mixture``, whose mixture needs a generative model's virtual data);
that round trains without the FedBR terms.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from clients.local import step_seed
from clients.terms import LossTerm, Step
from fedtail.models import array_from_numpy, array_to_numpy

PSEUDO = "fedbr-pseudo"  # train message: the shared pseudo-data ("x")
PROJECTOR = "fedbr-projector"  # train message and reply: the projection layer's parameters
MEANS = "fedbr-means"  # train reply while there are no pseudo-data: this client's candidates ("x")
_SEED_TAG = 0xFEDB


def projector(dim: int) -> nn.Sequential:
    """The official projection layer (DomainBed's ``MLP`` at width 2d, one hidden layer)."""
    return nn.Sequential(
        nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim)
    )


def mean_samples(x: np.ndarray, count: int, per: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` pseudo-samples, each the mean of ``per`` samples of ``x`` drawn with replacement."""
    picks = rng.integers(0, len(x), size=(count, per))
    return x[picks].mean(axis=1).astype(x.dtype)


def contrastive_log_ratio(
    e1: torch.Tensor, e2: torch.Tensor, e3: torch.Tensor, tau1: float, tau2: float
) -> torch.Tensor:
    """Row-wise log(exp(tau1 cos(e1, e2)) / (exp(tau1 cos(e1, e2)) + exp(tau2 cos(e1, e3)))), computed as
    a - logaddexp(a, b): the official expression's value without overflow."""
    a = tau1 * torch.cosine_similarity(e1, e2, dim=1)
    b = tau2 * torch.cosine_similarity(e1, e3, dim=1)
    return a - torch.logaddexp(a, b)


def soft_cross_entropy(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """-mean_i sum_c q_c log softmax(logits_i)_c (the official ``aug_penalty``)."""
    return -(torch.log_softmax(logits, dim=1) * q).sum(dim=1).mean()


class FedBRTerm(LossTerm):
    """Classifier and feature bias reduction on the shared pseudo-data."""

    def begin(self, model: nn.Module, lr: float, x: torch.Tensor, y: torch.Tensor) -> None:
        self.active = False
        o, ctx = self.options, self.ctx
        pseudo = ctx.message.get(PSEUDO)
        if pseudo is None:  # the first round: offer this client's means for the shared pseudo-data
            if len(x):
                seed = step_seed(ctx.job.config.seed, ctx.task, ctx.global_round, ctx.partition_id, _SEED_TAG)
                means = mean_samples(
                    x.numpy(), o.num_pseudo, o.samples_per_pseudo, np.random.default_rng(seed)
                )
                ctx.reply[MEANS] = ArrayRecord({"x": array_from_numpy(means)})
            return
        device = ctx.device
        self.x_p = torch.from_numpy(array_to_numpy(pseudo["x"]).copy()).to(device)
        with torch.no_grad():
            self.z_global = ctx.global_model.features(self.x_p)
        self.projector = projector(self.z_global.shape[1]).to(device)
        record = ctx.message[PROJECTOR]
        self.projector.load_state_dict(
            {k: torch.from_numpy(array_to_numpy(a).copy()) for k, a in record.items()}
        )
        self.optimizer = torch.optim.SGD(
            self.projector.parameters(), lr=lr, weight_decay=ctx.job.config.train.weight_decay
        )
        q = torch.zeros(ctx.job.config.num_classes, device=device)
        q[torch.as_tensor(ctx.seen_classes, device=device)] = 1.0 / len(ctx.seen_classes)
        self.q = q
        self.model = model
        self.active = True

    def loss(self, step: Step) -> torch.Tensor | None:
        if not self.active:
            return None
        o = self.options
        n = min(len(self.x_p), len(step.x))  # pseudo sample i is paired with real sample i
        z_p = self.model.features(self.x_p[:n])
        z_g, z_x = self.z_global[:n], step.features[:n]
        # eq. 3: the projection layer's step, on detached features
        ratio = contrastive_log_ratio(
            self.projector(z_p.detach()), self.projector(z_g), self.projector(z_x.detach()), o.tau1, o.tau2
        )
        self.optimizer.zero_grad(set_to_none=True)
        (o.gamma * ratio.mean()).backward()
        self.optimizer.step()
        # eq. 2: the model's terms through the updated projection
        ratio = contrastive_log_ratio(
            self.projector(z_p), self.projector(z_g), self.projector(z_x), o.tau1, o.tau2
        )
        balance = soft_cross_entropy(self.model.classifier(z_p), self.q)
        return o.mu * (-ratio.mean()) + o.lam * balance

    def end(self, model: nn.Module, steps: int) -> None:
        if self.active:
            self.ctx.reply[PROJECTOR] = ArrayRecord(
                {
                    k: array_from_numpy(v.detach().cpu().numpy())
                    for k, v in self.projector.state_dict().items()
                }
            )
