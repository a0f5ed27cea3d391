"""One-shot clustered FL (strategies.ocfl): the dissimilarity and temperature, the round it clusters in,
one model per cluster afterwards (sent per client, averaged per cluster) and the per-client view."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedtail import protocol as P
from fedtail.config import ConfigError, build_config
from fedtail.datasets.base import Splits
from fedtail.engines.inprocess import set_server_identity
from fedtail.models import array_to_numpy
from server.evaluation import Evaluator
from strategies.base import ClientReply
from strategies.ocfl import OneShotClusteredStrategy, dissimilarity, temperature

N = 6


def test_dissimilarity_and_temperature_on_a_tiny_case() -> None:
    deltas = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    gamma = dissimilarity(deltas)
    np.testing.assert_allclose(gamma, [[0, 0, 1], [0, 0, 1], [1, 1, 0]], atol=1e-12)
    assert temperature(gamma) == pytest.approx(2.0 / math.sqrt(4 * 3 * 2))  # ||Gamma||_F = 2
    opposite = dissimilarity(np.array([[1.0, 1.0], [-1.0, -1.0]]))
    assert temperature(opposite) == pytest.approx(1.0)  # the largest: 1 - cos = 2 off the diagonal


class Nodes:
    def get_node_ids(self) -> list[int]:
        return [100 + i for i in range(N)]


def _model(w: list[float]) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.array(w, np.float32))})


def _strategy(**options) -> OneShotClusteredStrategy:
    set_server_identity()
    cfg = build_config(
        {
            "federation": {"num_clients": N, "fraction_train": 1.0},
            "strategy": {"name": "ocfl", "options": options},
        }
    )
    return OneShotClusteredStrategy.from_config(cfg, {i: 100 + i for i in range(N)})


def _round(strategy: OneShotClusteredStrategy, rnd: int, model: ArrayRecord, deltas: list[list[float]]):
    messages = list(strategy.configure_train(rnd, model, ConfigRecord(), Nodes()))
    sent = {int(m.metadata.dst_node_id) - 100: array_to_numpy(m.content[P.ARRAYS]["w"]) for m in messages}
    replies = [
        ClientReply(pid, 10.0, {"w": (sent[pid] + np.array(d, np.float32))}, {})
        for pid, d in enumerate(deltas)
    ]
    return sent, strategy.server_update(rnd, model, replies)


def test_it_clusters_once_in_the_first_round_whose_temperature_rises() -> None:
    strategy = _strategy()
    model = _model([0.0, 0.0])
    group_a, group_b = [[1.0, 0.1], [1.0, 0.0], [0.9, 0.0]], [[0.0, 1.0], [0.1, 1.0], [0.0, 0.9]]
    _round(strategy, 1, model, group_a + group_a)  # all alike: T ~ 0
    t1 = strategy.previous_temperature
    assert not strategy.clustered and t1 is not None
    _round(strategy, 2, model, [[1.0, 0.0]] * N)  # T falls to 0: no clustering
    assert not strategy.clustered and strategy.previous_temperature <= t1
    _round(strategy, 3, model, group_a + group_b)  # the updates pull apart: T rises, cluster now
    assert strategy.clustered
    assert strategy.assignment[:3] == [strategy.assignment[0]] * 3
    assert strategy.assignment[3:] == [strategy.assignment[3]] * 3
    assert strategy.assignment[0] != strategy.assignment[3]
    for cluster_model in strategy.cluster_models:  # each starts as the round's global model
        np.testing.assert_array_equal(cluster_model["w"].numpy(), model["w"].numpy())

    # afterwards each client is sent its cluster's model and each cluster averages its own clients
    strategy.cluster_models[strategy.assignment[0]] = _model([5.0, 5.0])
    sent, _ = _round(strategy, 4, model, [[1.0, 0.0]] * 3 + [[0.0, 3.0]] * 3)
    np.testing.assert_array_equal(sent[0], [5.0, 5.0])
    np.testing.assert_array_equal(sent[3], [0.0, 0.0])
    np.testing.assert_allclose(strategy.cluster_models[strategy.assignment[0]]["w"].numpy(), [6.0, 5.0])
    np.testing.assert_allclose(strategy.cluster_models[strategy.assignment[3]]["w"].numpy(), [0.0, 3.0])

    models, index = strategy.client_models(model)
    assert len(models) == 3 and index == [k + 1 for k in strategy.assignment]
    resumed = _strategy()
    resumed.load_state_dict(strategy.state_dict())
    assert resumed.assignment == strategy.assignment
    for ours, theirs in zip(resumed.cluster_models, strategy.cluster_models, strict=True):
        np.testing.assert_array_equal(ours["w"].numpy(), theirs["w"].numpy())


def test_a_client_absent_from_the_clustering_round_joins_the_nearest_cluster() -> None:
    strategy = _strategy()
    strategy.cluster_models = [_model([0.0, 0.0]), _model([1.0, 1.0])]
    strategy.centroids = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    strategy.assignment = [0, 0, 1, 1, -1, -1]
    sent, _ = _round(strategy, 5, _model([3.0, 3.0]), [[1.0, 0.0]] * 4 + [[0.1, 2.0], [2.0, 0.1]])
    np.testing.assert_array_equal(sent[4], [3.0, 3.0])  # not assigned yet: the global model
    assert strategy.assignment[4:] == [1, 0]
    np.testing.assert_allclose(strategy.cluster_models[0]["w"].numpy(), [1.0, 0.0])  # its members only


def test_the_per_client_view_scores_each_client_with_its_own_model() -> None:
    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w.T

    x = np.eye(2, dtype=np.float32).repeat(5, axis=0)
    y = np.repeat([0, 1], 5)
    counts = np.array([[10, 0], [0, 10]])
    ev = Evaluator(Linear(), Splits(x, y, x, y), torch.device("cpu"), client_counts=counts)
    says_0 = ArrayRecord({"w": Array(np.array([[1, 1], [0, 0]], np.float32))})  # always 0
    says_1 = ArrayRecord({"w": Array(np.array([[0, 0], [1, 1]], np.float32))})  # always 1
    result = ev.evaluate(says_0, [0, 1], [[0, 1]])
    np.testing.assert_allclose(result["client_accuracies"], [1.0, 0.0])
    view = ev.per_client_view(result, [says_0, says_1], [0, 1], [0, 1])
    np.testing.assert_allclose(view["client_accuracies"], [1.0, 1.0])
    assert view["client_accuracy_worst10"] == 1.0 and view["balanced_accuracy"] == result["balanced_accuracy"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [({"crt": {"rounds": 2}}, "crt.rounds=2"), ({"continual": {"method": "lwf"}}, "continual.method='lwf'")],
)
def test_ocfl_refuses_what_needs_one_global_model_naming_both(overrides: dict, named: str) -> None:
    with pytest.raises((ValueError, ConfigError), match=rf"strategy.name='ocfl'.*{named}"):
        build_config({"strategy": {"name": "ocfl"}, **overrides})
