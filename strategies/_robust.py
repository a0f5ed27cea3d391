"""What the Krum family needs from the config: enough updates per round for its selection."""

from __future__ import annotations

from fedtail.config import FedtailConfig
from strategies.base import sample_size


def sampled_per_round(cfg: FedtailConfig) -> int:
    """Clients sampled each round when every client takes part (`strategies.base.sample_partitions`)."""
    fed = cfg.federation
    return sample_size(fed.num_clients, fed.fraction_train, fed.min_train_clients)


def too_few(cfg: FedtailConfig, needed: int, rule: str) -> str | None:
    """The error for a round too small for the aggregator's rule, or None."""
    k = sampled_per_round(cfg)
    if k >= needed:
        return None
    return (
        f"strategy.name={cfg.strategy.name!r} needs at least {needed} updates per round ({rule}), but "
        f"federation.fraction_train={cfg.federation.fraction_train} of federation.num_clients="
        f"{cfg.federation.num_clients} samples {k}: sample more clients (federation.fraction_train, "
        "federation.min_train_clients) or lower strategy.options.num_malicious_nodes"
    )
