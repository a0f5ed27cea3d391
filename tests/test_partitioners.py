"""The partitioners with options (pathological, shard, quantity_skew): parity with flwr-datasets where
it has the same partitioner, their defining math otherwise, and how `partition.options` is checked."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from fedtail.config import ConfigError, PartitionConfig, build_config
from fedtail.partition import _largest_remainder, _title, client_class_counts, partition_labels
from fedtail.partition.pathological import pathological
from fedtail.partition.quantity_skew import Options as QuantityOptions
from fedtail.partition.quantity_skew import client_sizes, quantity_skew
from fedtail.partition.shard import shard
from fedtail.registry import PARTITIONERS

C = 10


def uneven_labels(seed: int = 1) -> np.ndarray:
    """Class c has 150 + 10 c samples, shuffled (1,950 in all)."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(C), 150 + 10 * np.arange(C)))


def cfg_for(method: str, num_clients: int = 8, **partition: Any):
    return build_config(
        {"seed": 0, "federation": {"num_clients": num_clients}, "partition": {"method": method, **partition}}
    )


def flwr_parts(partitioner: Any, labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Each flwr-datasets partition as sorted indices into ``labels``."""
    datasets = pytest.importorskip("datasets")
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(labels.size)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unused classes, sum of sizes below the data
        return [np.sort(np.asarray(partitioner.load_partition(k)["idx"])) for k in range(num_clients)]


def assert_same_split(mine: list[np.ndarray], theirs: list[np.ndarray], labels: np.ndarray) -> None:
    assert np.array_equal(client_class_counts(labels, mine, C), client_class_counts(labels, theirs, C))
    assert [m.tolist() for m in mine] == [t.tolist() for t in theirs]


def test_plugins_are_registered_with_options() -> None:
    assert {"iid", "dirichlet", "pathological", "shard", "quantity_skew"} <= set(PARTITIONERS.names())
    for name in ("pathological", "shard", "quantity_skew"):
        assert "Options" in vars(PARTITIONERS.get(name)), name


# ---- pathological --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "clients", "per_client", "shuffle"),
    [
        ("random", 8, 2, False),
        ("random", 25, 3, True),
        ("deterministic", 8, 3, False),
        ("deterministic", 13, 1, True),
        ("first-deterministic", 8, 2, False),
        ("first-deterministic", 30, 4, True),
    ],
)
def test_pathological_matches_flwr_datasets(mode: str, clients: int, per_client: int, shuffle: bool) -> None:
    """flwr's PathologicalPartitioner with the same seed: the same clients (its shuffle=True only reorders
    inside a partition)."""
    partitioner_mod = pytest.importorskip("flwr_datasets.partitioner")
    y = uneven_labels()
    ref = partitioner_mod.PathologicalPartitioner(
        num_partitions=clients,
        partition_by="label",
        num_classes_per_partition=per_client,
        class_assignment_mode=mode,
        shuffle=shuffle,
        seed=7,
    )
    theirs = flwr_parts(ref, y, clients)
    options = {"num_classes_per_partition": per_client, "class_assignment_mode": mode}
    mine = pathological(
        y, clients, PartitionConfig(method="pathological", options=options), np.random.default_rng(7)
    )
    assert_same_split(mine, theirs, y)
    held = client_class_counts(y, mine, C) > 0
    assert (held.sum(axis=1) == per_client).all()  # exactly #C classes per client


def test_pathological_errors_name_the_options() -> None:
    y = uneven_labels()
    pc = PartitionConfig(method="pathological", options={"num_classes_per_partition": 11})
    with pytest.raises(
        ValueError, match=r"partition\.options\.num_classes_per_partition=11.*allowed: 1\.\.10"
    ):
        pathological(y, 4, pc, np.random.default_rng(0))
    tiny = np.repeat(np.arange(3), [2, 50, 50])  # class 0 has 2 samples but 3 clients would hold it
    pc = PartitionConfig(method="pathological", options={"num_classes_per_partition": 3})
    with pytest.raises(ValueError, match=r"class 0 to 3 clients but it has only 2 samples"):
        pathological(tiny, 3, pc, np.random.default_rng(0))


# ---- shard ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shards", "size", "keep"),
    [(2, None, False), (2, None, True), (3, 20, False), (None, 37, False), (None, 37, True), (1, 240, False)],
)
def test_shard_matches_flwr_datasets(shards: int | None, size: int | None, keep: bool) -> None:
    partitioner_mod = pytest.importorskip("flwr_datasets.partitioner")
    y = uneven_labels()
    ref = partitioner_mod.ShardPartitioner(
        num_partitions=8,
        partition_by="label",
        num_shards_per_partition=shards,
        shard_size=size,
        keep_incomplete_shard=keep,
        shuffle=True,
        seed=5,
    )
    theirs = flwr_parts(ref, y, 8)
    options = {"num_shards_per_partition": shards, "shard_size": size, "keep_incomplete_shard": keep}
    if shards is not None and size is not None:
        del options["keep_incomplete_shard"]  # no effect there: refused when true
    mine = shard(y, 8, PartitionConfig(method="shard", options=options), np.random.default_rng(5))
    assert_same_split(mine, theirs, y)


def test_shard_sizes_follow_mcmahan() -> None:
    """2 shards of floor(1950 / 16) = 121 consecutive label-sorted samples each: every client holds 242
    samples of at most 4 classes (a shard spans at most 2)."""
    y = uneven_labels()
    parts = shard(y, 8, PartitionConfig(method="shard"), np.random.default_rng(0))
    assert [p.size for p in parts] == [242] * 8
    assert ((client_class_counts(y, parts, C) > 0).sum(axis=1) <= 4).all()


def test_shard_option_rules_are_config_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"partition\.options: shard needs num_shards_per_partition or shard_size"
    ):
        cfg_for("shard", options={"num_shards_per_partition": None})
    with pytest.raises(ConfigError, match=r"partition\.options\.keep_incomplete_shard=true has no effect"):
        cfg_for("shard", options={"shard_size": 10, "keep_incomplete_shard": True})
    y = uneven_labels()
    pc = PartitionConfig(method="shard", options={"num_shards_per_partition": 2, "shard_size": 200})
    with pytest.raises(
        ValueError, match=r"shard_size=200 x num_shards_per_partition=2 x federation\.num_clients=8"
    ):
        shard(y, 8, pc, np.random.default_rng(0))
    pc = PartitionConfig(method="shard", options={"num_shards_per_partition": None, "shard_size": 300})
    with pytest.raises(ValueError, match=r"makes 6 shards.*federation\.num_clients=8.*at most 243"):
        shard(y, 8, pc, np.random.default_rng(0))


def test_pipeline_drops_what_shard_leaves_out() -> None:
    """shard_size 110 alone on the 1,500 samples the long tail keeps (IF 1: 150 per class): 13 full shards
    (5 clients get 2, 3 get 1), the last 70 samples left out as flwr leaves them, and dropped."""
    y = uneven_labels()
    options = {"num_shards_per_partition": None, "shard_size": 110}
    r = partition_labels(y, C, cfg_for("shard", imbalance_factor=1.0, options=options))
    assert r.kept.size == 1430 and r.params["unassigned"] == 70
    assert np.array_equal(np.sort(np.concatenate(r.client_indices)), r.kept)
    assert [p.size for p in r.client_indices] == [220] * 5 + [110] * 3
    assert r.params["partitioner"] == {"shard_size": 110, "keep_incomplete_shard": False}


# ---- quantity skew -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options", [{"distribution": "dirichlet", "beta": 0.3}, {"distribution": "lognormal"}]
)
def test_quantity_skew_is_flwr_size_partitioner_on_a_shuffle(options: dict) -> None:
    """Given the drawn sizes, the clients are what flwr's SizePartitioner cuts from the shuffled data."""
    partitioner_mod = pytest.importorskip("flwr_datasets.partitioner")
    y = uneven_labels()
    pc = PartitionConfig(method="quantity_skew", min_partition_size=3, options=options)
    rng = np.random.default_rng(11)
    sizes = client_sizes(y.size, 12, QuantityOptions(**options), 3, rng)
    order = rng.permutation(y.size)
    shuffled = flwr_parts(partitioner_mod.SizePartitioner([int(s) for s in sizes]), y[order], 12)
    theirs = [np.sort(order[p]) for p in shuffled]
    mine = quantity_skew(y, 12, pc, np.random.default_rng(11))
    assert_same_split(mine, theirs, y)


def test_quantity_skew_sizes_are_the_floor_plus_shares() -> None:
    """size_k = m + largest-remainder share of n - K m by p_k, with p ~ Dir(beta) or normalised
    LogNormal(0, sigma) draws: recomputed here from a generator seeded alike."""
    n, k, m = 1000, 9, 4
    for opts in (QuantityOptions(beta=0.2), QuantityOptions(distribution="lognormal", sigma=1.5)):
        sizes = client_sizes(n, k, opts, m, np.random.default_rng(3))
        rng = np.random.default_rng(3)
        if opts.distribution == "dirichlet":
            p = rng.dirichlet(np.full(k, 0.2))
        else:
            w = rng.lognormal(0.0, 1.5, k)
            p = w / w.sum()
        exact = m + p * (n - k * m)
        assert sizes.sum() == n and sizes.min() >= m
        assert np.abs(sizes - exact).max() < 1  # rounded to a neighbour of the exact share
        assert np.array_equal(np.argsort(-exact, kind="stable")[:3], np.argsort(-sizes, kind="stable")[:3])
    equal = client_sizes(
        1003, 10, QuantityOptions(distribution="lognormal", sigma=0.0), 1, np.random.default_rng(0)
    )
    assert equal.tolist() == [101] * 3 + [100] * 7  # sigma 0: equal shares, the first get the remainder


def test_largest_remainder_rule() -> None:
    """Hamilton's rule: floors, then the largest fractional parts; ties to the earlier item."""
    group = np.array([0, 0, 0, 1, 1])
    got = _largest_remainder(group, np.array([1.5, 2.5, 0.2, 0.5, 0.5]), np.array([5, 1]))
    assert got.tolist() == [2, 3, 0, 1, 0]


def test_quantity_skew_skews_sizes_not_labels() -> None:
    """Small beta: a few big clients (sizes far apart); large beta: nearly equal. Labels stay IID: every
    big client's label mix is close to the data's (total variation)."""
    y = np.random.default_rng(0).permutation(np.repeat(np.arange(C), 2000))
    cv = {}
    for beta in (0.1, 100.0):
        pc = PartitionConfig(method="quantity_skew", min_partition_size=1, options={"beta": beta})
        parts = quantity_skew(y, 20, pc, np.random.default_rng(1))
        sizes = np.array([p.size for p in parts])
        cv[beta] = sizes.std() / sizes.mean()
        counts = client_class_counts(y, parts, C)
        big = counts[sizes >= 500]
        tv = 0.5 * np.abs(big / big.sum(axis=1, keepdims=True) - 1 / C).sum(axis=1)
        assert big.shape[0] >= 1 and tv.max() < 0.1
    assert cv[0.1] > 1.0 > 0.2 > cv[100.0]


def test_quantity_skew_floor_is_checked() -> None:
    y = uneven_labels()
    pc = PartitionConfig(method="quantity_skew", min_partition_size=300)
    with pytest.raises(
        ValueError, match=r"partition\.min_partition_size=300 x federation\.num_clients=8.*at most 243"
    ):
        quantity_skew(y, 8, pc, np.random.default_rng(0))
    parts = quantity_skew(
        y, 8, PartitionConfig(method="quantity_skew", min_partition_size=0), np.random.default_rng(0)
    )
    assert min(p.size for p in parts) >= 1  # the floor is at least one sample


# ---- partition.options in the config -------------------------------------------------------------
def test_options_are_checked_typed_and_filled() -> None:
    cfg = cfg_for("pathological", options={"num_classes_per_partition": 3})
    assert cfg.partition.options == {"num_classes_per_partition": 3, "class_assignment_mode": "random"}
    left_out = {"distribution": "dirichlet", "beta": 0.5, "sigma": 0.3}  # filled like options written out
    assert cfg_for("quantity_skew").partition.options == left_out
    assert cfg_for("dirichlet", alpha=0.1, min_partition_size=2).partition.options == {}


@pytest.mark.parametrize(
    ("partition", "hint"),
    [
        (
            {"method": "pathological", "options": {"classes": 2}},
            "partition.options: unknown option 'classes'; partitioner 'pathological' accepts: "
            "num_classes_per_partition: int = 2",
        ),
        (
            {"method": "pathological", "options": {"class_assignment_mode": "cyclic"}},
            "option 'class_assignment_mode'",
        ),
        (
            {"method": "shard", "options": {"shard_size": 0}},
            "option 'shard_size': Input should be greater than",
        ),
        ({"method": "quantity_skew", "options": {"distribution": "zipf"}}, "option 'distribution'"),
        (
            {"method": "dirichlet", "options": {"alpha": 0.1}},
            "unknown option 'alpha'; partitioner 'dirichlet' accepts: none",
        ),
        ({"method": "iid", "options": {"x": 1}}, "partitioner 'iid' accepts: none"),
        ({"labeled_imbalance_factor": 0.5}, "partition.labeled_imbalance_factor"),
    ],
)
def test_bad_partition_options_name_the_field(partition: dict, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"partition": partition})
    assert hint in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("method", "options", "shown"),
    [
        (
            "pathological",
            {"num_classes_per_partition": 3},
            "num_classes_per_partition=3, class_assignment_mode=random",
        ),
        ("shard", {}, "num_shards_per_partition=2, keep_incomplete_shard=False"),
        ("quantity_skew", {"distribution": "lognormal", "sigma": 0.5}, "distribution=lognormal, sigma=0.5"),
        ("iid", {}, ""),
    ],
)
def test_pipeline_with_each_method(method: str, options: dict, shown: str) -> None:
    y = uneven_labels()
    r = partition_labels(y, C, cfg_for(method, imbalance_factor=5.0, labeled_fraction=0.5, options=options))
    flat = np.concatenate(r.client_indices)
    assert flat.size == np.unique(flat).size and np.array_equal(np.sort(flat), r.kept)
    assert np.array_equal(r.counts, client_class_counts(y, r.client_indices, C))
    assert all(
        m.shape == idx.shape and m.sum() == max(1, int(0.5 * idx.size + 0.5))
        for idx, m in zip(r.client_indices, r.labeled, strict=True)
    )
    title = _title(r.params, r.num_clients, C)
    assert title.splitlines()[1] == (f"{shown}, " if shown else "") + "imbalance factor=5.0"
