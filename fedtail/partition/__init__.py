"""Long-tail subsampling, non-IID client split and labeled/unlabeled split of a training set.

`partition_labels` is the whole pipeline as a pure function of the labels and the config, seeded by
``cfg.seed``: first a global long-tailed profile over classes, then a registered partitioner spreads
the kept samples over clients, then each client's samples are split into labeled and unlabeled.
`write_partition` stores the result in a small folder (the DVC-tracked artifact) that clients read with
`load_client`. Partitioner plug-ins live one per module in this package and register in
`fedtail.registry.PARTITIONERS`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtail.io import write_json, write_npy, write_text, write_with
from fedtail.registry import PARTITIONERS
from fedtail.tasks import TaskSchedule

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig, PartitionConfig

Partitioner = Callable[[np.ndarray, int, "PartitionConfig", np.random.Generator], list[np.ndarray]]
"""``(labels of the kept samples, num_clients, cfg.partition, rng) -> per-client indices into labels``."""

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
    "labeled_class_counts",
    "load_client",
    "load_counts",
    "load_schedule",
    "long_tail_profile",
    "partition_index",
    "partition_problems",
    "partition_labels",
    "split_labeled",
    "write_manifest",
    "write_partition",
]


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on numpy arrays is ambiguous
class PartitionResult:
    """One partition of a training set; every index refers to the original training set."""

    kept: np.ndarray
    """Sorted indices that survive the long tail."""
    client_indices: list[np.ndarray]
    """Per client, sorted indices; disjoint, and their union is ``kept``."""
    labeled: list[np.ndarray]
    """Per client, a bool mask aligned with ``client_indices``: True where the label is kept."""
    counts: np.ndarray
    """clients x classes sample counts (labeled or not), int64."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """The settings that produced it (method, alpha, ...), for titles and reports."""

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[1])


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
    """clients x classes int64 matrix of how many samples of each class every client holds."""
    y = _check_labels(labels, num_classes)
    counts = np.zeros((len(client_indices), num_classes), dtype=np.int64)
    for k, idx in enumerate(client_indices):
        counts[k] = np.bincount(y[np.asarray(idx, dtype=np.int64)], minlength=num_classes)
    return counts


def split_labeled(
    client_indices: list[np.ndarray], labels: np.ndarray, labeled_fraction: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per client, a bool mask marking ``labeled_fraction`` of its samples as labeled.

    Stratified inside each client: every class gets ``floor(f * n_c)`` labels and the remainder up to
    ``round(f * n)`` goes to the classes with the largest fractional parts, so a client's labeled
    subset keeps its class mix. A non-empty client always keeps at least one label, so no client is
    left without a supervised signal.
    """
    if not 0.0 < labeled_fraction <= 1.0:
        raise ValueError(f"partition.labeled_fraction must be in (0, 1]; got {labeled_fraction}")
    y = np.asarray(labels)
    masks = []
    for idx in client_indices:
        idx = np.asarray(idx, dtype=np.int64)
        mask = np.zeros(idx.size, dtype=bool)
        if idx.size:
            classes, inverse, sizes = np.unique(y[idx], return_inverse=True, return_counts=True)
            exact = labeled_fraction * sizes
            quota = np.floor(exact).astype(np.int64)
            target = max(1, int(np.floor(labeled_fraction * idx.size + 0.5)))
            extra = target - int(quota.sum())
            if extra > 0:
                quota[np.argsort(-(exact - quota), kind="stable")[:extra]] += 1
            for k in range(classes.size):
                pos = np.flatnonzero(inverse == k)
                mask[rng.choice(pos, size=int(min(quota[k], pos.size)), replace=False)] = True
        masks.append(mask)
    return masks


def _check_split(parts: list[np.ndarray], n: int, num_clients: int, method: str) -> list[np.ndarray]:
    """A plug-in must return ``num_clients`` disjoint index arrays covering ``0..n-1``."""
    if len(parts) != num_clients:
        raise RuntimeError(f"partitioner {method!r} returned {len(parts)} clients, expected {num_clients}")
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if flat.size != n or not np.array_equal(np.sort(flat), np.arange(n)):
        raise RuntimeError(f"partitioner {method!r} did not split the {n} samples into disjoint parts")
    return parts


def partition_labels(labels: np.ndarray, num_classes: int, cfg: FedtailConfig) -> PartitionResult:
    """Long tail, then ``cfg.partition.method`` over ``cfg.federation.num_clients``, then labeled split.

    One generator seeded with ``cfg.seed`` drives the three steps in order, so the same labels and
    config always give the same partition.
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
    labeled = split_labeled(client_indices, y, pc.labeled_fraction, rng)
    return PartitionResult(
        kept=kept,
        client_indices=client_indices,
        labeled=labeled,
        counts=client_class_counts(y, client_indices, num_classes),
        params={
            "method": pc.method,
            "alpha": pc.alpha,
            "min_partition_size": pc.min_partition_size,
            "imbalance_factor": pc.imbalance_factor,
            "labeled_fraction": pc.labeled_fraction,
            "num_clients": num_clients,
            "seed": cfg.seed,
        },
    )


# ---- on disk -------------------------------------------------------------------------------------
def _stats_csv(counts: np.ndarray) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["client", *range(counts.shape[1]), "total"])
    for k, row in enumerate(counts):
        writer.writerow([f"client_{k}", *row.tolist(), int(row.sum())])
    return buf.getvalue()


def _heatmap_writer(result: PartitionResult, class_names: list[str] | None) -> Callable[[Any], None]:
    """A `write_with` callback drawing the clients x classes counts (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = result.counts
    n_clients, n_classes = counts.shape
    fig = Figure(figsize=(min(3.0 + 0.6 * n_classes, 18.0), min(2.0 + 0.35 * n_clients, 24.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="samples")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_xticks(
        range(n_classes), class_names or [str(c) for c in range(n_classes)], rotation=45, ha="right"
    )
    if n_clients <= 60:
        ax.set_yticks(range(n_clients), [str(k) for k in range(n_clients)])
    if n_clients * n_classes <= 400:
        threshold = counts.max() / 2 if counts.size else 0
        for (k, c), value in np.ndenumerate(counts):
            colour = "black" if value > threshold else "white"
            ax.text(c, k, str(value), ha="center", va="center", fontsize=7, color=colour)
    p = result.params
    title = f"{p.get('method', 'partition')}: {n_clients} clients x {n_classes} classes"
    if "alpha" in p or "imbalance_factor" in p:
        title += f"\nalpha={p.get('alpha', '?')}, imbalance factor={p.get('imbalance_factor', '?')}"
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
    write_with(out_dir / HEATMAP_FILE, _heatmap_writer(result, class_names))
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


def labeled_class_counts(partition_dir: Path, y_train: np.ndarray, num_classes: int) -> np.ndarray:
    """clients x classes counts of each client's *labeled* samples (what a client trains on), from the
    partition and the training labels in one pass, without loading any client's data."""
    index = partition_index(partition_dir)
    n = index.num_clients
    idx = index.order[index.bounds[0] : index.bounds[-1]]
    client = np.repeat(np.arange(n, dtype=np.int64), np.diff(index.bounds))
    keep = index.labeled[idx]
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
