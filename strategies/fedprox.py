"""FedProx: clients minimise their loss plus (mu / 2) ||w - w^t||^2 (Li et al., 2020, "Federated Optimization
in Heterogeneous Networks", MLSys, eq. 2).

Flower's ``FedProx`` sends ``proximal-mu`` with every train message; the client part
(`clients.terms.proximal`) adds the term to every local step. Default mu 0.01, from the paper's grid
{0.001, 0.01, 0.1, 1} (it picks mu per dataset).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx
from pydantic import Field

from clients.terms.proximal import ProximalTerm
from fedtail.registry import STRATEGIES, PluginOptions
from strategies.base import FedtailStrategy


@STRATEGIES.register("fedprox")
class FedProxStrategy(FedtailStrategy, FedProx):
    """Flower's FedProx with its client part."""

    client_term = ProximalTerm

    class Options(PluginOptions):
        """Flower's ``FedProx`` argument."""

        proximal_mu: float = Field(0.01, gt=0.0, le=100.0)
