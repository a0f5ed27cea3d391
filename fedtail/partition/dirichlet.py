"""Dirichlet label skew (Hsu et al. 2019; Yurochkin et al. 2019): the standard non-IID benchmark split.

For every class a share vector ``p ~ Dir(alpha * 1_K)`` over the K clients cuts that class's samples
into consecutive chunks. Small ``alpha`` concentrates each class on few clients; large ``alpha``
approaches IID. The draw is repeated while some client holds fewer than ``min_partition_size`` samples.

This is the algorithm of ``flwr_datasets.partitioner.DirichletPartitioner`` (``self_balancing=False``),
written out here: it takes the pipeline's `numpy.random.Generator` instead of an int seed, needs no
Hugging Face ``datasets`` table, allows more retries and says which config field to change. Given a
generator seeded like that partitioner's, both produce the same split (checked in the tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedtail.registry import PARTITIONERS

if TYPE_CHECKING:
    from fedtail.config import PartitionConfig

MAX_TRIES = 100


def _draw(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """One Dirichlet draw per class (classes in sorted order), each class cut by cumulative shares."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    concentration = np.full(num_clients, alpha, dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        shares = rng.dirichlet(concentration)
        cuts = (np.cumsum(shares) * idx.size).astype(int)[:-1]
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per-client indices into ``labels`` with Dirichlet(``cfg.alpha``) label skew."""
    labels = np.asarray(labels)
    n, minimum = labels.size, cfg.min_partition_size
    if num_clients < 1:
        raise ValueError(f"federation.num_clients must be >= 1; got {num_clients}")
    if num_clients * minimum > n:
        raise ValueError(
            f"partition.min_partition_size={minimum} x federation.num_clients={num_clients} exceeds the "
            f"{n} samples to split (after the long tail); lower partition.min_partition_size "
            f"(at most {n // num_clients}) or federation.num_clients"
        )
    for _ in range(MAX_TRIES):
        parts = _draw(labels, num_clients, cfg.alpha, rng)
        if min(p.size for p in parts) >= minimum:
            return parts
    raise ValueError(
        f"partition.min_partition_size={minimum}: {MAX_TRIES} Dirichlet draws with "
        f"partition.alpha={cfg.alpha} all left some of the federation.num_clients={num_clients} clients "
        f"with fewer samples (of {n}); raise partition.alpha, lower partition.min_partition_size, "
        "or use fewer clients"
    )
