"""FedAdagrad: Adagrad on the server (Reddi et al., 2021, "Adaptive Federated Optimization", ICLR).

Algorithm 2, FedAdagrad: v <- v + Delta^2,
w <- w + eta Delta / (sqrt(v) + tau) (Flower's FedAdagrad has no momentum: beta_1 = 0). The arithmetic is
Flower's ``FedAdagrad``.

Defaults: tau 1e-3 (the paper's); the server rate ``eta`` 0.01, within the
paper's grid of server rates; an adaptive step moves every weight by about eta a round whatever the
update's size, and Flower's default of 0.1 for it (measured in benchmarks/results/strategies) is a
step the small models here do not take without losing accuracy.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdagrad

from fedtail.registry import STRATEGIES
from strategies._fedopt import FEDOPT_STATE, AdagradOptions
from strategies.base import FedtailStrategy


@STRATEGIES.register("fedadagrad")
class FedAdagradStrategy(FedtailStrategy, FedAdagrad):
    """Flower's FedAdagrad; its moments are checkpointed and carry across tasks."""

    STATE = FEDOPT_STATE
    Options = AdagradOptions
