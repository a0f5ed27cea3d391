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
from typing import ClassVar, NamedTuple

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from clients.state import split_state
from clients.state import to_bytes as state_to_bytes
from fedtail import protocol as P
from fedtail.config import FedtailConfig
from fedtail.errors import RunError
from fedtail.models import array_from_numpy, array_to_numpy
from fedtail.registry import PluginOptions

log = logging.getLogger("fedtail.strategy")


class ClientUpdateError(RunError):
    """No usable client update in a round (all failed or were rejected)."""


DIVERGED = "contains NaN or Inf"


def divergence_hint(cfg: FedtailConfig, what: str = "local training diverged") -> str:
    """What produced a non-finite update (or a collapsed model) and what to change: the methods in play
    and every setting of the local step size (``train.lr``, any plug-in's ``lr_scale``, the clip)."""
    settings = [f"train.lr={cfg.train.lr}"]
    for section in ("train", "continual"):
        scale = getattr(cfg, section).options.get("lr_scale")
        if scale is not None:
            settings.append(f"{section}.options.lr_scale={scale}")
    default_clip = type(cfg.train).model_fields["max_grad_norm"].default
    clip = "" if cfg.train.max_grad_norm is not None else f"; or clip it: train.max_grad_norm={default_clip}"
    return (
        f"{what} under continual.method={cfg.continual.method!r}, "
        f"train.objective={cfg.train.objective!r}, strategy.name={cfg.strategy.name!r}; "
        f"lower the local learning rate ({', '.join(settings)}){clip}"
    )


class RoundCounts(NamedTuple):
    """What happened to one round's sampled clients (rounds.csv columns of the same names)."""

    num_sampled: int = 0
    num_clients: int = 0  # updates actually aggregated
    num_failed: int = 0  # error replies and clients that never replied
    num_rejected: int = 0  # replies whose update failed the checks


def sample_partitions(
    num_clients: int,
    fraction: float,
    minimum: int,
    seed: int,
    global_round: int,
    present: list[int] | None = None,
) -> list[int]:
    """Seeded choice of ``max(floor(fraction * n), minimum)`` partition ids for one round, among the
    ``present`` ones (the clients taking part in the task; None: all ``num_clients``), n their count."""
    if present is None:
        k = min(num_clients, max(int(num_clients * fraction), minimum))
        rng = np.random.default_rng([seed, 0x5A4D, global_round])
        return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))
    k = min(len(present), max(int(len(present) * fraction), minimum))
    rng = np.random.default_rng([seed, 0x5A4D, global_round])
    return sorted(int(present[i]) for i in rng.choice(len(present), size=k, replace=False))


Decoded = dict[str, np.ndarray]


def decode(update: ArrayRecord) -> Decoded:
    """The update's arrays as numpy (read-only), decoded once for both the checks and the average."""
    return {key: array_to_numpy(array) for key, array in update.items()}


def check_update(pid: int, update: ArrayRecord | Decoded, reference: ArrayRecord) -> str | None:
    """Why a client's arrays can't be averaged into ``reference``, or None if it can."""
    if not isinstance(update, dict):
        update = decode(update)
    if set(update.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(update.keys()))
        extra = sorted(set(update.keys()) - set(reference.keys()))
        return f"client {pid}: arrays differ from the global model (missing {missing}, unexpected {extra})"
    for key, ref in reference.items():
        arr = update[key]
        if tuple(arr.shape) != tuple(ref.shape):
            return f"client {pid}: array {key!r} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}"
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            return f"client {pid}: array {key!r} {DIVERGED}"
    return None


def weighted_mean(updates: list[Decoded], weights: list[float]) -> ArrayRecord:
    """FedAvg's weighted mean of decoded updates, computed exactly as Flower's `aggregate_arrayrecords`
    does (same operations in the same order and precision, so the result is bit-identical; tested)."""
    total = sum(weights)
    out: Decoded = {}
    for update, weight in zip(updates, weights, strict=True):
        factor = weight / total
        for key, value in update.items():
            if key not in out:
                out[key] = value * factor
            else:
                out[key] += value * factor
    return ArrayRecord({key: array_from_numpy(np.asarray(value)) for key, value in out.items()})


def weighted_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Flower's `aggregate_metricrecords` (the same operations in the same order: bit-identical,
    tested), reading each reply's MetricRecords directly instead of through the per-access views
    ``RecordDict.metric_records`` builds, which cost more than the arithmetic."""
    per_record = [[r for r in record.values() if isinstance(r, MetricRecord)] for record in records]
    weights = [metric_records[0][weighting_key] for metric_records in per_record]
    total = sum(weights)
    out: dict = {}
    for metric_records, weight in zip(per_record, [w / total for w in weights], strict=True):
        for record in metric_records:
            for key, value in record.items():
                if key == weighting_key:
                    continue
                if key not in out:
                    out[key] = [v * weight for v in value] if isinstance(value, list) else value * weight
                elif isinstance(value, list):
                    out[key] = [c + v * weight for c, v in zip(out[key], value, strict=True)]
                else:
                    out[key] += value * weight
    return MetricRecord(out)


def keep_frozen(arrays: ArrayRecord, reference: ArrayRecord, prefixes: tuple[str, ...]) -> ArrayRecord:
    """``arrays`` with every array named ``prefix...`` taken from ``reference`` instead."""
    return ArrayRecord({k: reference[k] if k.startswith(prefixes) else v for k, v in arrays.items()})


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
        self.client_states: dict[int, bytes] = {}
        self.last_sampled: list[int] = []
        self.last_train_loss = float("nan")
        self.last_counts = RoundCounts()
        self._reference: ArrayRecord | None = None
        self.present: list[int] | None = None
        """The partition ids taking part in the current task (per-client arrival); None: every one."""
        self.extra_records: dict[str, ArrayRecord] = {}
        """Sent with every train message beside the global model (the end-of-task model)."""
        self.frozen_prefixes: tuple[str, ...] = ()
        """Arrays whose names start with one of these are kept as sent (a stage that freezes them, cRT's
        features): float averaging of identical copies could move them by an ulp."""

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
            fed.num_clients, fed.fraction_train, fed.min_train_clients, self.cfg.seed, gr, self.present
        )
        self.last_sampled = pids
        config[P.SERVER_ROUND] = server_round
        config[P.GLOBAL_ROUND] = gr
        self._reference = arrays
        record = RecordDict(
            {self.arrayrecord_key: arrays, self.configrecord_key: config, **self.extra_records}
        )
        return self._construct_messages(record, [self.node_of_partition[p] for p in pids], MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        usable: list[tuple[int, Message, Decoded]] = []
        missing = len(self.last_sampled) - len(replies)
        failed = [f"{missing} sampled client(s) sent no reply within the timeout"] if missing > 0 else []
        rejected: list[str] = []
        for msg in replies:
            if msg.has_error():
                failed.append(f"node {msg.metadata.src_node_id}: {msg.error.reason}")
                continue
            pid, reason, decoded = self._accept(msg)
            if reason:
                rejected.append(reason)
            elif int(msg.content[P.METRICS][P.NUM_EXAMPLES]) > 0:
                usable.append((pid, msg, decoded))
        n_failed = max(missing, 0) + sum(m.has_error() for m in replies)
        self.last_counts = RoundCounts(len(self.last_sampled), len(usable), n_failed, len(rejected))
        gr = self.global_round(server_round)
        for problem in failed:
            log.warning("round %d: failed client: %s", gr, problem)
        hint = f" ({divergence_hint(self.cfg)})" if any(DIVERGED in p for p in rejected) else ""
        for problem in rejected:
            log.warning("round %d: rejected update: %s%s", gr, problem, hint if DIVERGED in problem else "")
        if not usable:
            if failed or rejected:
                problems = "; ".join(failed + rejected)
                raise ClientUpdateError(f"round {gr}: no usable client update; {problems}{hint}")
            self.last_train_loss = float("nan")
            return None, None  # every sampled client had no data of this task: keep the model
        usable.sort(key=lambda item: item[0])
        if self._plain_fedavg_aggregation():  # one pass over the arrays decoded for the checks
            arrays = weighted_mean(
                [d for _, _, d in usable], [m.content[P.METRICS][self.weighted_by_key] for _, m, _ in usable]
            )
            contents = [m.content for _, m, _ in usable]
            if self.train_metrics_aggr_fn is aggregate_metricrecords:
                metrics = weighted_metrics(contents, self.weighted_by_key)
            else:
                metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        else:
            arrays, metrics = super().aggregate_train(server_round, [m for _, m, _ in usable])
        if metrics is not None and P.TRAIN_LOSS in metrics:
            self.last_train_loss = float(metrics[P.TRAIN_LOSS])
        if arrays is not None and self.frozen_prefixes and self._reference is not None:
            arrays = keep_frozen(arrays, self._reference, self.frozen_prefixes)
        return arrays, metrics

    @classmethod
    def _plain_fedavg_aggregation(cls) -> bool:
        """Whether the Flower strategy below this mixin aggregates with FedAvg's own `aggregate_train`
        (then `weighted_mean` gives its result without decoding every update a second time)."""
        mro = cls.__mro__
        for klass in mro[mro.index(FedtailStrategy) + 1 :]:
            if "aggregate_train" in vars(klass):
                return klass is FedAvg
        return False

    def _accept(self, msg: Message) -> tuple[int, str | None, Decoded]:
        """Keep a reply's client state and info; decode its update; say why it can't be averaged, if it
        can't."""
        try:
            pid = int(msg.content[P.INFO][P.PARTITION_ID])
        except (KeyError, TypeError, ValueError):
            return -1, f"node {msg.metadata.src_node_id}: reply carries no {P.INFO}.{P.PARTITION_ID}", {}
        # the client trained, so its state moved on whether or not its update is used
        self.client_states[pid] = state_to_bytes(split_state(msg.content))
        self.client_info[pid] = dict(msg.content[P.INFO])
        if P.ARRAYS not in msg.content.array_records or P.METRICS not in msg.content.metric_records:
            return pid, f"client {pid}: reply lacks its {P.ARRAYS!r} or {P.METRICS!r} record", {}
        decoded = decode(msg.content[P.ARRAYS])
        reference = self._reference
        return pid, None if reference is None else check_update(pid, decoded, reference), decoded
