"""What every fedtail server strategy adds on top of a Flower strategy.

`FedtailStrategy` is a mixin placed before a Flower strategy class (``class X(FedtailStrategy, FedAvg)``).
It makes runs reproducible and robust on every engine: clients are sampled by *partition id* with a
per-round seed (Flower samples node ids with Python's global ``random``, and node ids differ between
engines), replies are aggregated in partition order (float sums depend on order), and each update is
checked before it can touch the global model.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from clients.state import STATE_PREFIX, split_state
from clients.state import to_bytes as state_to_bytes
from fedtail import protocol as P
from fedtail.config import FedtailConfig
from fedtail.errors import RunError
from fedtail.models import array_from_numpy, array_to_numpy
from fedtail.registry import SEMISUP, PluginOptions

log = logging.getLogger("fedtail.strategy")
T = TypeVar("T")


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
    num_clients: int = 0  # updates actually aggregated (a selecting aggregator's kept ones)
    num_failed: int = 0  # error replies and clients that never replied
    num_rejected: int = 0  # replies whose update failed the checks
    bytes_down: int = 0  # array payload sent to the sampled clients, summed over them
    bytes_up: int = 0  # array payload the clients sent back (updates and strategy records), summed
    kept_clients: str = ""  # partition ids whose updates the aggregation used, space-separated


def sample_size(available: int, fraction: float, minimum: int) -> int:
    """How many of ``available`` clients a round samples: ``max(floor(fraction * n), minimum)``, at most n."""
    return min(available, max(int(available * fraction), minimum))


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
        k = sample_size(num_clients, fraction, minimum)
        rng = np.random.default_rng([seed, 0x5A4D, global_round])
        return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))
    k = sample_size(len(present), fraction, minimum)
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


SEMISUP_STATE = "semisup-server"
"""The checkpointed strategy state's key of the semi-supervised method's server part."""

SUMMED_PREFIX = "sums:"
"""Reply records named ``sums:<what>`` hold counts the server sums over the round's clients (never
averages): pseudo-label counts per class (`clients.semisup.PSEUDO_LABELS`)."""


def summed_records(uplinks: Iterable[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """The ``sums:`` ArrayRecords of the round's replies, array by array summed over the clients."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for records in uplinks:
        for key, record in records.items():
            if not key.startswith(SUMMED_PREFIX) or not isinstance(record, ArrayRecord):
                continue
            into = out.setdefault(key, {})
            for name, array in record.items():
                value = array_to_numpy(array)
                into[name] = value.copy() if name not in into else into[name] + value
    return out


def in_dtypes_of(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``arrays`` with each array in ``reference``'s dtype. Flower's FedAdam scales its step by a NumPy
    float64 scalar, which under NumPy 2's promotion rules turns the float32 model into float64: twice the
    bytes down every round, a model that is no longer the one the clients train."""
    if all(a.dtype == reference[k].dtype for k, a in arrays.items() if k in reference):
        return arrays
    out = {}
    for key, array in arrays.items():
        ref = reference.get(key, array)
        same = array.dtype == ref.dtype
        out[key] = array if same else array_from_numpy(array_to_numpy(array).astype(np.dtype(ref.dtype)))
    return ArrayRecord(out)


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays in ``content`` as Flower serialises them (each array's npy bytes): what a
    message costs on the wire, up to the small config and metric records. A client's ``state:`` records
    (fedtail's checkpoint copy, not part of any method's communication) are not counted."""
    return sum(
        len(array.data)
        for key, record in content.items()
        if isinstance(record, ArrayRecord) and not key.startswith(STATE_PREFIX)
        for array in record.values()
    )


@dataclass(frozen=True)
class ClientReply:
    """One aggregated client's reply, as `FedtailStrategy.server_update` sees it."""

    partition_id: int
    num_examples: float
    arrays: Decoded
    """The client's model update (decoded, read-only)."""
    records: dict[str, Any]
    """The reply's other records (a strategy's client part sends them: control variates, statistics)."""


# ---- strategy state in the checkpoint -----------------------------------------------------------
def _pack(value: object) -> object:
    """A strategy attribute as plain tensors, lists and dicts (what ``torch.load(weights_only=True)``
    reads back)."""
    if value is None or isinstance(value, bool | int | float | str):
        return {"kind": "plain", "value": value}
    if isinstance(value, ArrayRecord):
        return {"kind": "arrayrecord", "value": {k: _tensor(array_to_numpy(a)) for k, a in value.items()}}
    if isinstance(value, np.ndarray):
        return {"kind": "ndarray", "value": _tensor(value)}
    if isinstance(value, dict):
        return {"kind": "dict", "value": {str(k): _pack(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"kind": "list", "value": [_pack(v) for v in value]}
    raise TypeError(f"cannot checkpoint a strategy attribute of type {type(value).__name__}")


def _unpack(packed: dict) -> object:
    kind, value = packed["kind"], packed["value"]
    if kind == "plain":
        return value
    if kind == "arrayrecord":
        return ArrayRecord({k: array_from_numpy(t.numpy()) for k, t in value.items()})
    if kind == "ndarray":
        return value.numpy()
    if kind == "dict":
        return {k: _unpack(v) for k, v in value.items()}
    return [_unpack(v) for v in value]


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))


def keep_frozen(arrays: ArrayRecord, reference: ArrayRecord, prefixes: tuple[str, ...]) -> ArrayRecord:
    """``arrays`` with every array named ``prefix...`` taken from ``reference`` instead."""
    return ArrayRecord({k: reference[k] if k.startswith(prefixes) else v for k, v in arrays.items()})


def _without_full_collections(fn: Callable[[], T]) -> T:
    """``fn()`` with every object that exists now moved out of the garbage collector's view
    (`gc.freeze`): Flower's Bulyan decodes each update with ``keep_input=False``, which forces a full
    ``gc.collect()`` per update, 0.27 s each in a process holding torch, Prefect and Flower (30 times
    FedAvg's round time on digits). Frozen objects are skipped, so those collections only look at what
    the aggregation itself allocates."""
    gc.freeze()
    try:
        return fn()
    finally:
        gc.unfreeze()


_FLOWER_KEYS = frozenset({P.ARRAYS, P.METRICS, P.INFO})


class FedtailStrategy:
    """Mixin: deterministic sampling by partition id, ordered and validated aggregation.

    Flower's own strategy below it does its part unchanged: its ``configure_train`` builds the train
    message (FedProx adds ``proximal-mu``, FedOpt remembers the arrays it sent), which the mixin then
    addresses to the round's seeded sample; its ``aggregate_train`` aggregates the checked updates.

    A strategy with more to it overrides these hooks, each once, generally:

    * `train_records`: records sent to one client beside the model (a server control variate);
    * `client_term` (class attribute): its client part, a `clients.terms.LossTerm` composed into every
      local step with the objective and the continual method, which may send records back;
    * `server_update`: the new global model from Flower's aggregate and the clients' replies (records
      included), where the strategy also updates its own state;
    * `evaluation_arrays`: the model evaluated and saved, when it is not the one the clients train;
    * `client_models`: the models of the per-client view, when clients train different models (their
      train messages carry them: `train_records` may replace the ``arrays`` record);
    * `STATE`: names of the attributes that are the strategy's state (optimiser moments, variates),
      checkpointed with every round, so a resumed run continues exactly.
    """

    #: ``strategy.options`` this strategy accepts; the config checks them before any work.
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    #: Attributes holding the server's state across rounds (and tasks): saved in every checkpoint.
    STATE: ClassVar[tuple[str, ...]] = ()
    #: The client part (`clients.terms.LossTerm` subclass), or None for a server-only strategy.
    client_term: ClassVar[type | None] = None
    #: Whether ``strategy.options`` are the Flower strategy's constructor arguments (False: the options
    #: are fedtail's own, read by `server_update` or the client part, as SCAFFOLD's and FedLC's).
    flower_options: ClassVar[bool] = True

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
        self._bytes_down = 0
        self.last_sums: dict[str, dict[str, np.ndarray]] = {}
        """The round's ``sums:`` reply records summed over its aggregated clients (`summed_records`)."""
        semi = SEMISUP.get(cfg.semisup.method)
        options = semi.Options.model_validate(cfg.semisup.options)
        self.semisup_server = None if semi.server is None else semi.server(cfg, options)
        """The semi-supervised method's server part (`clients.semisup.ServerPart`), fed ``last_sums`` and the
        aggregated clients' reply records after each round."""
        self._aggregated: list[int] | None = None
        self._metrics_fn = self.train_metrics_aggr_fn

        def recording_metrics(contents: list[RecordDict], key: str) -> MetricRecord:
            """Flower's metrics aggregation receives exactly the replies its strategy aggregated (Krum's
            and Bulyan's selection included): that is how the kept clients are known without rewriting
            any of Flower's aggregators."""
            self._aggregated = [int(c[P.INFO][P.PARTITION_ID]) for c in contents]
            return self._metrics_fn(contents, key)

        self.train_metrics_aggr_fn = recording_metrics

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
        if not cls.flower_options:
            return {}
        return cls.Options.model_validate(cfg.strategy.options).model_dump()

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        """Why this strategy cannot run with ``cfg`` (checked with the config, before any work), or None;
        the client part's own rules included."""
        term = cls.client_term
        check = getattr(term, "check_config", None)
        return None if check is None else check(cfg)

    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    # ---- the server's state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """The attributes named in `STATE`, as tensors (the checkpoint's ``strategy_state``)."""
        state = {name: _pack(getattr(self, name)) for name in self.STATE}
        if self.semisup_server is not None:
            state[SEMISUP_STATE] = _pack(self.semisup_server.state)
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Resume: set the `STATE` attributes (and the semi-supervised server part's) back to a
        checkpoint's copy."""
        for name in self.STATE:
            if name in state:
                setattr(self, name, _unpack(state[name]))
        if self.semisup_server is not None and SEMISUP_STATE in state:
            self.semisup_server.state = _unpack(state[SEMISUP_STATE])

    # ---- hooks ----------------------------------------------------------------------------------
    def train_records(self, partition_id: int) -> dict[str, ArrayRecord | ConfigRecord]:
        """Records one client's train message carries beside the model (none by default)."""
        return {}

    def update_weight(self, num_examples: float) -> float:
        """An update's weight in the average, from its client's sample count: FedAvg's own by default."""
        return num_examples

    def server_update(
        self, server_round: int, arrays: ArrayRecord | None, replies: list[ClientReply]
    ) -> ArrayRecord | None:
        """The round's new global model from Flower's aggregate ``arrays`` and the aggregated clients'
        ``replies`` (partition order); also where the strategy updates its state. Default: ``arrays``."""
        return arrays

    def client_models(self, arrays: ArrayRecord) -> tuple[list[ArrayRecord], list[int]] | None:
        """The models clients are scored with in the per-client view when they are not all the global
        ``arrays`` (clustered FL: each client's cluster model): the distinct models and each partition
        id's index into them. None (the default): every client is scored with the evaluated model."""
        return None

    def evaluation_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The model the server evaluates and saves, from the global model the clients train (CReFF's
        classifier re-trained on the server over the FedAvg backbone); the global model by default."""
        return arrays

    # ---- Flower's hooks -------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's ``configure_train`` (its strategy adds its settings to the message and keeps what it
        needs for aggregation), then the message goes to the round's seeded sample of partitions
        instead of Flower's (Python's ``random`` over node ids, which differ between engines)."""
        fed = self.cfg.federation
        gr = self.global_round(server_round)
        pids = sample_partitions(
            fed.num_clients, fed.fraction_train, fed.min_train_clients, self.cfg.seed, gr, self.present
        )
        self.last_sampled = pids
        config[P.SERVER_ROUND] = server_round
        config[P.GLOBAL_ROUND] = gr
        self._reference = arrays
        flower = list(super().configure_train(server_round, arrays, config, grid))
        base = (
            dict(flower[0].content)
            if flower
            else {self.arrayrecord_key: arrays, self.configrecord_key: config}
        )
        base.update(self.extra_records)
        if self.semisup_server is not None:
            base.update(self.semisup_server.records())
        messages, down = [], 0
        shared = payload_bytes(RecordDict(base))
        for pid in pids:
            own = self.train_records(pid)
            content = RecordDict({**base, **own})
            down += payload_bytes(content) if own else shared  # own records may replace the model
            messages.append(
                Message(
                    content=content, dst_node_id=self.node_of_partition[pid], message_type=MessageType.TRAIN
                )
            )
        self._bytes_down = down
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        usable: list[tuple[int, Message, Decoded]] = []
        uplink: dict[int, dict[str, Any]] = {}
        missing = len(self.last_sampled) - len(replies)
        failed = [f"{missing} sampled client(s) sent no reply within the timeout"] if missing > 0 else []
        rejected: list[str] = []
        up = 0
        for msg in replies:
            if msg.has_error():
                failed.append(f"node {msg.metadata.src_node_id}: {msg.error.reason}")
                continue
            pid, reason, decoded = self._accept(msg)
            up += payload_bytes(msg.content)
            if reason:
                rejected.append(reason)
            elif int(msg.content[P.METRICS][P.NUM_EXAMPLES]) > 0:
                # Flower's aggregators demand exactly the update and one MetricRecord per reply
                uplink[pid] = {k: msg.content.pop(k) for k in list(msg.content) if k not in _FLOWER_KEYS}
                usable.append((pid, msg, decoded))
        n_failed = max(missing, 0) + sum(m.has_error() for m in replies)
        counts = RoundCounts(
            len(self.last_sampled), len(usable), n_failed, len(rejected), self._bytes_down, up
        )
        self.last_counts = counts
        self.last_sums = summed_records(uplink[pid] for pid, _, _ in usable)
        if self.semisup_server is not None and usable:
            self.semisup_server.update(self.last_sums, [(pid, uplink[pid]) for pid in sorted(uplink)])
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
        self._aggregated = None
        if self._plain_fedavg_aggregation():  # one pass over the arrays decoded for the checks
            arrays = weighted_mean(
                [d for _, _, d in usable],
                [self.update_weight(m.content[P.METRICS][self.weighted_by_key]) for _, m, _ in usable],
            )
            contents = [m.content for _, m, _ in usable]
            if self._metrics_fn is aggregate_metricrecords:
                metrics = weighted_metrics(contents, self.weighted_by_key)
            else:
                metrics = self._metrics_fn(contents, self.weighted_by_key)
            self._aggregated = [pid for pid, _, _ in usable]
        else:  # Flower's aggregation; an adaptive optimiser counts its steps over the whole run
            arrays, metrics = _without_full_collections(
                lambda: super(FedtailStrategy, self).aggregate_train(gr, [m for _, m, _ in usable])
            )
            if arrays is not None and self._reference is not None:
                arrays = in_dtypes_of(arrays, self._reference)
        kept = self._aggregated if arrays is not None and self._aggregated is not None else []
        self.last_counts = counts._replace(
            num_clients=len(kept), kept_clients=" ".join(str(p) for p in sorted(kept))
        )
        arrays = self.server_update(
            server_round,
            arrays,
            [
                ClientReply(pid, float(m.content[P.METRICS][self.weighted_by_key]), d, uplink[pid])
                for pid, m, d in usable
            ],
        )
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
