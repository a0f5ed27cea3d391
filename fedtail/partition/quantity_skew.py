"""Quantity skew: clients of very different sizes, every client's samples otherwise IID.

Client sizes follow shares ``p`` over the K clients, drawn either

- ``dirichlet``: ``p ~ Dir(beta * 1_K)``, NIID-Bench's "quantity skew" (Li et al., "Federated Learning
  on Non-IID Data Silos: An Experimental Study", ICDE 2022, ``iid-diff-quantity``; small ``beta``, few
  large clients), or
- ``lognormal``: ``w_k ~ LogNormal(0, sigma)``, ``p = w / sum(w)``, FedLab's unbalanced split
  (``lognormal_unbalance_partition``, the ``unbalance_sgm`` of its CIFAR10Partitioner), a synthetic
  stand-in for the heavy-tailed client sizes of natural partitions such as LEAF's (Caldas et al.
  2018); ``sigma = 0`` gives equal sizes (the mean of ``log w`` cancels in ``p``).

Every client first gets ``m = max(1, partition.min_partition_size)`` samples, the other ``n - K m`` are
shared out in proportion to ``p`` by largest remainder (ties: the lower client). This guarantees the
floor without redrawing: NIID-Bench and FedLab's Dirichlet variant redraw ``p`` until every client
has 10 samples (a conditional law, and a loop that can run forever), FedLab's log-normal variant floors
the sizes and gives the shortfall to one client. Then one ``rng.permutation`` of the samples is cut at
the cumulative sizes: the split flwr's ``SizePartitioner`` makes of a shuffled dataset given these
sizes (checked in the tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from fedtail.partition import _largest_remainder, declare
from fedtail.registry import PARTITIONERS, PluginOptions

if TYPE_CHECKING:
    from fedtail.config import PartitionConfig


class Options(PluginOptions):
    """``distribution`` of the client shares; ``beta``: its Dirichlet concentration (NIID-Bench: 0.5);
    ``sigma``: its log-normal spread (FedLab's examples: 0.3). Only the chosen one's parameter is used."""

    distribution: Literal["dirichlet", "lognormal"] = "dirichlet"
    beta: float = Field(0.5, gt=0.0, le=1e6)
    sigma: float = Field(0.3, ge=0.0, le=10.0)


def _describe(cfg: PartitionConfig) -> dict[str, Any]:
    opts = Options.model_validate(cfg.options)
    spread = {"beta": opts.beta} if opts.distribution == "dirichlet" else {"sigma": opts.sigma}
    return {"distribution": opts.distribution, **spread, "min_partition_size": max(1, cfg.min_partition_size)}


def client_sizes(
    n: int, num_clients: int, opts: Options, min_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Per client, how many of the ``n`` samples it gets: ``min_size`` each, the rest by the drawn shares
    (largest remainder). Takes one ``dirichlet`` or ``lognormal`` call from ``rng``."""
    if num_clients * min_size > n:
        raise ValueError(
            f"partition.min_partition_size={min_size} x federation.num_clients={num_clients} exceeds the "
            f"{n} samples to split (after the long tail); allowed: partition.min_partition_size at most "
            f"{n // num_clients}, or fewer clients"
        )
    if opts.distribution == "dirichlet":
        shares = rng.dirichlet(np.full(num_clients, opts.beta, dtype=np.float64))
    else:
        weights = rng.lognormal(0.0, opts.sigma, size=num_clients)
        shares = weights / weights.sum()
    rest = n - num_clients * min_size
    group = np.zeros(num_clients, dtype=np.int64)
    return min_size + _largest_remainder(group, shares * rest, np.array([rest]))


@PARTITIONERS.register("quantity_skew")
@declare(Options, describe=_describe)
def quantity_skew(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per-client indices into ``labels``: client sizes skewed, labels IID within each client."""
    opts = Options.model_validate(cfg.options)
    n = np.asarray(labels).size
    if num_clients < 1:
        raise ValueError(f"federation.num_clients must be >= 1; got {num_clients}")
    sizes = client_sizes(n, num_clients, opts, max(1, cfg.min_partition_size), rng)
    order = rng.permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]
