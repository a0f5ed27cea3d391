"""FedBR: local learning bias reduction (Guo, Tang & Lin, 2023, "FedBR: Improving Federated Learning on
Heterogeneous Data via Local Learning Bias Reduction", ICML; official code LINs-lab/FedBR).

Server: FedAvg for the model, and for FedBR's projection layer (the official code averages it with the
model's state); it builds the shared pseudo-data once and sends them with every round. Client: the
classifier and feature bias reduction terms (`clients.terms.fedbr`, which names the equations).

The pseudo-data: ``num_pseudo`` samples (32: the official code makes as many as its batch size, so
each pseudo-sample pairs with one real sample of a batch; fedtail's batch is 32 too), each picked, as
the official ``get_augmentation_mean_data`` picks them, from a client chosen at random (here among the first
round's) as one of that client's means of ``samples_per_pseudo`` (10) random samples. Checkpointed with
the projection layer, fixed for the run. Defaults are the official ``FedBR.update``'s: mu 0.5, lam 1,
gamma 1, tau1 = tau2 = 2 (they multiply the cosines). The official local optimiser is plain SGD;
fedtail's default keeps ``train.momentum`` 0.9 for every strategy (equal local work in the benchmark):
set ``train.momentum: 0`` to run the official optimiser.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from clients.local import step_seed
from clients.terms.fedbr import MEANS, PROJECTOR, PSEUDO, FedBRTerm, projector
from fedtail.models import array_from_numpy, array_to_numpy
from fedtail.registry import STRATEGIES, PluginOptions
from strategies.base import ClientReply, FedtailStrategy, weighted_mean

_PSEUDO_TAG, _PROJECTOR_TAG = 0xB5, 0xB6


def pick_pseudo_data(candidates: list[np.ndarray], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` pseudo-samples: each a random client's (uniform over ``candidates``), then one of its
    candidate means (uniform)."""
    out = []
    for _ in range(count):
        means = candidates[int(rng.integers(len(candidates)))]
        out.append(means[int(rng.integers(len(means)))])
    return np.stack(out)


@STRATEGIES.register("fedbr")
class FedBRStrategy(FedtailStrategy, FedAvg):
    """FedAvg plus FedBR's shared pseudo-data and federated projection layer."""

    STATE = ("pseudo_data", "projection")
    flower_options = False  # its options are fedtail's own, not Flower FedAvg's
    client_term = FedBRTerm

    class Options(PluginOptions):
        """FedBR's weights and temperatures (official names), and its pseudo-data."""

        mu: float = Field(0.5, ge=0.0, le=100.0, description="Weight of the feature (contrastive) term.")
        lam: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the classifier (uniform CE) term.")
        gamma: float = Field(1.0, ge=0.0, le=100.0, description="Scale of the projection layer's step.")
        tau1: float = Field(
            2.0, gt=0.0, le=100.0, description="Multiplies cos(local, global) pseudo-features."
        )
        tau2: float = Field(2.0, gt=0.0, le=100.0, description="Multiplies cos(pseudo, real) local features.")
        num_pseudo: int = Field(32, ge=1, le=100_000, description="Shared pseudo-samples.")
        samples_per_pseudo: int = Field(10, ge=1, le=100_000, description="Real samples averaged into one.")

    def __init__(self, cfg, node_of_partition, **kwargs) -> None:
        super().__init__(cfg, node_of_partition, **kwargs)
        self.options = self.Options.model_validate(cfg.strategy.options)
        self.pseudo_data: np.ndarray | None = None
        self.projection: ArrayRecord | None = None
        self._records: dict[str, ArrayRecord] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.projection is None:
            dim = int(arrays["classifier.weight"].shape[1])
            seed = step_seed(self.cfg.seed, _PROJECTOR_TAG)
            with torch.random.fork_rng(devices=[]):  # seeded, without moving the process's own stream
                torch.manual_seed(seed)
                layer = projector(dim)
            self.projection = ArrayRecord(
                {k: array_from_numpy(v.numpy()) for k, v in layer.state_dict().items()}
            )
        self._records = {PROJECTOR: self.projection}
        if self.pseudo_data is not None:
            self._records[PSEUDO] = ArrayRecord({"x": array_from_numpy(self.pseudo_data)})
        return super().configure_train(server_round, arrays, config, grid)

    def train_records(self, partition_id: int) -> dict[str, ArrayRecord]:
        return self._records

    def server_update(
        self, server_round: int, arrays: ArrayRecord | None, replies: list[ClientReply]
    ) -> ArrayRecord | None:
        trained = [r for r in replies if PROJECTOR in r.records]
        if trained:
            self.projection = weighted_mean(
                [{k: array_to_numpy(a) for k, a in r.records[PROJECTOR].items()} for r in trained],
                [self.update_weight(r.num_examples) for r in trained],
            )
        candidates = [array_to_numpy(r.records[MEANS]["x"]) for r in replies if MEANS in r.records]
        if self.pseudo_data is None and candidates:
            rng = np.random.default_rng([self.cfg.seed, _PSEUDO_TAG])
            self.pseudo_data = pick_pseudo_data(candidates, self.options.num_pseudo, rng)
        return arrays
