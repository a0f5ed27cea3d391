"""Shard split of McMahan et al. ("Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017): sort the samples by label, cut them into shards of consecutive samples, and give
every client a few shards drawn at random, so most clients see only a couple of classes.

Parameters and rules are those of ``flwr_datasets.partitioner.ShardPartitioner``:

- ``num_shards_per_partition`` alone: every client gets that many shards of size
  ``floor(n / (clients x shards per client))``; with ``keep_incomplete_shard`` the short last shard is
  one of the shards that can be drawn;
- ``num_shards_per_partition`` and ``shard_size``: that many shards of that size each (needs
  ``shard_size x shards x clients <= n``; ``keep_incomplete_shard`` has no effect, so it is refused);
- ``shard_size`` alone: all ``floor(n / shard_size)`` shards (``ceil`` with ``keep_incomplete_shard``,
  the short last one included) dealt out, the first clients getting one more where they do not divide.

Samples outside the drawn shards are left out (the pipeline drops them like the long tail). The sort
is stable (index order inside a class, as pyarrow's sort in ``datasets.Dataset.sort``), and the shards
are drawn with one ``rng.permutation(usable shards)``, the call flwr makes on
``np.random.default_rng(seed)``: a generator seeded alike gives the same clients (checked in the tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from fedtail.partition import declare
from fedtail.registry import PARTITIONERS, PluginOptions

if TYPE_CHECKING:
    from fedtail.config import PartitionConfig


class Options(PluginOptions):
    """``num_shards_per_partition``: shards per client (McMahan et al.: 2); ``shard_size``: samples per
    shard (null = derived); ``keep_incomplete_shard``: also use the short last shard."""

    num_shards_per_partition: int | None = Field(2, ge=1, le=1_000_000)
    shard_size: int | None = Field(None, ge=1, le=10**9)
    keep_incomplete_shard: bool = False


def check_config(cfg: PartitionConfig) -> str | None:
    """The combinations flwr's ShardPartitioner cannot run or ignores, found before any work."""
    opts = Options.model_validate(cfg.options)
    if opts.num_shards_per_partition is None and opts.shard_size is None:
        return (
            "partition.options: shard needs num_shards_per_partition or shard_size (or both); "
            "allowed: num_shards_per_partition >= 1 and/or shard_size >= 1"
        )
    if (
        opts.num_shards_per_partition is not None
        and opts.shard_size is not None
        and opts.keep_incomplete_shard
    ):
        return (
            "partition.options.keep_incomplete_shard=true has no effect with both "
            "num_shards_per_partition and shard_size set (every client gets full shards); allowed: false, "
            "or drop one of the two"
        )
    return None


def _describe(cfg: PartitionConfig) -> dict[str, Any]:
    return {k: v for k, v in Options.model_validate(cfg.options).model_dump().items() if v is not None}


def shard_plan(n: int, num_clients: int, opts: Options) -> tuple[int, int, np.ndarray]:
    """``(shard_size, usable shards, shards per client)`` for ``n`` samples, or a ValueError naming the
    fields; flwr's arithmetic, case by case."""
    shards, size, keep = opts.num_shards_per_partition, opts.shard_size, opts.keep_incomplete_shard
    too_big = f"; allowed: partition.options.shard_size at most {n // num_clients} for {num_clients} clients"
    if shards is not None:
        per_client = np.full(num_clients, shards, dtype=np.int64)
        if size is None:
            if n < num_clients * shards:
                raise ValueError(
                    f"partition.options.num_shards_per_partition={shards} x federation.num_clients="
                    f"{num_clients} shards exceed the {n} samples to split (after the long tail); allowed: "
                    f"num_shards_per_partition at most {n // num_clients}"
                )
            size = n // (num_clients * shards)
            usable = -(-n // size) if keep else n // size
        else:
            if size * shards * num_clients > n:
                raise ValueError(
                    f"partition.options.shard_size={size} x num_shards_per_partition={shards} x "
                    f"federation.num_clients={num_clients} exceeds the {n} samples to split (after the long "
                    f"tail); allowed: shard_size at most {n // (shards * num_clients)}"
                )
            usable = n // size
    else:
        if size is None:
            raise ValueError("partition.options: shard needs num_shards_per_partition or shard_size")
        usable = -(-n // size) if keep else n // size
        if usable < num_clients:
            raise ValueError(
                f"partition.options.shard_size={size} makes {usable} shards of the {n} samples (after the "
                f"long tail), fewer than federation.num_clients={num_clients}" + too_big
            )
        per_client = np.full(num_clients, usable // num_clients, dtype=np.int64)
        per_client[: usable - int(per_client.sum())] += 1
    return size, usable, per_client


@PARTITIONERS.register("shard")
@declare(Options, check=check_config, describe=_describe)
def shard(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per-client indices into ``labels``: a few random shards of the label-sorted samples each."""
    opts = Options.model_validate(cfg.options)
    labels = np.asarray(labels)
    n = labels.size
    if num_clients < 1:
        raise ValueError(f"federation.num_clients must be >= 1; got {num_clients}")
    if num_clients > n:
        raise ValueError(f"federation.num_clients={num_clients} exceeds the {n} samples to split")
    size, usable, per_client = shard_plan(n, num_clients, opts)
    drawn = rng.permutation(usable)[: int(per_client.sum())]
    owner = np.full(usable, -1, dtype=np.int64)
    owner[drawn] = np.repeat(np.arange(num_clients, dtype=np.int64), per_client)
    by_label = np.argsort(labels, kind="stable")
    shard_of = np.arange(n) // size
    client = np.full(n, -1, dtype=np.int64)
    inside = shard_of < usable
    client[by_label[inside]] = owner[shard_of[inside]]
    keep = np.flatnonzero(client >= 0)
    order = keep[np.argsort(client[keep], kind="stable")]
    bounds = np.cumsum(np.bincount(client[keep], minlength=num_clients))[:-1]
    return np.split(order.astype(np.int64), bounds)
