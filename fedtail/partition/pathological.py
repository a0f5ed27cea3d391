"""Pathological label skew: every client holds exactly ``num_classes_per_partition`` classes.

"#C = k" of NIID-Bench (Li et al., "Federated Learning on Non-IID Data Silos: An Experimental Study",
ICDE 2022), as ``flwr_datasets.partitioner.PathologicalPartitioner`` implements it, whose parameters
and behaviour this follows. First each client is given its classes (``class_assignment_mode``):

- ``random``: ``num_classes_per_partition`` distinct classes drawn uniformly per client;
- ``deterministic``: client ``k`` holds classes ``(k + i) mod C`` for ``i < num_classes_per_partition``;
- ``first-deterministic`` (the paper's): class ``k mod C`` first, the rest drawn one at a time until
  distinct.

Then every class is cut into as many nearly equal consecutive chunks (``np.array_split``, index order)
as clients hold it, the j-th chunk to the j-th such client. A class no client holds is left out (flwr
warns; the pipeline drops it like the long tail), which ``random`` mode with few clients can do;
``first-deterministic`` with at least as many clients as classes uses every class.

RNG: flwr draws from ``np.random.default_rng(seed)`` with ``rng.choice`` over the sorted class list
(``size=1`` per try, or ``size=m, replace=False`` per client); the same calls here on a generator
seeded alike give the same assignment (checked in the tests).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from fedtail.partition import declare
from fedtail.registry import PARTITIONERS, PluginOptions

if TYPE_CHECKING:
    from fedtail.config import PartitionConfig


log = logging.getLogger(__name__)


class Options(PluginOptions):
    """``num_classes_per_partition``: classes per client (NIID-Bench's #C); ``class_assignment_mode``:
    how clients get their classes (flwr's default ``random``; the paper's ``first-deterministic``)."""

    num_classes_per_partition: int = Field(2, ge=1, le=100_000)
    class_assignment_mode: Literal["random", "deterministic", "first-deterministic"] = "random"


def assign_classes(
    num_classes: int, num_clients: int, per_client: int, mode: str, rng: np.random.Generator
) -> np.ndarray:
    """clients x classes bool matrix: which (positions of the sorted) classes each client holds."""
    holds = np.zeros((num_clients, num_classes), dtype=bool)
    if mode == "deterministic":
        rows = np.arange(num_clients)[:, None]
        holds[rows, (rows + np.arange(per_client)) % num_classes] = True
    elif mode == "random":
        for k in range(num_clients):
            holds[k, rng.choice(num_classes, size=per_client, replace=False)] = True
    elif mode == "first-deterministic":
        for k in range(num_clients):
            holds[k, k % num_classes] = True
            have = 1
            while have < per_client:
                c = rng.choice(num_classes, size=1)[0]
                if not holds[k, c]:
                    holds[k, c] = True
                    have += 1
    else:
        raise ValueError(
            f"partition.options.class_assignment_mode={mode!r}; allowed: random, deterministic, "
            "first-deterministic"
        )
    return holds


@PARTITIONERS.register("pathological")
@declare(Options)
def pathological(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per-client indices into ``labels``, each client holding ``num_classes_per_partition`` classes."""
    opts = Options.model_validate(cfg.options)
    labels = np.asarray(labels)
    if num_clients < 1:
        raise ValueError(f"federation.num_clients must be >= 1; got {num_clients}")
    if num_clients > labels.size:
        raise ValueError(f"federation.num_clients={num_clients} exceeds the {labels.size} samples to split")
    classes, class_sizes = np.unique(labels, return_counts=True)
    m = opts.num_classes_per_partition
    if m > classes.size:
        raise ValueError(
            f"partition.options.num_classes_per_partition={m} exceeds the {classes.size} classes present; "
            f"allowed: 1..{classes.size}"
        )
    holds = assign_classes(classes.size, num_clients, m, opts.class_assignment_mode, rng)
    holders = holds.sum(axis=0)
    over = np.flatnonzero(holders > class_sizes)
    if over.size:
        c = int(over[0])
        raise ValueError(
            f"partition.options.num_classes_per_partition={m} with federation.num_clients={num_clients} "
            f"gives class {classes[c]} to {holders[c]} clients but it has only {class_sizes[c]} samples "
            "(after the long tail); lower federation.num_clients or num_classes_per_partition, or use "
            "partition.options.class_assignment_mode: deterministic (spreads classes evenly)"
        )
    if (holders == 0).any():
        log.warning(
            "partition.method=pathological: no client holds classes %s; their samples are dropped "
            "(partition.options.class_assignment_mode: first-deterministic with at least as many clients "
            "as classes uses every class)",
            classes[holders == 0].tolist(),
        )
    # Sample at position p of its class (index order) goes to array_split chunk j of that class:
    # with n = q * t + r, the first r chunks hold q + 1 samples, the others q.
    by_class = np.argsort(labels, kind="stable")
    class_pos = np.repeat(np.arange(classes.size), class_sizes)
    p = np.arange(labels.size) - (np.cumsum(class_sizes) - class_sizes)[class_pos]
    t = holders[class_pos]
    used = t > 0
    q, r = np.divmod(class_sizes[class_pos][used], t[used])
    big = r * (q + 1)
    pu = p[used]
    chunk = np.where(pu < big, pu // (q + 1), r + (pu - big) // np.maximum(q, 1))
    # the j-th holder of class c, holders listed by class then client
    _, client_of_holder = np.nonzero(holds.T)
    first_holder = np.cumsum(holders) - holders
    client = np.full(labels.size, -1, dtype=np.int64)
    client[by_class[used]] = client_of_holder[first_holder[class_pos[used]] + chunk]
    keep = np.flatnonzero(client >= 0)
    order = keep[np.argsort(client[keep], kind="stable")]
    bounds = np.cumsum(np.bincount(client[keep], minlength=num_clients))[:-1]
    return np.split(order.astype(np.int64), bounds)
