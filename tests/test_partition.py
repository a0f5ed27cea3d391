"""Partition invariants: long tail, client split, labeled split, and the on-disk round trip."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest

from fedtail.config import PartitionConfig, build_config
from fedtail.partition import (
    PartitionResult,
    _title,
    apply_long_tail,
    client_class_counts,
    labeled_counts,
    load_client,
    load_counts,
    load_schedule,
    long_tail_profile,
    mark_labeled,
    partition_labels,
    split_labeled,
    write_partition,
)
from fedtail.partition import dirichlet as dirichlet_module
from fedtail.partition.dirichlet import dirichlet
from fedtail.partition.iid import iid
from fedtail.registry import PARTITIONERS
from fedtail.tasks import make_schedule

C = 10


def balanced_labels(per_class: int = 200, num_classes: int = C, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def uneven_labels() -> np.ndarray:
    """Raw data that is already imbalanced (class c has 150 + 10 c samples), shuffled."""
    return np.random.default_rng(1).permutation(np.repeat(np.arange(C), 150 + 10 * np.arange(C)))


def cfg_for(method: str = "dirichlet", seed: int = 0, num_clients: int = 8, **partition: object):
    return build_config(
        {
            "seed": seed,
            "federation": {"num_clients": num_clients},
            "partition": {"method": method, **partition},
        }
    )


def mean_label_entropy(counts: np.ndarray) -> float:
    """Mean over non-empty clients of the entropy (nats) of their label distribution."""
    counts = counts[counts.sum(axis=1) > 0]
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(h.mean())


# ---- long tail -----------------------------------------------------------------------------------
def test_profile_matches_cifar10_lt() -> None:
    """CIFAR-10-LT with imbalance 100 (Cui et al. 2019) keeps these per-class counts of 5000."""
    expected = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_profile(10, 5000, 100.0).tolist() == expected


@pytest.mark.parametrize("factor", [1.0, 2.0, 10.0, 50.0])
def test_profile_shape(factor: float) -> None:
    p = long_tail_profile(C, 500, factor)
    assert p.dtype == np.int64
    assert p[0] == 500
    assert p[-1] == int(500 / factor)
    assert np.all(np.diff(p) <= 0)
    assert long_tail_profile(1, 37, factor).tolist() == [37]


def test_profile_exact_values_are_not_floored_short() -> None:
    """243 ** (-c / 5) == 3 ** -c, but 9 * 243 ** -0.4 evaluates to 0.999...; it must stay 1."""
    assert long_tail_profile(6, 9, 243.0).tolist() == [9, 3, 1, 0, 0, 0]
    assert long_tail_profile(C, 100, 10.0)[-1] == 10


def test_step_profile_has_a_minority_share_at_n_max_over_if() -> None:
    """Step imbalance (Buda et al. 2018; Cao et al. 2019, mu = 0.5): half the classes keep n_max, the
    other half n_max / IF; mu sets the minority share (floor(mu C) classes)."""
    assert long_tail_profile(10, 500, 10.0, "step").tolist() == [500] * 5 + [50] * 5
    assert long_tail_profile(10, 500, 100.0, "step", 0.2).tolist() == [500] * 8 + [5] * 2
    assert long_tail_profile(4, 9, 1.0, "step").tolist() == [9] * 4
    with pytest.raises(ValueError, match="allowed: exponential, step"):
        long_tail_profile(4, 9, 2.0, "linear")
    y = uneven_labels()
    kept = apply_long_tail(y, C, 10.0, np.random.default_rng(0), "step", 0.5)
    assert np.bincount(y[kept], minlength=C).tolist() == long_tail_profile(C, 150, 10.0, "step").tolist()


@pytest.mark.parametrize("factor", [1.0, 10.0, 100.0])
def test_long_tail_counts_match_profile_exactly(factor: float) -> None:
    y = uneven_labels()
    kept = apply_long_tail(y, C, factor, np.random.default_rng(0))
    assert kept.dtype == np.int64
    assert np.all(np.diff(kept) > 0)  # sorted, no repeats
    expected = long_tail_profile(C, 150, factor)  # n_max is the smallest available class
    assert np.bincount(y[kept], minlength=C).tolist() == expected.tolist()


def test_imbalance_one_keeps_a_balanced_subsample() -> None:
    kept = apply_long_tail(uneven_labels(), C, 1.0, np.random.default_rng(0))
    assert set(np.bincount(uneven_labels()[kept]).tolist()) == {150}


# ---- partitioners --------------------------------------------------------------------------------
def test_plugins_are_registered() -> None:
    assert {"iid", "dirichlet"} <= set(PARTITIONERS.names())


def test_iid_sizes_differ_by_at_most_one() -> None:
    parts = iid(balanced_labels(), 7, PartitionConfig(method="iid"), np.random.default_rng(0))
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(2000))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    y = balanced_labels()
    entropy = {}
    for alpha in (0.05, 0.5, 100.0):
        pc = PartitionConfig(method="dirichlet", alpha=alpha, min_partition_size=0)
        parts = dirichlet(y, 10, pc, np.random.default_rng(0))
        entropy[alpha] = mean_label_entropy(client_class_counts(y, parts, C))
    assert entropy[0.05] < entropy[0.5] < entropy[100.0]
    assert entropy[0.05] < 1.0  # a few classes per client
    assert entropy[100.0] > 0.98 * np.log(C)  # close to uniform over the 10 classes


def test_dirichlet_respects_min_partition_size() -> None:
    y = balanced_labels()
    pc = PartitionConfig(method="dirichlet", alpha=0.3, min_partition_size=60)
    parts = dirichlet(y, 10, pc, np.random.default_rng(0))
    assert min(p.size for p in parts) >= 60
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(y.size))


def test_dirichlet_impossible_min_size_is_a_clear_error() -> None:
    y = balanced_labels(per_class=10)
    with pytest.raises(ValueError, match=r"partition\.min_partition_size=11 x federation\.num_clients=10"):
        dirichlet(y, 10, PartitionConfig(alpha=0.5, min_partition_size=11), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"partition\.alpha=0\.01.*raise partition\.alpha"):
        dirichlet(y, 10, PartitionConfig(alpha=0.01, min_partition_size=10), np.random.default_rng(0))


@pytest.mark.parametrize(
    ("alpha", "clients", "min_size"), [(0.1, 8, 5), (0.5, 8, 5), (5.0, 8, 5), (0.3, 12, 60), (0.05, 40, 0)]
)
def test_dirichlet_matches_flwr_datasets(alpha: float, clients: int, min_size: int) -> None:
    """Same algorithm as flwr-datasets' DirichletPartitioner: the same seed gives the same clients, also
    when draws are repeated for min_partition_size (0.3 / 12 / 60 needs several)."""
    datasets = pytest.importorskip("datasets")
    partitioner_mod = pytest.importorskip("flwr_datasets.partitioner")
    y = uneven_labels()
    ref = partitioner_mod.DirichletPartitioner(
        num_partitions=clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        shuffle=False,
        seed=3,
    )
    ref.dataset = datasets.Dataset.from_dict({"label": y, "idx": np.arange(y.size)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns on every min_partition_size retry
        theirs = [np.sort(np.asarray(ref.load_partition(k)["idx"])) for k in range(clients)]
    pc = PartitionConfig(method="dirichlet", alpha=alpha, min_partition_size=min_size)
    mine = dirichlet(y, clients, pc, np.random.default_rng(3))
    assert [m.tolist() for m in mine] == [t.tolist() for t in theirs]
    assert np.array_equal(client_class_counts(y, mine, C), client_class_counts(y, theirs, C))


def _reference_draw(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list:
    """The per-class np.split loop the vectorised draw replaced (kept as the reference)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        shares = rng.dirichlet(np.full(num_clients, alpha))
        for k, chunk in enumerate(np.split(idx, (np.cumsum(shares) * idx.size).astype(int)[:-1])):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


@pytest.mark.parametrize(("alpha", "clients"), [(0.01, 50), (0.5, 1), (0.5, 300), (100.0, 7)])
def test_vectorised_dirichlet_equals_the_loop(alpha: float, clients: int) -> None:
    """Client ids from searchsorted over the cuts give the chunks np.split gave, and the generator is left
    in the same state (the pipeline's labeled split draws from it next)."""
    y = np.random.default_rng(2).integers(0, 7, 3000)
    ours, theirs = np.random.default_rng(9), np.random.default_rng(9)
    mine = dirichlet(y, clients, PartitionConfig(alpha=alpha, min_partition_size=0), ours)
    assert [m.tolist() for m in mine] == [t.tolist() for t in _reference_draw(y, clients, alpha, theirs)]
    assert ours.random() == theirs.random()


def test_hopeless_dirichlet_fails_after_a_few_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """alpha 0.001 puts each class on about one of 200 clients: ~190 clients fall short of 20 in every
    draw, so P(success) per draw ~ exp(-190). The loop used to try all MAX_TRIES draws first."""
    draws = []
    real = dirichlet_module._cuts
    monkeypatch.setattr(dirichlet_module, "_cuts", lambda *a: draws.append(1) or real(*a))
    y = balanced_labels(per_class=1000)
    pc = PartitionConfig(alpha=0.001, min_partition_size=20)
    with pytest.raises(ValueError) as err:
        dirichlet(y, 200, pc, np.random.default_rng(0))
    text = str(err.value)
    assert len(draws) == dirichlet_module.MIN_DRAWS_TO_JUDGE < dirichlet_module.MAX_TRIES
    for needle in ("partition.alpha=0.001", "partition.min_partition_size=20", "federation.num_clients=200"):
        assert needle in text, text
    assert "on average" in text and "raise partition.alpha" in text, text


def test_success_chance_is_the_poisson_estimate() -> None:
    """P(some success in r draws) = 1 - (1 - exp(-mean)) ** r."""
    assert dirichlet_module._success_chance(0.0, 3) == 1.0
    assert dirichlet_module._success_chance(2.0, 5) == pytest.approx(1 - (1 - np.exp(-2.0)) ** 5)
    assert dirichlet_module._success_chance(200.0, 95) < 1e-80


# ---- the pipeline --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_pipeline_invariants(method: str) -> None:
    y = uneven_labels()
    cfg = cfg_for(method, imbalance_factor=10.0, alpha=0.3, min_partition_size=10, labeled_fraction=0.5)
    r = partition_labels(y, C, cfg)
    assert np.bincount(y[r.kept], minlength=C).tolist() == long_tail_profile(C, 150, 10.0).tolist()
    assert r.num_clients == 8 and r.num_classes == C
    flat = np.concatenate(r.client_indices)
    assert flat.size == np.unique(flat).size  # disjoint
    assert np.array_equal(np.sort(flat), r.kept)  # complete
    assert min(idx.size for idx in r.client_indices) >= (10 if method == "dirichlet" else 1)
    assert np.array_equal(r.counts, client_class_counts(y, r.client_indices, C))
    assert r.counts.sum() == r.kept.size
    for idx, mask in zip(r.client_indices, r.labeled, strict=True):
        assert mask.dtype == bool and mask.shape == idx.shape
        assert mask.sum() == max(1, int(np.floor(0.5 * idx.size + 0.5)))
    assert r.params["method"] == method and r.params["imbalance_factor"] == 10.0
    expected = {"alpha": 0.3, "min_partition_size": 10} if method == "dirichlet" else {}
    assert r.params["partitioner"] == expected  # iid has no parameters (alpha is not one of them)


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_pipeline_is_deterministic_by_seed(method: str) -> None:
    y = uneven_labels()
    a = partition_labels(y, C, cfg_for(method, seed=4, labeled_fraction=0.3))
    b = partition_labels(y, C, cfg_for(method, seed=4, labeled_fraction=0.3))
    c = partition_labels(y, C, cfg_for(method, seed=5, labeled_fraction=0.3))
    assert np.array_equal(a.kept, b.kept)
    assert all(np.array_equal(x, z) for x, z in zip(a.client_indices, b.client_indices, strict=True))
    assert all(np.array_equal(x, z) for x, z in zip(a.labeled, b.labeled, strict=True))
    assert not np.array_equal(a.kept, c.kept)
    assert any(not np.array_equal(x, z) for x, z in zip(a.client_indices, c.client_indices, strict=True))


def test_too_many_clients_after_long_tail_names_the_fields() -> None:
    y = balanced_labels(per_class=6)  # IF 6 keeps 6+4+...+1 = 28 samples
    with pytest.raises(ValueError, match=r"federation\.num_clients=40.*partition\.imbalance_factor"):
        partition_labels(y, C, cfg_for("iid", num_clients=40, imbalance_factor=6.0))


def test_empty_tail_class_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"partition\.imbalance_factor=50\.0.*allowed: 1\.\.6"):
        partition_labels(balanced_labels(per_class=6), C, cfg_for("iid", imbalance_factor=50.0))


def test_bad_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        partition_labels(np.array([0, 1, 10]), C, cfg_for("iid"))
    with pytest.raises(ValueError, match="no training samples"):
        partition_labels(np.repeat(np.arange(9), 20), C, cfg_for("iid"))


# ---- labeled split -------------------------------------------------------------------------------
def test_split_labeled_is_stratified_with_a_floor_of_one() -> None:
    y = np.array([0] * 50 + [1] * 30 + [2] * 20 + [3])
    clients = [np.arange(0, 101), np.array([100]), np.array([], dtype=np.int64)]
    masks = split_labeled(clients, y, 0.2, np.random.default_rng(0))
    assert [m.size for m in masks] == [101, 1, 0]
    assert masks[0].sum() == 20  # round(0.2 * 101)
    per_class = np.bincount(y[clients[0][masks[0]]], minlength=4)
    assert per_class[:3].tolist() == [10, 6, 4]
    assert masks[1].tolist() == [True]  # a lone sample stays labeled
    full = split_labeled(clients, y, 1.0, np.random.default_rng(0))
    assert all(m.all() for m in full)
    with pytest.raises(ValueError, match="labeled_fraction"):
        split_labeled(clients, y, 0.0, np.random.default_rng(0))


def _per_client_quota(counts: np.ndarray, f: float) -> np.ndarray:
    """The per-client loop that computed the stratified quotas before (the reference)."""
    out = np.zeros_like(counts)
    for k, row in enumerate(counts):
        present = np.flatnonzero(row)
        if present.size:
            exact = f * row[present]
            quota = np.floor(exact).astype(np.int64)
            extra = max(1, int(np.floor(f * row.sum() + 0.5))) - int(quota.sum())
            if extra > 0:
                quota[np.argsort(-(exact - quota), kind="stable")[:extra]] += 1
            out[k, present] = quota
    return out


@pytest.mark.parametrize("f", [0.05, 0.2, 0.5, 0.77, 1.0])
def test_labeled_counts_equal_the_per_client_rule(f: float) -> None:
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 9, (200, 6)) * (rng.random((200, 6)) < 0.6)
    counts[:3] = 0  # empty clients
    assert np.array_equal(labeled_counts(counts, f), _per_client_quota(counts, f))


def test_labeled_imbalance_factor_small_case() -> None:
    """Kept per class (100, 31, 10); f = 0.5 gives the labeled head round(0.5 * 100) = 50, and IF_l = 10
    the exponential profile (50, floor(50 / sqrt 10) = 15, 5), capped by the kept counts. Class 1's 15
    spread as 15 * (20, 10, 1) / 31 = (9.68, 4.84, 0.48): floors 9 + 4 + 0, the 2 left to the largest
    remainders (clients 1, 0); class 2's 5 as (3.5, 1.5): the tie goes to client 0. Client 3 got no
    label from the shares, so its lone class-1 sample keeps its label (16 class-1 labels in all)."""
    counts = np.array([[60, 20, 7], [40, 10, 3], [0, 0, 0], [0, 1, 0]])
    got = labeled_counts(counts, 0.5, labeled_imbalance_factor=10.0)
    assert got.tolist() == [[30, 10, 4], [20, 5, 1], [0, 0, 0], [0, 1, 0]]
    balanced = labeled_counts(counts, 0.5, labeled_imbalance_factor=1.0)  # 50 each, capped at 31 and 10
    assert balanced.tolist() == [[30, 20, 7], [20, 10, 3], [0, 0, 0], [0, 1, 0]]
    # step, mu = 0.7: classes 1-2 are minority classes with 50 / 5 = 10 labels; class 1's 10 as
    # (6.45, 3.23, 0.32): the 1 left goes to client 0, and client 3 again keeps its lone sample's label
    step = labeled_counts(counts, 0.5, labeled_imbalance_factor=5.0, profile="step", step_fraction=0.7)
    assert step.tolist() == [[30, 7, 7], [20, 3, 3], [0, 0, 0], [0, 1, 0]]
    with pytest.raises(ValueError, match=r"partition\.labeled_imbalance_factor=60\.0.*allowed: 1\.\.50"):
        labeled_counts(counts, 0.5, labeled_imbalance_factor=60.0)
    with pytest.raises(ValueError, match=r"partition\.labeled_fraction"):
        labeled_counts(counts, 0.004, labeled_imbalance_factor=2.0)


def test_mark_labeled_draws_exactly_the_quota_uniformly() -> None:
    y = np.array([0] * 6 + [1] * 4 + [0] * 3)
    clients = [np.arange(10), np.arange(10, 13)]
    quota = np.array([[2, 3], [1, 0]])
    hits = np.zeros(13)
    for seed in range(400):
        masks = mark_labeled(clients, y, quota, np.random.default_rng(seed))
        chosen = np.concatenate([idx[m] for idx, m in zip(clients, masks, strict=True)])
        assert np.bincount(y[chosen[chosen < 10]], minlength=2).tolist() == [2, 3]
        assert (chosen >= 10).sum() == 1
        hits[chosen] += 1
    expected = np.r_[[2 / 6] * 6, [3 / 4] * 4, [1 / 3] * 3] * 400
    assert np.abs(hits - expected).max() < 45  # about 5 standard deviations


def test_pipeline_with_a_labeled_imbalance_factor() -> None:
    y = uneven_labels()
    cfg = cfg_for(
        "dirichlet", imbalance_factor=10.0, labeled_fraction=0.4, labeled_imbalance_factor=20.0, alpha=0.3
    )
    r = partition_labels(y, C, cfg)
    labeled_idx = [idx[m] for idx, m in zip(r.client_indices, r.labeled, strict=True)]
    got = client_class_counts(y, labeled_idx, C)
    assert np.array_equal(got, labeled_counts(r.counts, 0.4, 20.0))
    wanted = np.minimum(long_tail_profile(C, 60, 20.0), r.counts.sum(axis=0))  # head round(0.4 * 150)
    extra = got.sum(axis=0) - wanted
    assert extra.min() >= 0 and extra.sum() <= r.num_clients  # only the one-label floor adds labels
    assert all(m.any() for m in r.labeled if m.size)
    assert r.params["labeled_imbalance_factor"] == 20.0
    assert "labeled imbalance factor=20.0" in _title(r.params, r.num_clients, C)


def test_heatmap_title_of_the_default_config_is_unchanged() -> None:
    """The DVC-tracked heatmap of params.yaml must not change: its title reads as before."""
    r = partition_labels(uneven_labels(), C, cfg_for("dirichlet", num_clients=10))
    assert _title(r.params, 10, C) == "dirichlet: 10 clients x 10 classes\nalpha=0.5, imbalance factor=10.0"
    assert _title({}, 3, 2) == "partition: 3 clients x 2 classes"


def test_client_class_counts_is_one_bincount_of_the_loop() -> None:
    y = np.random.default_rng(0).integers(0, C, 500)
    clients = [np.arange(0, 100), np.array([], dtype=np.int64), np.arange(100, 500, 3), np.array([7])]
    loop = np.array([np.bincount(y[idx], minlength=C) for idx in clients])
    assert np.array_equal(client_class_counts(y, clients, C), loop)
    assert client_class_counts(y, [], C).shape == (0, C)


# ---- on disk -------------------------------------------------------------------------------------
def test_write_load_round_trip(tmp_path: Path) -> None:
    y = uneven_labels()
    r = partition_labels(y, C, cfg_for("dirichlet", alpha=0.5, labeled_fraction=0.4))
    schedule = make_schedule(C, 2, shuffle=True, seed=0)
    out = write_partition(r, schedule, y.size, tmp_path / "part", class_names=[f"c{i}" for i in range(C)])
    assert out == tmp_path / "part"
    assignment = np.load(out / "assignment.npy")
    labeled = np.load(out / "labeled.npy")
    assert assignment.dtype == np.int32 and assignment.shape == y.shape
    assert labeled.dtype == bool and labeled.shape == y.shape
    assert (assignment == -1).sum() == y.size - r.kept.size
    assert labeled.sum() == sum(int(m.sum()) for m in r.labeled)
    for k in range(r.num_clients):
        idx, mask = load_client(out, k)
        assert np.array_equal(idx, r.client_indices[k])
        assert np.array_equal(mask, r.labeled[k])
    assert load_schedule(out) == schedule
    assert np.array_equal(load_counts(out), r.counts)
    with (out / "stats.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["client", *map(str, range(C)), "total"]
    assert rows[1][0] == "client_0" and int(rows[1][-1]) == r.client_indices[0].size
    assert (out / "heatmap.png").read_bytes().startswith(b"\x89PNG")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(IndexError, match="out of range"):
        load_client(out, r.num_clients)
    with pytest.raises(ValueError, match="class_names"):
        write_partition(r, schedule, y.size, tmp_path / "bad", class_names=["a"])


def test_empty_last_client_round_trips(tmp_path: Path) -> None:
    y = np.array([0, 1, 1, 0, 1])
    clients = [np.array([0, 2]), np.array([1, 3]), np.array([], dtype=np.int64)]
    labeled = [np.array([True, False]), np.array([True, True]), np.array([], dtype=bool)]
    r = PartitionResult(np.array([0, 1, 2, 3]), clients, labeled, client_class_counts(y, clients, 2))
    out = write_partition(r, make_schedule(2, None, shuffle=False, seed=0), y.size, tmp_path)
    idx, mask = load_client(out, 2)
    assert idx.size == 0 and mask.size == 0
    assert load_client(out, 0)[1].tolist() == [True, False]
    assert np.load(out / "assignment.npy").tolist() == [0, 1, 0, 1, -1]
