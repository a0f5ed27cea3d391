"""Dirichlet label skew (Hsu et al. 2019; Yurochkin et al. 2019): the standard non-IID benchmark split.

For every class a share vector ``p ~ Dir(alpha * 1_K)`` over the K clients cuts that class's samples
into consecutive chunks. Small ``alpha`` concentrates each class on few clients; large ``alpha``
approaches IID. The draw is repeated while some client holds fewer than ``min_partition_size`` samples.

This is the algorithm of ``flwr_datasets.partitioner.DirichletPartitioner`` (``self_balancing=False``),
written out here: it takes the pipeline's `numpy.random.Generator` instead of an int seed, needs no
Hugging Face ``datasets`` table, allows more retries and says which config field to change. Given a
generator seeded like that partitioner's (``np.random.default_rng(seed)``), both produce the same split
(checked in the tests): one ``rng.dirichlet`` call per class present, classes in ascending order, per
draw, and nothing else taken from the generator.

Vectorised: a draw's client sizes come from the cut points alone (O(classes x clients)), so a draw
that leaves a client short costs no index work; only the accepted draw assigns a client to each sample
(one ``searchsorted`` over all classes' cuts, one stable argsort). A draw that is hopeless for the
configuration (tiny ``alpha``, large ``min_partition_size``, many clients) is recognised after a few
draws and refused at once instead of after ``MAX_TRIES``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtail.partition import declare
from fedtail.registry import PARTITIONERS

if TYPE_CHECKING:
    from fedtail.config import PartitionConfig

MAX_TRIES = 100
"""Draws before giving up (flwr-datasets allows 11)."""
MIN_DRAWS_TO_JUDGE = 5
"""Failed draws seen before the short-client rate is trusted to predict the rest."""
GIVE_UP_BELOW = 1e-3
"""Refuse once the estimated chance that any remaining draw succeeds is below this."""


def _cuts(class_sizes: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """classes x (clients - 1) cut points: class ``c``'s client ``k`` gets its samples
    ``cuts[c, k-1]:cuts[c, k]`` (in index order), exactly as ``np.split`` at flwr's cut points."""
    concentration = np.full(num_clients, alpha, dtype=np.float64)
    cuts = np.empty((class_sizes.size, num_clients - 1), dtype=np.int64)
    for i, size in enumerate(class_sizes.tolist()):
        shares = rng.dirichlet(concentration)
        cuts[i] = np.minimum((np.cumsum(shares) * size).astype(int)[:-1], size)
    return cuts


def _sizes(cuts: np.ndarray, class_sizes: np.ndarray) -> np.ndarray:
    """Per client, the samples a draw gives it (the chunk lengths summed over classes)."""
    edges = np.column_stack([np.zeros(class_sizes.size, dtype=np.int64), cuts, class_sizes])
    return np.diff(edges, axis=1).sum(axis=0)


def _assign(labels: np.ndarray, cuts: np.ndarray, class_sizes: np.ndarray) -> list[np.ndarray]:
    """Per client, its sorted sample indices under ``cuts``.

    Samples sorted by class (stable: index order inside a class) sit at global positions; class ``c``
    starts at ``start[c]``, so its cuts shifted by ``start[c]`` and all classes' shifted cuts form one
    sorted array. A sample at position ``p`` of class ``c`` has ``c * (K - 1)`` cuts of earlier classes
    below it, hence client ``searchsorted(all cuts, p, 'right') - c * (K - 1)``.
    """
    num_clients = cuts.shape[1] + 1
    by_class = np.argsort(labels, kind="stable")
    start = np.cumsum(class_sizes) - class_sizes
    shifted = (cuts + start[:, None]).reshape(-1)
    class_pos = np.repeat(np.arange(class_sizes.size, dtype=np.int64), class_sizes)
    positions = np.arange(labels.size, dtype=np.int64)
    client = np.empty(labels.size, dtype=np.int64)
    client[by_class] = np.searchsorted(shifted, positions, side="right") - class_pos * (num_clients - 1)
    order = np.argsort(client, kind="stable")  # by client, index order inside each
    bounds = np.cumsum(np.bincount(client, minlength=num_clients))[:-1]
    return np.split(order.astype(np.int64), bounds)


def _success_chance(mean_short: float, draws_left: int) -> float:
    """Chance that at least one of ``draws_left`` draws leaves no client short, taking the number of
    short clients per draw as Poisson with the observed mean: P(none short) ~ exp(-mean)."""
    p_one = math.exp(-mean_short)
    return -math.expm1(draws_left * math.log1p(-p_one)) if p_one < 1.0 else 1.0


def _describe(cfg: PartitionConfig) -> dict[str, Any]:
    return {"alpha": cfg.alpha, "min_partition_size": cfg.min_partition_size}


@PARTITIONERS.register("dirichlet")
@declare(describe=_describe)
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
    _, class_sizes = np.unique(labels, return_counts=True)
    class_sizes = class_sizes.astype(np.int64)
    short_counts: list[int] = []
    for _ in range(MAX_TRIES):
        cuts = _cuts(class_sizes, num_clients, cfg.alpha, rng)
        short = int((_sizes(cuts, class_sizes) < minimum).sum())
        if short == 0:
            return _assign(labels, cuts, class_sizes)
        short_counts.append(short)
        mean_short = sum(short_counts) / len(short_counts)
        left = MAX_TRIES - len(short_counts)
        if (
            len(short_counts) >= MIN_DRAWS_TO_JUDGE
            and left
            and _success_chance(mean_short, left) < GIVE_UP_BELOW
        ):
            raise ValueError(
                f"partition.alpha={cfg.alpha} with partition.min_partition_size={minimum} and "
                f"federation.num_clients={num_clients}: over {len(short_counts)} Dirichlet draws, on average "
                f"{mean_short:.1f} of the clients (fewest {min(short_counts)}) got fewer than {minimum} of "
                f"the {n} samples, so the remaining {left} draws would almost surely fail too "
                f"(P(no client short) ~ exp(-{mean_short:.1f}) per draw); raise partition.alpha (each class "
                "then spreads over more clients), lower partition.min_partition_size, or use fewer clients"
            )
    raise ValueError(
        f"partition.min_partition_size={minimum}: {MAX_TRIES} Dirichlet draws with "
        f"partition.alpha={cfg.alpha} all left some of the federation.num_clients={num_clients} clients "
        f"with fewer samples (of {n}); raise partition.alpha, lower partition.min_partition_size, "
        "or use fewer clients"
    )
