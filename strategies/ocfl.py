"""One-shot clustered FL (OCFL: Zuziak, Pellungrini & Rinzivillo, 2024, "One-Shot Clustering for
Federated Learning Under Clustering-Agnostic Assumption"; authors' code MKZuziak/OCFL_IEEE_BigData2024
and the ``energy_oneshot`` strategy of MKZuziak/Clustered-Federated-Learning).

FedAvg until the round to cluster, then one model per cluster:

* each round, the updates of the round's clients, Delta_i = w_i - w_sent (every floating array,
  flattened), give the dissimilarity matrix Gamma_ij = 1 - cos(Delta_i, Delta_j) (zero diagonal) and
  the temperature T = ||Gamma||_F / sqrt(4 n (n - 1)) (in [0, 1]: 1 - cos is at most 2);
* the first round (from the second on) whose temperature exceeds the previous round's is the round to
  cluster: the clients' updates have started to pull apart. Clustering runs once, on Gamma's rows, with
  scikit-learn (``algorithm``: ``hdbscan`` with ``min_cluster_size`` 3, the authors' setting for 15
  clients, or ``meanshift`` at its defaults); every label, HDBSCAN's noise label included, is a cluster.
  MeanShift is the authors' best with every client in the round, but at its defaults it splits two clean
  groups of 3 or 5 clients into 4 to 6 clusters (its bandwidth comes from each point's nearest 30 %),
  so the default here, where a round samples half of 20 clients, is HDBSCAN;
* every cluster model starts as the round's global model; from then on each client is sent its
  cluster's model and each cluster model is the mean of its clients' updates (unweighted as in the
  authors' code; ``sample_weighted: true`` weights by sample count as FedAvg does), server step 1.

The global view (the evaluated ``arrays``) stays the mean over all of the round's updates: rounds.csv's
accuracy columns score it, its client columns score each client with its own cluster's model
(`client_models`), and model.pt is it; the cluster models are the checkpoint's strategy state.

The paper lets every client take part in every round. Under partial participation fedtail assigns a
client that was not in the clustering round (its own rule) the first time it is sampled afterwards:
it is sent the global model, and its update joins the cluster whose mean update in the clustering
round is the most similar in cosine; that round its update counts in the global view only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Literal

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from fedtail import protocol as P
from fedtail.config import FedtailConfig
from fedtail.registry import CONTINUAL, STRATEGIES, PluginOptions
from strategies.base import ClientReply, Decoded, FedtailStrategy, decode, weighted_mean

UNASSIGNED = -1
log = logging.getLogger("fedtail.strategy")


def flat_update(update: Decoded, sent: Decoded) -> np.ndarray:
    """Delta = w - w_sent over the floating arrays (batch-norm counters left out), in float64."""
    parts = [
        (np.asarray(update[k], np.float64) - np.asarray(sent[k], np.float64)).ravel()
        for k in sorted(sent)
        if np.issubdtype(np.asarray(sent[k]).dtype, np.floating)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def dissimilarity(deltas: np.ndarray) -> np.ndarray:
    """Gamma_ij = 1 - cos(Delta_i, Delta_j), zero on the diagonal (a zero update has cosine 0)."""
    norms = np.linalg.norm(deltas, axis=1)
    unit = deltas / np.where(norms > 0, norms, 1.0)[:, None]
    gamma = 1.0 - unit @ unit.T
    np.fill_diagonal(gamma, 0.0)
    return gamma


def temperature(gamma: np.ndarray) -> float:
    """T = ||Gamma||_F / sqrt(4 n (n - 1)); NaN for fewer than two clients."""
    n = gamma.shape[0]
    return float(np.linalg.norm(gamma) / math.sqrt(4 * n * (n - 1))) if n > 1 else math.nan


def cluster(gamma: np.ndarray, algorithm: str, min_cluster_size: int) -> np.ndarray:
    """Cluster labels 0..K-1 of Gamma's rows (scikit-learn); HDBSCAN's noise label is a cluster too."""
    if algorithm == "meanshift":
        from sklearn.cluster import MeanShift

        labels = MeanShift().fit_predict(gamma)
    else:
        from sklearn.cluster import HDBSCAN

        labels = HDBSCAN(min_cluster_size=min(min_cluster_size, len(gamma)), copy=True).fit_predict(gamma)
    _, dense = np.unique(labels, return_inverse=True)
    return dense.astype(np.int64)


@STRATEGIES.register("ocfl")
class OneShotClusteredStrategy(FedtailStrategy, FedAvg):
    """FedAvg, then once the updates' temperature rises, one model per cluster of clients."""

    STATE = ("previous_temperature", "assignment", "cluster_models", "centroids")
    flower_options = False  # its options are fedtail's own, not Flower FedAvg's

    class Options(PluginOptions):
        """OCFL's clustering."""

        algorithm: Literal["hdbscan", "meanshift"] = Field(
            "hdbscan", description="scikit-learn's clustering of the dissimilarity rows."
        )
        min_cluster_size: int = Field(3, ge=2, le=10_000, description="HDBSCAN's smallest cluster.")
        sample_weighted: bool = Field(
            False, description="Average updates by sample count (FedAvg's) instead of the authors' mean."
        )

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        name = f"strategy.name={cfg.strategy.name!r}"
        if cfg.crt.rounds:
            return (
                f"{name} trains one model per cluster, but crt.rounds={cfg.crt.rounds} re-trains the "
                "one global model's classifier: set crt.rounds: 0"
            )
        method = CONTINUAL.get(cfg.continual.method)
        if method.uses_previous_model or method.statistics_rounds(cfg):
            return (
                f"{name} trains one model per cluster, but continual.method={cfg.continual.method!r} "
                "builds on the one global model of the previous task: use a replay method or finetune"
            )
        return None

    def __init__(self, cfg, node_of_partition, **kwargs) -> None:
        super().__init__(cfg, node_of_partition, **kwargs)
        self.options = self.Options.model_validate(cfg.strategy.options)
        self.previous_temperature: float | None = None
        self.assignment: list[int] = []  # cluster of each partition id; UNASSIGNED before clustering
        self.cluster_models: list[ArrayRecord] = []
        self.centroids: list[np.ndarray] = []  # each cluster's mean update in the clustering round
        self._sent: dict[int, int] = {}  # partition id -> cluster whose model it was sent (-1: global)

    @property
    def clustered(self) -> bool:
        return bool(self.cluster_models)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = {pid: self._cluster_of(pid) for pid in self.last_sampled}
        return messages

    def _cluster_of(self, pid: int) -> int:
        return self.assignment[pid] if self.clustered else UNASSIGNED

    def train_records(self, partition_id: int) -> dict[str, ArrayRecord]:
        k = self._cluster_of(partition_id)
        return {} if k == UNASSIGNED else {P.ARRAYS: self.cluster_models[k]}

    def update_weight(self, num_examples: float) -> float:
        return num_examples if self.options.sample_weighted else 1.0

    def server_update(
        self, server_round: int, arrays: ArrayRecord | None, replies: list[ClientReply]
    ) -> ArrayRecord | None:
        if arrays is None or self._reference is None:
            return arrays
        sent = [self._sent.get(r.partition_id, UNASSIGNED) for r in replies]
        models = {k: self._reference if k == UNASSIGNED else self.cluster_models[k] for k in set(sent)}
        references = {k: decode(m) for k, m in models.items()}  # each model sent decoded once
        deltas = np.stack([flat_update(r.arrays, references[k]) for r, k in zip(replies, sent, strict=True)])
        if not self.clustered:
            self._maybe_cluster(server_round, arrays, replies, deltas)
            return arrays
        members: dict[int, list[ClientReply]] = {}
        for reply, k, delta in zip(replies, sent, deltas, strict=True):
            if k == UNASSIGNED:  # not in the clustering round: joins the nearest cluster, next round on
                self.assignment[reply.partition_id] = self._nearest(delta)
            else:
                members.setdefault(k, []).append(reply)
        for k, group in members.items():
            weights = [self.update_weight(r.num_examples) for r in group]
            self.cluster_models[k] = weighted_mean([r.arrays for r in group], weights)
        return arrays

    def _maybe_cluster(
        self, server_round: int, arrays: ArrayRecord, replies: list[ClientReply], deltas: np.ndarray
    ) -> None:
        if len(replies) < 2:
            return
        gamma = dissimilarity(deltas)
        t = temperature(gamma)
        previous = self.previous_temperature
        rising = previous is not None and t > previous
        self.previous_temperature = t
        if not rising:
            return
        labels = cluster(gamma, self.options.algorithm, self.options.min_cluster_size)
        self.assignment = [UNASSIGNED] * self.cfg.federation.num_clients
        for reply, label in zip(replies, labels, strict=True):
            self.assignment[reply.partition_id] = int(label)
        k = int(labels.max()) + 1
        log.info(
            "round %d: the updates' temperature rose (%.4f -> %.4f): %d clients clustered into %d models",
            self.global_round(server_round), previous, t, len(replies), k,
        )  # fmt: skip
        self.cluster_models = [ArrayRecord(dict(arrays.items())) for _ in range(k)]
        self.centroids = [deltas[labels == c].mean(axis=0) for c in range(k)]

    def _nearest(self, delta: np.ndarray) -> int:
        norms = [float(np.linalg.norm(c) * np.linalg.norm(delta)) for c in self.centroids]
        sims = [float(c @ delta) / n if n > 0 else 0.0 for c, n in zip(self.centroids, norms, strict=True)]
        return int(np.argmax(sims))

    def client_models(self, arrays: ArrayRecord) -> tuple[list[ArrayRecord], list[int]] | None:
        if not self.clustered:
            return None
        # index 0: the global model, for clients not assigned yet; cluster k at k + 1
        return [arrays, *self.cluster_models], [k + 1 for k in self.assignment]
