"""Multi-Krum: the average of the m updates with the best Krum scores (Blanchard et al., 2017, "Machine
Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS, section 5).

Krum's score (sum of squared distances to the n - f - 2 nearest updates), the m lowest-scoring updates
averaged by sample count. The selection is Flower's ``MultiKrum``; the kept clients are the
``kept_clients`` column of rounds.csv.
"""

from __future__ import annotations

from flwr.serverapp.strategy import MultiKrum
from pydantic import Field

from fedtail.config import FedtailConfig
from fedtail.registry import STRATEGIES, PluginOptions
from strategies._robust import sampled_per_round, too_few
from strategies.base import FedtailStrategy


@STRATEGIES.register("multikrum")
class MultiKrumStrategy(FedtailStrategy, MultiKrum):
    """Flower's MultiKrum."""

    class Options(PluginOptions):
        """Flower's ``MultiKrum`` arguments: f attackers to tolerate, m updates to average."""

        num_malicious_nodes: int = Field(0, ge=0, le=10_000)
        num_nodes_to_select: int | None = Field(
            None,
            ge=1,
            le=10_000,
            description="m; null: n - f, every update but the f tolerated (Flower's default 1 is Krum).",
        )

    @classmethod
    def options_from_config(cls, cfg: FedtailConfig) -> dict:
        options = cls.Options.model_validate(cfg.strategy.options)
        m = options.num_nodes_to_select
        return {
            "num_malicious_nodes": options.num_malicious_nodes,
            "num_nodes_to_select": sampled_per_round(cfg) - options.num_malicious_nodes if m is None else m,
        }

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        options = cls.Options.model_validate(cfg.strategy.options)
        problem = too_few(cfg, options.num_malicious_nodes + 3, "Krum's score needs n - f - 2 >= 1 others")
        m = options.num_nodes_to_select
        if problem is None and m is not None and m > sampled_per_round(cfg):
            return (
                f"strategy.options.num_nodes_to_select={m} exceeds the "
                f"{sampled_per_round(cfg)} clients sampled per round"
            )
        return problem
