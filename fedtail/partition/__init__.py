"""Long-tail subsampling, non-IID client split and labeled/unlabeled split of a training set.

`partition_labels` is the whole pipeline as a pure function of the labels and the config, seeded by
``cfg.seed``: first a global long-tailed profile over classes, then a registered partitioner spreads
the kept samples over clients, then each client's samples are split into labeled and unlabeled.
`write_partition` stores the result in a small folder (the DVC-tracked artifact) that clients read with
`load_client`. Partitioner plug-ins live one per module in this package and register in
`fedtail.registry.PARTITIONERS`; `declare` attaches their ``Options`` (what ``partition.options`` is
checked against), combination rules and the parameters they report.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from fedtail.io import write_json, write_npy, write_text, write_with
from fedtail.registry import PARTITIONERS, PluginOptions
from fedtail.tasks import TaskSchedule

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig, PartitionConfig

log = logging.getLogger(__name__)

Partitioner = Callable[[np.ndarray, int, "PartitionConfig", np.random.Generator], list[np.ndarray]]
"""``(labels of the kept samples, num_clients, cfg.partition, rng) -> per-client indices into labels``.

The parts must be disjoint. A partitioner may leave samples out (flwr's shard and pathological splits
do); `partition_labels` then drops them like the long tail does (``assignment.npy`` holds -1)."""

F = TypeVar("F", bound=Callable[..., Any])

ASSIGNMENT_FILE = "assignment.npy"
LABELED_FILE = "labeled.npy"
SCHEDULE_FILE = "schedule.json"
STATS_FILE = "stats.csv"
HEATMAP_FILE = "heatmap.png"
PARTITION_FILES = (ASSIGNMENT_FILE, LABELED_FILE, SCHEDULE_FILE, STATS_FILE, HEATMAP_FILE)
MANIFEST_FILE = "DONE"
"""Written last (``{"staged": ..., "sha256": {file: digest}}``): the folder is complete and checkable."""

__all__ = [
    "PartitionResult",
    "Partitioner",
    "apply_long_tail",
    "PartitionIndex",
    "client_class_counts",
    "declare",
    "labeled_class_counts",
    "labeled_counts",
    "load_client",
    "load_counts",
    "load_schedule",
    "long_tail_profile",
    "mark_labeled",
    "partition_index",
    "partition_problems",
    "partition_labels",
    "partitioner_params",
    "split_labeled",
    "write_manifest",
    "write_partition",
]


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on numpy arrays is ambiguous
class PartitionResult:
    """One partition of a training set; every index refers to the original training set."""

    kept: np.ndarray
    """Sorted indices that survive the long tail (and that the partitioner assigned to a client)."""
    client_indices: list[np.ndarray]
    """Per client, sorted indices; disjoint, and their union is ``kept``."""
    labeled: list[np.ndarray]
    """Per client, a bool mask aligned with ``client_indices``: True where the label is kept."""
    counts: np.ndarray
    """clients x classes sample counts (labeled or not), int64."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """The settings that produced it (method, the partitioner's parameters, ...), for titles and reports."""

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[1])


# ---- plug-in declarations ------------------------------------------------------------------------
def declare(
    options: type[PluginOptions] | None = None,
    *,
    check: Callable[[PartitionConfig], str | None] | None = None,
    describe: Callable[[PartitionConfig], dict[str, Any]] | None = None,
) -> Callable[[F], F]:
    """Attach to a partitioner function what the other plug-in kinds declare as class attributes.

    ``options``: its ``Options`` model (``partition.options`` is validated against it, as
    ``strategy.options`` is). ``check(cfg.partition)``: why a combination cannot run, or None; run while
    the config is validated. ``describe(cfg.partition)``: its parameters for `PartitionResult.params`
    (default: ``partition.options``).
    """

    def deco(fn: F) -> F:
        if options is not None:
            fn.Options = options  # type: ignore[attr-defined]
        if check is not None:
            fn.check_config = check  # type: ignore[attr-defined]
        if describe is not None:
            fn.describe = describe  # type: ignore[attr-defined]
        return fn

    return deco


def partitioner_params(pc: PartitionConfig) -> dict[str, Any]:
    """The parameters of ``pc.method`` that shape the split (its ``describe``, else its options)."""
    describe = getattr(PARTITIONERS.get(pc.method), "describe", None)
    return dict(describe(pc)) if describe is not None else dict(pc.options)


# ---- pure steps ----------------------------------------------------------------------------------
def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional; got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids; got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got range [{y.min()}, {y.max()}]")
    return y


def _flatten(client_indices: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All clients' indices in client order (int64) and each client's size."""
    parts = [np.asarray(idx, dtype=np.int64) for idx in client_indices]
    sizes = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
    flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return flat, sizes


def _largest_remainder(group: np.ndarray, exact: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Integer parts of ``exact`` summing to ``target[g]`` over the items of each group ``g``.

    Hamilton's largest-remainder rule: every item gets ``floor(exact)``; each group's shortfall goes one
    each to its items with the largest fractional parts, ties to the earlier item. One stable lexsort
    for all groups at once, instead of a Python loop per group.
    """
    base = np.floor(exact).astype(np.int64)
    frac = exact - base
    have = np.bincount(group, weights=base, minlength=target.size).astype(np.int64)
    missing = np.asarray(target, dtype=np.int64) - have
    order = np.lexsort((-frac, group))  # lexsort is stable: equal remainders keep item order
    sizes = np.bincount(group, minlength=target.size)
    start = np.cumsum(sizes) - sizes
    rank = np.arange(order.size) - start[group[order]]
    extra = np.zeros(exact.size, dtype=np.int64)
    extra[order] = rank < missing[group[order]]
    return base + extra


def long_tail_profile(
    num_classes: int,
    n_max: int,
    imbalance_factor: float,
    profile: str = "exponential",
    step_fraction: float = 0.5,
) -> np.ndarray:
    """Per-class counts of a long-tailed training set; class 0 is the head (``n_max``).

    ``exponential`` (CIFAR-LT, Cui et al. 2019): ``n_max * IF ** (-c / (C-1))``, the tail ``n_max / IF``.
    ``step`` (Buda et al. 2018; Cao et al. 2019): the last ``floor(step_fraction * C)`` classes are
    minority classes with ``n_max / IF`` samples each, the others keep ``n_max``. Counts are floored; one
    class gives ``[n_max]``. A relative 1e-9 guard keeps exact values (9 * 243 ** -0.4 = 0.999...) from
    flooring one short.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    if n_max < 0:
        raise ValueError(f"n_max must be >= 0; got {n_max}")
    if imbalance_factor < 1:
        raise ValueError(f"partition.imbalance_factor must be >= 1; got {imbalance_factor}")
    if profile not in ("exponential", "step"):
        raise ValueError(f"partition.profile={profile!r}; allowed: exponential, step")
    if not 0.0 < step_fraction < 1.0:
        raise ValueError(f"partition.step_fraction must be in (0, 1); got {step_fraction}")
    if num_classes == 1:
        return np.array([n_max], dtype=np.int64)
    if profile == "step":
        minority = int(np.floor(step_fraction * num_classes))
        exponents = np.r_[np.zeros(num_classes - minority), -np.ones(minority)]
    else:
        exponents = -np.arange(num_classes, dtype=np.float64) / (num_classes - 1)
    raw = n_max * np.power(float(imbalance_factor), exponents)
    return np.minimum(np.floor(raw * (1 + 1e-9)), n_max).astype(np.int64)


def apply_long_tail(
    labels: np.ndarray,
    num_classes: int,
    imbalance_factor: float,
    rng: np.random.Generator,
    profile: str = "exponential",
    step_fraction: float = 0.5,
) -> np.ndarray:
    """Sorted int64 indices of a seeded long-tailed subset of ``labels``.

    ``n_max`` is the *smallest* class count available, so every class can supply its target and the
    realised ratio head/tail is exactly the profile's, whatever imbalance the raw data already has.
    Hence ``imbalance_factor == 1`` keeps ``n_min`` samples of every class: a balanced subsample.
    """
    y = _check_labels(labels, num_classes)
    by_class = [np.flatnonzero(y == c) for c in range(num_classes)]
    n_max = min(len(idx) for idx in by_class)
    counts = long_tail_profile(num_classes, n_max, imbalance_factor, profile, step_fraction)
    chosen = [rng.choice(idx, size=int(n), replace=False) for idx, n in zip(by_class, counts, strict=True)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def client_class_counts(labels: np.ndarray, client_indices: list[np.ndarray], num_classes: int) -> np.ndarray:
    """clients x classes int64 matrix of how many samples of each class every client holds (one
    bincount over ``client * num_classes + label``)."""
    y = _check_labels(labels, num_classes)
    flat, sizes = _flatten(client_indices)
    client = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    cells = np.bincount(client * num_classes + y[flat], minlength=sizes.size * num_classes)
    return cells.astype(np.int64, copy=False).reshape(sizes.size, num_classes)


def labeled_counts(
    counts: np.ndarray,
    labeled_fraction: float,
    labeled_imbalance_factor: float | None = None,
    profile: str = "exponential",
    step_fraction: float = 0.5,
) -> np.ndarray:
    """clients x classes: how many of each client's samples of each class keep their label.

    Without ``labeled_imbalance_factor`` the split is stratified inside each client: class ``c`` gets
    ``floor(f * n_c)`` labels and the remainder up to ``round(f * n)`` goes to the classes with the
    largest fractional parts (ties: the lower class), so a client's labeled subset keeps its class mix.

    With it (semi-supervised long tail, e.g. DASO, Oh et al. 2022; CReST, Wei et al. 2021; ACR, Wei &
    Gan 2023: a labeled set with its own imbalance factor beside an unlabeled set with the data's), the
    global labeled count of class ``c`` is ``L_c = min(long_tail_profile(C, N_1, IF_l)[c], K_c)`` with
    ``N_1 = round(f * K_0)``, ``K_c`` the kept samples of class ``c`` (class 0 the head) and the same
    profile as ``partition.profile``. ``L_c`` is spread over clients in proportion to their samples of
    the class, ``L_c * n_kc / K_c``, by largest remainder (ties: the lower client).

    Either way a non-empty client keeps at least one label (without the factor: its target is at
    least 1; with it: its class with the largest share gets one, which can add a label beyond ``L_c``).
    ``round`` rounds halves up.
    """
    if not 0.0 < labeled_fraction <= 1.0:
        raise ValueError(f"partition.labeled_fraction must be in (0, 1]; got {labeled_fraction}")
    counts = np.asarray(counts, dtype=np.int64)
    num_clients, num_classes = counts.shape
    client, cls = np.nonzero(counts)  # row-major: by client, then class
    n = counts[client, cls]
    sizes = counts.sum(axis=1)
    if labeled_imbalance_factor is None:
        rounded = np.floor(labeled_fraction * sizes + 0.5).astype(np.int64)
        target = np.where(sizes > 0, np.maximum(1, rounded), 0)
        quota = _largest_remainder(client, labeled_fraction * n, target)
    else:
        kept = counts.sum(axis=0)
        if kept[0] == 0:
            raise ValueError(
                "partition.labeled_imbalance_factor: no client holds the head class 0 (the partitioner "
                "left it out), so the labeled long tail has no head; use another partition.method or "
                "labeled_imbalance_factor: null"
            )
        head = int(np.floor(labeled_fraction * kept[0] + 0.5))
        if head < 1:
            raise ValueError(
                f"partition.labeled_fraction={labeled_fraction} keeps no label of the head class "
                f"({kept[0]} samples); raise partition.labeled_fraction"
            )
        wanted = long_tail_profile(num_classes, head, labeled_imbalance_factor, profile, step_fraction)
        if wanted.min() < 1:
            raise ValueError(
                f"partition.labeled_imbalance_factor={labeled_imbalance_factor} leaves the labeled tail "
                f"class with no label (the labeled head class has {head} = round(partition.labeled_fraction"
                f" x {kept[0]})); allowed: 1..{head}"
            )
        per_class = np.minimum(wanted, kept)
        exact = per_class[cls] * n / kept[cls]
        by_class = np.argsort(cls, kind="stable")  # group by class; clients stay in order inside
        quota = np.empty(n.size, dtype=np.int64)
        quota[by_class] = _largest_remainder(cls[by_class], exact[by_class], per_class)
        held = np.bincount(client, weights=quota, minlength=num_clients)
        lacking = np.flatnonzero(held[client] == 0)  # items of non-empty clients without a label
        if lacking.size:
            best = lacking[np.lexsort((cls[lacking], -exact[lacking], client[lacking]))]
            first = best[np.r_[True, client[best][1:] != client[best][:-1]]]
            quota[first] += 1
    out = np.zeros_like(counts)
    out[client, cls] = np.minimum(quota, n)
    return out


UNLABELED_DISTRIBUTIONS = ("rest", "consistent", "uniform", "reversed")


def unlabeled_counts(
    available: np.ndarray,
    distribution: str,
    imbalance_factor: float,
    profile: str = "exponential",
    step_fraction: float = 0.5,
) -> np.ndarray:
    """clients x classes: how many of each client's unlabeled samples (``available``, clients x classes)
    to keep so that the unlabeled part has the class distribution ``distribution`` (SimPro's protocol,
    Du et al. 2024, after ACR, Wei & Gan 2023).

    ``rest``: every sample without a label (the default). Otherwise the global unlabeled count of class
    ``c`` is ``U_c = profile(C, M, IF_u)[c]`` (``consistent``: the labeled part's order, class 0 the
    head), ``profile(C, M, IF_u)[C - 1 - c]`` (``reversed``: class 0 the tail) or ``M`` (``uniform``),
    with ``M`` the largest head for which every ``U_c`` fits in the class's available samples; ``U_c``
    is spread over clients in proportion to their available samples of the class (largest remainder,
    ties to the lower client), as `labeled_counts` spreads labels.
    """
    available = np.asarray(available, dtype=np.int64)
    if distribution not in UNLABELED_DISTRIBUTIONS:
        raise ValueError(
            f"partition.unlabeled_distribution={distribution!r}; "
            f"allowed: {', '.join(UNLABELED_DISTRIBUTIONS)}"
        )
    if distribution == "rest":
        return available.copy()
    num_classes = available.shape[1]
    totals = available.sum(axis=0)

    def wanted(head: int) -> np.ndarray:
        if distribution == "uniform":
            return np.full(num_classes, head, dtype=np.int64)
        shape = long_tail_profile(num_classes, head, imbalance_factor, profile, step_fraction)
        return shape[::-1].copy() if distribution == "reversed" else shape

    lo, hi = 0, int(totals.max(initial=0))
    while lo < hi:  # the largest head whose profile fits: wanted(head) grows with head
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if (wanted(mid) <= totals).all() else (lo, mid - 1)
    per_class = wanted(lo)
    client, cls = np.nonzero(available)
    n = available[client, cls]
    exact = per_class[cls] * n / totals[cls]
    by_class = np.argsort(cls, kind="stable")
    quota = np.empty(n.size, dtype=np.int64)
    quota[by_class] = _largest_remainder(cls[by_class], exact[by_class], per_class)
    out = np.zeros_like(available)
    out[client, cls] = np.minimum(quota, n)
    return out


def mark_labeled(
    client_indices: list[np.ndarray], labels: np.ndarray, quota: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per client, a bool mask with ``quota[k, c]`` of client ``k``'s class-``c`` samples marked labeled,
    chosen uniformly at random inside each (client, class) group.

    Vectorised: one uniform key per sample, one lexsort by (group, key), and a sample is labeled when
    its rank inside its group is below the group's quota. ``quota`` is clients x classes.
    """
    quota = np.asarray(quota, dtype=np.int64)
    num_clients, num_classes = quota.shape
    y = _check_labels(labels, num_classes)
    flat, sizes = _flatten(client_indices)
    if sizes.size != num_clients:
        raise ValueError(f"quota has {num_clients} clients, client_indices {sizes.size}")
    client = np.repeat(np.arange(num_clients, dtype=np.int64), sizes)
    group = client * num_classes + y[flat]
    order = np.lexsort((rng.random(flat.size), group))
    per_group = np.bincount(group, minlength=quota.size)
    start = np.cumsum(per_group) - per_group
    rank = np.empty(flat.size, dtype=np.int64)
    rank[order] = np.arange(flat.size) - start[group[order]]
    mask = rank < quota.reshape(-1)[group]
    return np.split(mask, np.cumsum(sizes)[:-1]) if sizes.size else []


def split_labeled(
    client_indices: list[np.ndarray], labels: np.ndarray, labeled_fraction: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per client, a bool mask marking ``labeled_fraction`` of its samples as labeled.

    Stratified inside each client (`labeled_counts` without an imbalance factor: per class
    ``floor(f * n_c)``, the remainder up to ``round(f * n)`` by largest remainder, at least one label per
    non-empty client), the labeled samples drawn by `mark_labeled`. ``f == 1`` marks everything and
    draws nothing. (Since the vectorised version the masks for ``f < 1`` differ from the earlier
    per-client ``rng.choice`` loop's; the counts per client and class are the same.)
    """
    if not 0.0 < labeled_fraction <= 1.0:
        raise ValueError(f"partition.labeled_fraction must be in (0, 1]; got {labeled_fraction}")
    if labeled_fraction == 1.0:
        return [np.ones(np.asarray(idx).size, dtype=bool) for idx in client_indices]
    y = np.asarray(labels)
    flat, _ = _flatten(client_indices)
    num_classes = int(y[flat].max()) + 1 if flat.size else 1
    counts = client_class_counts(y, client_indices, num_classes)
    return mark_labeled(client_indices, y, labeled_counts(counts, labeled_fraction), rng)


def _check_split(parts: list[np.ndarray], n: int, num_clients: int, method: str) -> list[np.ndarray]:
    """A plug-in must return ``num_clients`` disjoint index arrays into ``0..n-1``."""
    if len(parts) != num_clients:
        raise RuntimeError(f"partitioner {method!r} returned {len(parts)} clients, expected {num_clients}")
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n):
        raise RuntimeError(f"partitioner {method!r} returned indices outside 0..{n - 1}")
    if flat.size > n or (flat.size and np.bincount(flat, minlength=n).max() > 1):
        raise RuntimeError(f"partitioner {method!r} did not split the {n} samples into disjoint parts")
    return parts


def partition_labels(labels: np.ndarray, num_classes: int, cfg: FedtailConfig) -> PartitionResult:
    """Long tail, then ``cfg.partition.method`` over ``cfg.federation.num_clients``, then labeled split.

    One generator seeded with ``cfg.seed`` drives the three steps in order, so the same labels and
    config always give the same partition. With ``labeled_fraction == 1`` and no
    ``labeled_imbalance_factor`` every sample is labeled and the last step draws nothing.
    """
    y = _check_labels(labels, num_classes)
    pc = cfg.partition
    num_clients = cfg.federation.num_clients
    present = np.bincount(y, minlength=num_classes)
    if (present == 0).any():
        missing = np.flatnonzero(present == 0).tolist()
        raise ValueError(
            f"dataset.name: classes {missing} have no training samples; cannot build a long tail"
        )
    tail = int(
        long_tail_profile(num_classes, int(present.min()), pc.imbalance_factor, pc.profile, pc.step_fraction)[
            -1
        ]
    )
    if tail < 1:
        raise ValueError(
            f"partition.imbalance_factor={pc.imbalance_factor} leaves the tail class with no samples "
            f"(the smallest class has {present.min()}); allowed: 1..{present.min()}"
        )
    rng = np.random.default_rng(cfg.seed)
    kept = apply_long_tail(y, num_classes, pc.imbalance_factor, rng, pc.profile, pc.step_fraction)
    if num_clients > kept.size:
        raise ValueError(
            f"federation.num_clients={num_clients} exceeds the {kept.size} samples kept after the long tail "
            f"(partition.imbalance_factor={pc.imbalance_factor}); use at most {kept.size} clients "
            "or a smaller imbalance factor"
        )
    partitioner: Partitioner = PARTITIONERS.get(pc.method)
    local = _check_split(partitioner(y[kept], num_clients, pc, rng), kept.size, num_clients, pc.method)
    client_indices = [np.sort(kept[part]) for part in local]
    unassigned = kept.size - sum(part.size for part in local)
    if unassigned:
        log.warning(
            "partition.method=%s left %d of the %d samples kept after the long tail without a client; "
            "they are dropped (assignment -1), as the long tail drops samples",
            pc.method,
            unassigned,
            kept.size,
        )
        kept = np.sort(np.concatenate(client_indices))
    counts = client_class_counts(y, client_indices, num_classes)
    if pc.all_labeled:
        labeled = [np.ones(idx.size, dtype=bool) for idx in client_indices]
    else:
        quota = labeled_counts(
            counts, pc.labeled_fraction, pc.labeled_imbalance_factor, pc.profile, pc.step_fraction
        )
        quota[:, list(pc.novel_classes or [])] = 0  # open world: these classes keep no label anywhere
        labeled = mark_labeled(client_indices, y, quota, rng)
        if pc.unlabeled_distribution != "rest":
            factor = pc.unlabeled_imbalance_factor or pc.labeled_imbalance_factor or pc.imbalance_factor
            keep = unlabeled_counts(
                counts - quota, pc.unlabeled_distribution, factor, pc.profile, pc.step_fraction
            )
            rest = [np.flatnonzero(~mask) for mask in labeled]
            kept_unlabeled = mark_labeled(
                [idx[r] for idx, r in zip(client_indices, rest, strict=True)], y, keep, rng
            )
            for k, (r, chosen) in enumerate(zip(rest, kept_unlabeled, strict=True)):
                stay = labeled[k].copy()
                stay[r[chosen]] = True
                client_indices[k], labeled[k] = client_indices[k][stay], labeled[k][stay]
            kept = np.sort(np.concatenate(client_indices)) if client_indices else kept
            counts = client_class_counts(y, client_indices, num_classes)
    params: dict[str, Any] = {
        "method": pc.method,
        "partitioner": partitioner_params(pc),
        "imbalance_factor": pc.imbalance_factor,
        "profile": pc.profile,
        "labeled_fraction": pc.labeled_fraction,
        "labeled_imbalance_factor": pc.labeled_imbalance_factor,
        "num_clients": num_clients,
        **(
            {"unlabeled_distribution": pc.unlabeled_distribution}
            if pc.unlabeled_distribution != "rest"
            else {}
        ),
        **({"novel_classes": list(pc.novel_classes)} if pc.novel_classes else {}),
        "seed": cfg.seed,
    }
    if pc.profile == "step":
        params["step_fraction"] = pc.step_fraction
    if unassigned:
        params["unassigned"] = unassigned
    return PartitionResult(
        kept=kept, client_indices=client_indices, labeled=labeled, counts=counts, params=params
    )


# ---- on disk -------------------------------------------------------------------------------------
def _stats_csv(counts: np.ndarray) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["client", *range(counts.shape[1]), "total"])
    for k, row in enumerate(counts):
        writer.writerow([f"client_{k}", *row.tolist(), int(row.sum())])
    return buf.getvalue()


def _title(params: Mapping[str, Any], n_clients: int, n_classes: int) -> str:
    """``method: K clients x C classes`` and, below, the partitioner's shape parameters (its floor
    ``min_partition_size`` left out) and the imbalance factor(s)."""
    title = f"{params.get('method', 'partition')}: {n_clients} clients x {n_classes} classes"
    if "partitioner" in params or "imbalance_factor" in params:
        shown = [f"{k}={v}" for k, v in params.get("partitioner", {}).items() if k != "min_partition_size"]
        shown.append(f"imbalance factor={params.get('imbalance_factor', '?')}")
        if params.get("labeled_imbalance_factor") is not None:
            shown.append(f"labeled imbalance factor={params['labeled_imbalance_factor']}")
        title += "\n" + ", ".join(shown)
    return title


def heatmap_writer(
    counts: np.ndarray, title: str, class_names: list[str] | None = None
) -> Callable[[Any], None]:
    """A `write_with` callback drawing clients x classes sample counts (Agg canvas, no pyplot state).

    Log colour scale, so a few large cells do not flatten the rest (empty cells left blank); each class's
    total under its name and each client's total beside its number; the counts in the cells when there
    are few."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    counts = np.asarray(counts)
    n_clients, n_classes = counts.shape
    fig = Figure(figsize=(min(3.5 + 0.65 * n_classes, 18.0), min(2.4 + 0.35 * n_clients, 24.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = np.ma.masked_less_equal(counts, 0)
    top = max(int(counts.max(initial=1)), 2)
    image = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest", norm=LogNorm(1, top))
    ax.set_facecolor("whitesmoke")
    fig.colorbar(image, ax=ax, label="samples (log scale; blank: none)")
    names = class_names or [str(c) for c in range(n_classes)]
    ax.set_xlabel("class (its total)")
    ax.set_xticks(
        range(n_classes), [f"{n}\n({int(t)})" for n, t in zip(names, counts.sum(axis=0), strict=True)]
    )
    ax.tick_params(axis="x", labelsize=7 if n_classes > 20 else 8)
    if n_clients <= 60:
        ax.set_ylabel("client (its total)")
        ax.set_yticks(range(n_clients), [f"{k} ({int(t)})" for k, t in enumerate(counts.sum(axis=1))])
    else:
        ax.set_ylabel("client")
    if n_clients * n_classes <= 400:
        for (k, c), value in np.ndenumerate(counts):
            if value:
                colour = "black" if np.log(value) > np.log(top) * 0.6 else "white"
                ax.text(c, k, str(value), ha="center", va="center", fontsize=7, color=colour)
    ax.set_title(title)
    fig.tight_layout()

    def write(fh: Any) -> None:
        fig.savefig(fh, format="png", dpi=100, metadata={"Software": None})

    return write


def write_partition(
    result: PartitionResult,
    schedule: TaskSchedule,
    num_train: int,
    out_dir: Path,
    class_names: list[str] | None = None,
) -> Path:
    """Write the partition folder atomically, file by file; returns ``out_dir``.

    ``assignment.npy`` (int32 client id per training sample, -1 if dropped by the long tail),
    ``labeled.npy`` (bool per training sample), ``schedule.json``, ``stats.csv`` (counts per client and
    class) and ``heatmap.png``. Per-sample arrays let a client find its data with one ``np.load``.
    """
    out_dir = Path(out_dir)
    n_classes = result.counts.shape[1]
    if class_names is not None and len(class_names) != n_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {n_classes} classes")
    if schedule.num_classes != n_classes:
        raise ValueError(f"schedule covers {schedule.num_classes} classes, the partition {n_classes}")
    if result.kept.size and int(result.kept.max()) >= num_train:
        raise ValueError(f"partition indexes sample {int(result.kept.max())} but num_train={num_train}")
    assignment = np.full(num_train, -1, dtype=np.int32)
    labeled = np.zeros(num_train, dtype=bool)
    for k, (idx, mask) in enumerate(zip(result.client_indices, result.labeled, strict=True)):
        if (assignment[idx] != -1).any():
            raise ValueError(f"client {k} shares samples with an earlier client; partitions must be disjoint")
        assignment[idx] = k
        labeled[idx[mask]] = True
    write_npy(out_dir / ASSIGNMENT_FILE, assignment)
    write_npy(out_dir / LABELED_FILE, labeled)
    write_json(out_dir / SCHEDULE_FILE, schedule.to_dict())
    write_text(out_dir / STATS_FILE, _stats_csv(result.counts))
    write_with(
        out_dir / HEATMAP_FILE,
        heatmap_writer(result.counts, _title(result.params, *result.counts.shape), class_names),
    )
    return out_dir


def write_manifest(partition_dir: Path, **info: Any) -> Path:
    """Write ``DONE`` with ``info`` and the sha256 of every partition file; the loaders check against it."""
    from fedtail.staging import DIGESTS_KEY, file_digests

    digests = file_digests(partition_dir, PARTITION_FILES)
    return write_text(Path(partition_dir) / MANIFEST_FILE, json.dumps({**info, DIGESTS_KEY: digests}) + "\n")


def partition_problems(partition_dir: Path) -> list[str]:
    """What is wrong with a partition folder (no ``DONE``, a file missing or not matching its sha256);
    ``[]`` when it can be used. Checked once per process and file state, so loaders may call it freely."""
    from fedtail.staging import DIGESTS_KEY, manifest_problems

    done = Path(partition_dir) / MANIFEST_FILE
    if not done.is_file():
        return [f"{MANIFEST_FILE} (missing)"]
    try:
        recorded = json.loads(done.read_text())[DIGESTS_KEY]
    except (ValueError, KeyError, TypeError):
        return [f"{MANIFEST_FILE} (no {DIGESTS_KEY} manifest)"]
    return manifest_problems(partition_dir, recorded)


def _need(partition_dir: Path, name: str) -> Path:
    """A file of a partition folder; a folder with a ``DONE`` manifest must match it (never used silently
    once modified or truncated). Folders written by `write_partition` alone have none to check."""
    from fedtail.staging import DataIntegrityError

    path = Path(partition_dir) / name
    if (Path(partition_dir) / MANIFEST_FILE).is_file() and (problems := partition_problems(partition_dir)):
        raise DataIntegrityError(
            f"partition folder {partition_dir} does not match its {MANIFEST_FILE} manifest: "
            f"{', '.join(problems)}. It was changed after it was written; re-run the pipeline "
            "(`fedtail run`, or `fedtail partition` with the same config), which writes it again."
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {partition_dir} is not a partition folder written by write_partition"
        )
    return path


@dataclass(frozen=True, eq=False)
class PartitionIndex:
    """Every client's training-set indices, from one pass over ``assignment.npy``: loading a client then
    costs O(its samples), not O(all samples) plus parsing ``stats.csv`` (O(clients)) each time."""

    order: np.ndarray
    """Training-set indices grouped by client, ascending within a client (dropped samples first)."""
    bounds: np.ndarray
    """Client ``k``'s indices are ``order[bounds[k]:bounds[k + 1]]``."""
    labeled: np.ndarray
    """The labeled mask per training sample."""

    @property
    def num_clients(self) -> int:
        return len(self.bounds) - 1

    def client(self, client_id: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.order[self.bounds[client_id] : self.bounds[client_id + 1]]
        return idx, self.labeled[idx]


_INDEX_FILES = (MANIFEST_FILE, ASSIGNMENT_FILE, LABELED_FILE, STATS_FILE)
_indexes: dict[str, tuple[tuple, PartitionIndex]] = {}


def _signature(folder: str, names: tuple[str, ...]) -> tuple | None:
    """Size, mtime and inode of the files (None if one is missing): a changed file changes it."""
    try:
        stats = [os.stat(os.path.join(folder, n)) for n in names]
    except FileNotFoundError:
        return None
    return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in stats)


def partition_index(partition_dir: Path) -> PartitionIndex:
    """The folder's `PartitionIndex`, built once per process and file state (files checked against the
    ``DONE`` manifest when built; a file changed afterwards changes the state, so it is checked again)."""
    key = os.path.abspath(partition_dir)
    signature = _signature(key, _INDEX_FILES)
    hit = _indexes.get(key)
    if signature is not None and hit is not None and hit[0] == signature:
        return hit[1]
    num_clients = load_counts(partition_dir).shape[0]  # an empty last client is absent from assignment
    assignment = np.load(_need(partition_dir, ASSIGNMENT_FILE))
    labeled = np.load(_need(partition_dir, LABELED_FILE))
    order = np.argsort(assignment, kind="stable").astype(np.int64)
    bounds = np.searchsorted(assignment[order], np.arange(num_clients + 1))
    index = PartitionIndex(order=order, bounds=bounds, labeled=labeled)
    if signature is not None:
        _indexes[key] = (signature, index)
    return index


def load_client(partition_dir: Path, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted training-set indices of ``client_id`` and their labeled mask."""
    index = partition_index(partition_dir)
    if not 0 <= client_id < index.num_clients:
        raise IndexError(
            f"client {client_id} out of range; {partition_dir} holds clients 0..{index.num_clients - 1}"
        )
    return index.client(client_id)


def labeled_class_counts(
    partition_dir: Path, y_train: np.ndarray, num_classes: int, all_samples: bool = False
) -> np.ndarray:
    """clients x classes counts of each client's *labeled* samples (what a client trains on; with
    ``all_samples``, every sample: the all-labels upper bound), from the partition and the training
    labels in one pass, without loading any client's data."""
    index = partition_index(partition_dir)
    n = index.num_clients
    idx = index.order[index.bounds[0] : index.bounds[-1]]
    client = np.repeat(np.arange(n, dtype=np.int64), np.diff(index.bounds))
    keep = np.ones(len(idx), dtype=bool) if all_samples else index.labeled[idx]
    y = np.asarray(y_train[idx[keep]], dtype=np.int64)
    return np.bincount(client[keep] * num_classes + y, minlength=n * num_classes).reshape(n, num_classes)


def load_schedule(partition_dir: Path) -> TaskSchedule:
    return TaskSchedule.from_dict(json.loads(_need(partition_dir, SCHEDULE_FILE).read_text()))


def load_counts(partition_dir: Path) -> np.ndarray:
    """clients x classes int64 counts from ``stats.csv`` (the ``total`` column dropped)."""
    with _need(partition_dir, STATS_FILE).open(newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    if header[0] != "client" or header[-1] != "total":
        raise ValueError(f"{partition_dir}/{STATS_FILE}: unexpected header {header}")
    return np.array([[int(v) for v in row[1:-1]] for row in body], dtype=np.int64).reshape(
        len(body), len(header) - 2
    )
