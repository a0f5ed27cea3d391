"""SCAFFOLD: stochastic controlled averaging (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML, Algorithm 1, option II control variates).

The server keeps a control variate c (zero at first, checkpointed with every round) and sends it with
every train message; clients correct their local steps by c - c_i and return Delta c_i
(`clients.terms.scaffold`). The server then steps x <- x + eta_g (mean_i y_i - x) and
c <- c + (1 / N) sum_i Delta c_i over the sampled clients (N every client). The paper's mean over
clients is unweighted (``sample_weighted: false``); ``true`` weights by sample count as FedAvg does.
Both variates travel, so a round sends and receives twice FedAvg's bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from clients.terms.scaffold import DELTA, SERVER_VARIATE, ScaffoldTerm
from fedtail.models import array_from_numpy, array_to_numpy
from fedtail.registry import STRATEGIES, PluginOptions
from strategies.base import ClientReply, FedtailStrategy


def server_variate(c: dict[str, np.ndarray], deltas: list[dict[str, np.ndarray]], n: int) -> dict:
    """c + (1 / N) sum_i Delta c_i (partition order)."""
    out = {k: v.copy() for k, v in c.items()}
    for delta in deltas:
        for k, d in delta.items():
            out[k] = out[k] + d / n if k in out else d / n
    return out


@STRATEGIES.register("scaffold")
class ScaffoldStrategy(FedtailStrategy, FedAvg):
    """SCAFFOLD's server: FedAvg's average, the global step and the server control variate."""

    STATE = ("control",)
    flower_options = False  # its options are fedtail's own, not Flower FedAvg's
    client_term = ScaffoldTerm

    class Options(PluginOptions):
        """SCAFFOLD's settings."""

        global_lr: float = Field(1.0, gt=0.0, le=10.0, description="eta_g, the server's step (paper: 1).")
        sample_weighted: bool = Field(
            False, description="Average the models by sample count (FedAvg's) instead of the paper's mean."
        )

    def __init__(self, cfg, node_of_partition, **kwargs) -> None:
        super().__init__(cfg, node_of_partition, **kwargs)
        self.options = self.Options.model_validate(cfg.strategy.options)
        self.control: dict[str, np.ndarray] = {}
        self._record: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._record = ArrayRecord({k: array_from_numpy(v) for k, v in self.control.items()})
        return super().configure_train(server_round, arrays, config, grid)

    def train_records(self, partition_id: int) -> dict[str, ArrayRecord]:
        return {SERVER_VARIATE: self._record}

    def update_weight(self, num_examples: float) -> float:
        return num_examples if self.options.sample_weighted else 1.0

    def server_update(
        self, server_round: int, arrays: ArrayRecord | None, replies: list[ClientReply]
    ) -> ArrayRecord | None:
        deltas = [
            {k: array_to_numpy(a) for k, a in r.records[DELTA].items()} for r in replies if DELTA in r.records
        ]
        self.control = server_variate(self.control, deltas, self.cfg.federation.num_clients)
        eta = self.options.global_lr
        if arrays is None or eta == 1.0 or self._reference is None:
            return arrays
        x = {k: array_to_numpy(a) for k, a in self._reference.items()}
        return ArrayRecord(
            {
                k: array_from_numpy(np.asarray(x[k] + eta * (array_to_numpy(a) - x[k]), dtype=x[k].dtype))
                for k, a in arrays.items()
            }
        )
