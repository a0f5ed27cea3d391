"""FedAvg: the sample-size-weighted average of client models.

McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data"
(AISTATS): w_{t+1} = sum_k (n_k / n) w_{t+1}^k. The averaging itself is Flower's ``FedAvg``.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedtail.registry import STRATEGIES, PluginOptions
from strategies.base import FedtailStrategy


@STRATEGIES.register("fedavg")
class FedAvgStrategy(FedtailStrategy, FedAvg):
    """Flower's FedAvg with fedtail's reproducible sampling and update checks."""

    class Options(PluginOptions):
        """FedAvg has no settings: ``strategy.options`` must be empty."""
