"""What every fedtail server strategy adds on top of a Flower strategy.

`FedtailStrategy` is a mixin placed before a Flower strategy class (``class X(FedtailStrategy, FedAvg)``).
It makes runs reproducible and robust on every engine: clients are sampled by *partition id* with a
per-round seed (Flower samples node ids with Python's global ``random``, and node ids differ between
engines), replies are aggregated in partition order (float sums depend on order), and each update is
checked before it can touch the global model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedtail import protocol as P
from fedtail.config import FedtailConfig
from fedtail.registry import PluginOptions

log = logging.getLogger("fedtail.strategy")


class ClientUpdateError(RuntimeError):
    """No usable client update in a round (all failed or were rejected)."""


def sample_partitions(
    num_clients: int, fraction: float, minimum: int, seed: int, global_round: int
) -> list[int]:
    """Seeded choice of ``max(floor(fraction * n), minimum)`` partition ids for one round."""
    k = min(num_clients, max(int(num_clients * fraction), minimum))
    rng = np.random.default_rng([seed, 0x5A4D, global_round])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


def check_update(pid: int, update: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why a client's ArrayRecord can't be averaged into ``reference``, or None if it can."""
    if set(update.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(update.keys()))
        extra = sorted(set(update.keys()) - set(reference.keys()))
        return f"client {pid}: arrays differ from the global model (missing {missing}, unexpected {extra})"
    for key, ref in reference.items():
        arr = update[key].numpy()
        if tuple(arr.shape) != tuple(ref.shape):
            return f"client {pid}: array {key!r} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}"
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            return f"client {pid}: array {key!r} contains NaN or Inf"
    return None


class FedtailStrategy:
    """Mixin: deterministic sampling by partition id, ordered and validated aggregation."""

    #: ``strategy.options`` this strategy accepts; the config checks them before any work.
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, cfg: FedtailConfig, node_of_partition: dict[int, int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.node_of_partition = dict(node_of_partition)
        self.round_offset = 0
        self.client_info: dict[int, dict] = {}
        self.last_sampled: list[int] = []
        self.last_train_loss = float("nan")
        self._reference: ArrayRecord | None = None

    @classmethod
    def from_config(cls, cfg: FedtailConfig, node_of_partition: dict[int, int]) -> FedtailStrategy:
        """Build from the config; subclasses read their own ``strategy.options`` here."""
        return cls(
            cfg,
            node_of_partition,
            fraction_train=cfg.federation.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=cfg.federation.min_train_clients,
            min_evaluate_nodes=0,
            min_available_nodes=cfg.federation.num_clients,
            **cls.options_from_config(cfg),
        )

    @classmethod
    def options_from_config(cls, cfg: FedtailConfig) -> dict:
        """Constructor keywords from ``strategy.options`` (already checked against `Options`); override
        to map them onto the Flower strategy's own arguments."""
        return cls.Options.model_validate(cfg.strategy.options).model_dump()

    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        fed = self.cfg.federation
        gr = self.global_round(server_round)
        pids = sample_partitions(
            fed.num_clients, fed.fraction_train, fed.min_train_clients, self.cfg.seed, gr
        )
        self.last_sampled = pids
        config[P.SERVER_ROUND] = server_round
        config[P.GLOBAL_ROUND] = gr
        self._reference = arrays
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, [self.node_of_partition[p] for p in pids], MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        usable: list[tuple[int, Message]] = []
        problems: list[str] = []
        for msg in replies:
            if msg.has_error():
                problems.append(f"node {msg.metadata.src_node_id}: {msg.error.reason}")
                continue
            pid = int(msg.content[P.INFO][P.PARTITION_ID])
            self.client_info[pid] = dict(msg.content[P.INFO])
            reference = self._reference
            reason = None if reference is None else check_update(pid, msg.content[P.ARRAYS], reference)
            if reason:
                problems.append(reason)
                continue
            if int(msg.content[P.METRICS][P.NUM_EXAMPLES]) > 0:
                usable.append((pid, msg))
        for problem in problems:
            log.warning("round %d: rejected update: %s", self.global_round(server_round), problem)
        if not usable:
            if problems:
                raise ClientUpdateError(
                    f"round {self.global_round(server_round)}: no usable client update; "
                    + "; ".join(problems)
                )
            self.last_train_loss = float("nan")
            return None, None  # every sampled client had no data of this task: keep the model
        usable.sort(key=lambda item: item[0])
        arrays, metrics = super().aggregate_train(server_round, [m for _, m in usable])
        if metrics is not None and P.TRAIN_LOSS in metrics:
            self.last_train_loss = float(metrics[P.TRAIN_LOSS])
        return arrays, metrics
