"""IID baseline: a uniform random split, so any skew in the results comes from the long tail alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedtail.registry import PARTITIONERS

if TYPE_CHECKING:
    from fedtail.config import PartitionConfig


@PARTITIONERS.register("iid")
def iid(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffle, then cut into ``num_clients`` parts whose sizes differ by at most one."""
    if num_clients < 1:
        raise ValueError(f"federation.num_clients must be >= 1; got {num_clients}")
    order = rng.permutation(len(labels))
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]
