"""FedProx's client part: the proximal term (mu / 2) ||w - w^t||^2 (Li et al., 2020, "Federated
Optimization in Heterogeneous Networks", MLSys, eq. 2), w^t the received global model, mu the
``proximal-mu`` Flower's FedProx puts into every train message."""

from __future__ import annotations

import torch
from torch import nn

from clients.terms import LossTerm, Step, trainable
from fedtail import protocol as P

PROXIMAL_MU = "proximal-mu"  # Flower's FedProx key


def proximal_term(
    params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """(mu / 2) sum_k ||params_k - anchor_k||^2."""
    return (mu / 2) * sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())


class ProximalTerm(LossTerm):
    """Adds FedProx's proximal term to every local step."""

    def begin(self, model: nn.Module, lr: float, x: torch.Tensor, y: torch.Tensor) -> None:
        self.mu = float(self.ctx.message[P.CONFIG][PROXIMAL_MU])
        self.params = trainable(model)
        self.anchor = {k: p.detach().clone() for k, p in self.params.items()}

    def loss(self, step: Step) -> torch.Tensor | None:
        return proximal_term(self.params, self.anchor, self.mu) if self.mu > 0 else None
