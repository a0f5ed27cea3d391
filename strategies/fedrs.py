"""FedRS: federated learning with restricted softmax (Li & Zhan, 2021, "FedRS: Federated Learning with
Restricted Softmax for Label Distribution Non-IID Data", KDD).

Server: FedAvg. Client: the logits of the classes the client has no sample of are scaled by ``alpha``
before the objective (`clients.terms.calibration`), so local training pushes the missing classes down
less. ``alpha`` 0.5 by default: 1 is FedAvg, 0 the softmax over the client's own classes only.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from clients.terms.calibration import FedRSTerm
from fedtail.registry import STRATEGIES, PluginOptions
from strategies.base import FedtailStrategy


@STRATEGIES.register("fedrs")
class FedRSStrategy(FedtailStrategy, FedAvg):
    """FedAvg with FedRS's restricted softmax on the clients."""

    flower_options = False  # its options are fedtail's own, not Flower FedAvg's
    client_term = FedRSTerm

    class Options(PluginOptions):
        """FedRS's scaling of the missing classes' logits."""

        alpha: float = Field(0.5, ge=0.0, le=1.0)
