"""Krum: the one client update closest to its n - f - 2 nearest neighbours (Blanchard et al., 2017,
"Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS).

Each update's score is the sum of squared distances to its n - f - 2 closest others (f the
assumed attackers); the lowest-scoring update becomes the global model. The selection is Flower's
``Krum``; the kept client is the ``kept_clients`` column of rounds.csv.
"""

from __future__ import annotations

from flwr.serverapp.strategy import Krum
from pydantic import Field

from fedtail.config import FedtailConfig
from fedtail.registry import STRATEGIES, PluginOptions
from strategies._robust import too_few
from strategies.base import FedtailStrategy


@STRATEGIES.register("krum")
class KrumStrategy(FedtailStrategy, Krum):
    """Flower's Krum."""

    class Options(PluginOptions):
        """Flower's ``Krum`` argument: the number f of attackers to tolerate."""

        num_malicious_nodes: int = Field(0, ge=0, le=10_000)

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        f = cls.Options.model_validate(cfg.strategy.options).num_malicious_nodes
        return too_few(cfg, f + 3, "Krum scores each update by its n - f - 2 nearest others")
