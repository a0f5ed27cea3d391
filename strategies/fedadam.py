"""FedAdam: Adam on the server (Reddi et al., 2021, "Adaptive Federated Optimization", ICLR).

Adam on the server over the pseudo-gradient
Delta = mean_k w^k - w (Algorithm 2, FedAdam): m <- beta_1 m + (1 - beta_1) Delta, v <- beta_2 v + (1 -
beta_2) Delta^2, w <- w + eta m / (sqrt(v) + tau). The arithmetic is Flower's ``FedAdam``.

Defaults: beta_1 0.9, beta_2 0.99, tau 1e-3 (the paper's); the server rate ``eta`` 0.01, within the
paper's grid of server rates; an adaptive step moves every weight by about eta a round whatever the
update's size, and Flower's default of 0.1 for it (measured in benchmarks/results/strategies) is a
step the small models here do not take without losing accuracy.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam

from fedtail.registry import STRATEGIES
from strategies._fedopt import FEDOPT_STATE, FedOptOptions
from strategies.base import FedtailStrategy


@STRATEGIES.register("fedadam")
class FedAdamStrategy(FedtailStrategy, FedAdam):
    """Flower's FedAdam; its moments are checkpointed and carry across tasks."""

    STATE = FEDOPT_STATE
    Options = FedOptOptions
