"""SCAFFOLD's client part (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML, Algorithm 1).

Every local step follows g - c_i + c instead of the gradient g (c the server's control variate, sent
with the round; c_i this client's, kept in its persistent state across rounds, tasks and resume; both
start at zero). After the K local steps, option II: c_i+ = c_i - c + (x - y_i) / (K eta), x the
received model and y_i the trained one; the client keeps c_i+ and sends Delta c_i = c_i+ - c_i.

eta is the step size the optimiser took. With SGD momentum beta (``train.momentum``) the steady-state
step of heavy-ball SGD is eta / (1 - beta), which is what (x - y_i) / K measures, so that is the eta
used: with beta = 0 it is the paper's formula; without the factor the variates of a momentum run come
out 1 / (1 - beta) = 10 times too large and the corrections overshoot.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from clients.terms import LossTerm, trainable
from fedtail.config import FedtailConfig
from fedtail.models import array_from_numpy, array_to_numpy

SERVER_VARIATE = "scaffold-c"  # train message: the server's c
DELTA = "scaffold-delta-c"  # train reply: Delta c_i
CLIENT_VARIATE = "scaffold-c-i"  # client state: c_i


def option_two(
    c_i: dict[str, np.ndarray],
    c: dict[str, np.ndarray],
    x: dict[str, np.ndarray],
    y: dict[str, np.ndarray],
    steps: int,
    lr: float,
) -> dict[str, np.ndarray]:
    """c_i+ = c_i - c + (x - y) / (K lr), the paper's option II (K = ``steps``)."""
    return {k: c_i[k] - c[k] + (x[k] - y[k]) / (steps * lr) for k in x}


def _read(record: ArrayRecord | None, like: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A variate by parameter name; zeros where it has none yet (the first round, a new client)."""
    values = {} if record is None else {k: array_to_numpy(a) for k, a in record.items()}
    return {
        k: values[k] if k in values else np.zeros(tuple(p.shape), dtype=np.float32) for k, p in like.items()
    }


class ScaffoldTerm(LossTerm):
    """Corrects every local gradient by c - c_i; updates c_i after training (option II)."""

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        if cfg.train.optimizer != "sgd":
            return (
                f"strategy.name={cfg.strategy.name!r} corrects SGD steps (its variates estimate gradients "
                f"from the step size), but train.optimizer={cfg.train.optimizer!r}: use sgd"
            )
        return None

    def begin(self, model: nn.Module, lr: float, x: torch.Tensor, y: torch.Tensor) -> None:
        self.params = trainable(model)
        self.lr = lr / (1.0 - self.ctx.job.config.train.momentum)
        self.x = {k: p.detach().cpu().numpy().copy() for k, p in self.params.items()}
        self.c = _read(self.ctx.message.get(SERVER_VARIATE), self.params)
        self.c_i = _read(self.ctx.state.get(CLIENT_VARIATE), self.params)
        device = next(iter(self.params.values())).device
        self.correction = {k: torch.from_numpy(self.c[k] - self.c_i[k]).to(device) for k in self.params}

    def before_step(self) -> None:
        for k, p in self.params.items():
            if p.grad is not None:
                p.grad.add_(self.correction[k])

    def end(self, model: nn.Module, steps: int) -> None:
        if steps == 0:
            return
        y = {k: p.detach().cpu().numpy() for k, p in self.params.items()}
        new = option_two(self.c_i, self.c, self.x, y, steps, self.lr)
        self.ctx.state[CLIENT_VARIATE] = ArrayRecord({k: array_from_numpy(v) for k, v in new.items()})
        self.ctx.reply[DELTA] = ArrayRecord(
            {k: array_from_numpy(np.asarray(new[k] - self.c_i[k])) for k in new}
        )
