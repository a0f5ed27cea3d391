"""FedTrimmedAvg: the coordinate-wise trimmed mean of the client models (Yin et al., 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML).

The trimmed-mean aggregator: per coordinate, the largest and smallest ``beta`` share of the values are
dropped and the rest averaged (unweighted). The arithmetic is Flower's ``FedTrimmedAvg``; ``beta`` 0.2
is Flower's default and the robust aggregators' 20 % attacker setting.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedTrimmedAvg
from pydantic import Field

from fedtail.registry import STRATEGIES, PluginOptions
from strategies.base import FedtailStrategy


@STRATEGIES.register("fedtrimmedavg")
class FedTrimmedAvgStrategy(FedtailStrategy, FedTrimmedAvg):
    """Flower's FedTrimmedAvg."""

    class Options(PluginOptions):
        """Flower's ``FedTrimmedAvg`` argument."""

        beta: float = Field(0.2, ge=0.0, lt=0.5)
