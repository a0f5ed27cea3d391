"""FedLC: federated learning with logit calibration (Zhang et al., 2022, "Federated Learning with Label
Distribution Skew via Logits Calibration", ICML).

Server: FedAvg. Client: the objective scores the logits calibrated by the client's label counts,
z_c - tau n_c^(-1/4) (`clients.terms.calibration`), which offsets the local bias towards the client's
frequent classes. ``tau`` 1.0, the value public re-implementations default to (FL-bench).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from clients.terms.calibration import FedLCTerm
from fedtail.registry import STRATEGIES, PluginOptions
from strategies.base import FedtailStrategy


@STRATEGIES.register("fedlc")
class FedLCStrategy(FedtailStrategy, FedAvg):
    """FedAvg with FedLC's calibrated local objective."""

    flower_options = False  # its options are fedtail's own, not Flower FedAvg's
    client_term = FedLCTerm

    class Options(PluginOptions):
        """FedLC's calibration strength."""

        tau: float = Field(1.0, gt=0.0, le=100.0)
