"""Bulyan: Krum-selected updates, then a coordinate-wise trimmed mean around their median (El Mhamdi,
Guerraoui & Rouault, 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium", ICML).

With f attackers among n >= 4f + 3 updates, Multi-Krum selects theta = n - 2f, and each
coordinate is the mean of the beta = theta - 2f values closest to the selection's median. The arithmetic
is Flower's ``Bulyan``; the selected clients are the ``kept_clients`` column of rounds.csv.
"""

from __future__ import annotations

from flwr.serverapp.strategy import Bulyan
from pydantic import Field

from fedtail.config import FedtailConfig
from fedtail.registry import STRATEGIES, PluginOptions
from strategies._robust import too_few
from strategies.base import FedtailStrategy


@STRATEGIES.register("bulyan")
class BulyanStrategy(FedtailStrategy, Bulyan):
    """Flower's Bulyan."""

    class Options(PluginOptions):
        """Flower's ``Bulyan`` argument: the number f of attackers to tolerate."""

        num_malicious_nodes: int = Field(0, ge=0, le=10_000)

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        f = cls.Options.model_validate(cfg.strategy.options).num_malicious_nodes
        return too_few(cfg, 4 * f + 3, "Bulyan needs n >= 4f + 3; Flower skips smaller rounds")
