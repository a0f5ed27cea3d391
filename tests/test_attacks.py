"""Byzantine clients: each attack's corruption on a tiny case, the seeded choice of attackers, and an
attacked federation that a robust aggregator withstands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.attacks import attackers
from fedtail.config import ConfigError, build_config
from fedtail.registry import ATTACKS

X = {"w": np.array([1.0, 2.0], np.float32), "n": np.array([3], np.int64)}
Y = {"w": np.array([2.0, 0.0], np.float32), "n": np.array([4], np.int64)}


def _corrupt(name: str, **options) -> dict[str, np.ndarray]:
    attack = ATTACKS.get(name)
    return attack(attack.Options.model_validate(options)).corrupt(X, Y, np.random.default_rng(0))


def test_each_attack_corrupts_the_update_as_defined() -> None:
    np.testing.assert_allclose(_corrupt("sign_flip", scale=2.0)["w"], [1.0 - 2.0, 2.0 + 4.0])  # x - s (y - x)
    np.testing.assert_allclose(_corrupt("scaling", factor=10.0)["w"], [11.0, -18.0])  # x + f (y - x)
    noisy = _corrupt("gaussian", sigma=0.5)["w"]
    np.testing.assert_allclose(noisy, X["w"] + np.random.default_rng(0).normal(0, 0.5, 2).astype(np.float32))
    np.testing.assert_array_equal(_corrupt("none")["w"], Y["w"])
    for name in ("sign_flip", "scaling", "gaussian"):
        out = _corrupt(name)
        assert out["w"].dtype == np.float32 and out["n"].tolist() == [4]  # integer buffers untouched


def test_attackers_are_a_seeded_fixed_share() -> None:
    chosen = attackers(0, 20, 0.2)
    assert len(chosen) == 4 and chosen == attackers(0, 20, 0.2) and chosen != attackers(1, 20, 0.2)
    assert attackers(0, 20, 0.0) == frozenset()


def test_an_attack_without_attackers_is_refused_and_off_leaves_fingerprints_alone() -> None:
    with pytest.raises(ConfigError, match=r"attack.name='sign_flip' with attack.fraction=0.01"):
        build_config({"attack": {"name": "sign_flip", "fraction": 0.01}})
    plain = build_config({})
    assert (
        build_config({"attack": {"fraction": 0.5}}).experiment_fingerprint() == plain.experiment_fingerprint()
    )
    assert (
        build_config({"attack": {"name": "scaling"}}).experiment_fingerprint()
        != plain.experiment_fingerprint()
    )


def test_multikrum_withstands_sign_flippers_that_stall_fedavg(project: Path) -> None:
    """Two of ten clients flip their updates (scale 4): FedAvg's average update nearly cancels, Multi-Krum
    told to tolerate two attackers keeps the honest run's accuracy; clients.csv says who attacked."""
    from tests.conftest import smoke_run

    common = {
        "tasks.classes_per_task": None,
        "federation.num_clients": 10,
        "federation.rounds_per_task": 5,
        "partition.alpha": 1.0,
    }
    attack = {"attack.name": "sign_flip", "attack.options": {"scale": 4.0}}
    krum = {"strategy.name": "multikrum", "strategy.options": {"num_malicious_nodes": 2}}
    fedavg_dir, fedavg = smoke_run(project, "attacked-fedavg", **common, **attack)
    _, robust = smoke_run(project, "attacked-multikrum", **common, **attack, **krum)
    _, honest = smoke_run(project, "honest-fedavg", **common)
    assert robust["final_balanced_accuracy"] > fedavg["final_balanced_accuracy"] + 0.15
    assert robust["final_balanced_accuracy"] > honest["final_balanced_accuracy"] - 0.05
    clients = pd.read_csv(fedavg_dir / "clients.csv")
    assert clients["attacker"].sum() == 2
