"""FedAvgM: FedAvg with server momentum (Hsu, Qi & Brown, 2019, "Measuring the Effects of Non-Identical
Data Distribution for Federated Visual Classification", arXiv:1909.06335).

The average client change is a pseudo-gradient g = w - mean_k w^k,
the server keeps v <- beta v + g and steps w <- w - eta v. The arithmetic is Flower's ``FedAvgM``.

Defaults: ``server_momentum`` 0.9, the paper's; ``server_learning_rate`` 1 - 0.9 = 0.1, so the effective
server step eta / (1 - beta) is 1, the value around which the paper found the best results (its Fig. 5;
eta 1 with beta 0.9 steps ten times the average update and overshoots).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM
from pydantic import Field

from fedtail.registry import STRATEGIES, PluginOptions
from strategies.base import FedtailStrategy


@STRATEGIES.register("fedavgm")
class FedAvgMStrategy(FedtailStrategy, FedAvgM):
    """Flower's FedAvgM; its momentum is checkpointed and carries across tasks."""

    STATE = ("momentum_vector",)

    class Options(PluginOptions):
        """Flower's ``FedAvgM`` arguments."""

        server_learning_rate: float = Field(0.1, gt=0.0, le=10.0)
        server_momentum: float = Field(0.9, ge=0.0, lt=1.0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The momentum steps from the model this round sends: Flower keeps the model of its own last
        aggregation, which a task's server step (WA, a continual head), cRT's re-initialised rows or a
        resume may have changed since."""
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)
