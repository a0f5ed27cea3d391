"""FedMedian: the coordinate-wise median of the client models (Yin et al., 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML).

The median aggregator is robust to a minority of arbitrary updates; ignores sample counts. The arithmetic
is Flower's ``FedMedian``.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian

from fedtail.registry import STRATEGIES, PluginOptions
from strategies.base import FedtailStrategy


@STRATEGIES.register("fedmedian")
class FedMedianStrategy(FedtailStrategy, FedMedian):
    """Flower's FedMedian."""

    class Options(PluginOptions):
        """FedMedian has no settings."""
