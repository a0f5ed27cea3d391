"""What FedAdam, FedYogi and FedAdagrad share: Flower's ``FedOpt`` state and settings."""

from __future__ import annotations

from pydantic import Field

from fedtail.registry import PluginOptions


class FedOptOptions(PluginOptions):
    """Flower's ``FedOpt`` arguments but ``eta_l``: Flower only logs it; the clients' step size is
    ``train.lr``."""

    eta: float = Field(0.01, gt=0.0, le=10.0)
    beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    beta_2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0, le=1.0)


class AdagradOptions(PluginOptions):
    """Flower's ``FedAdagrad`` arguments but ``eta_l`` (only logged by Flower)."""

    eta: float = Field(0.01, gt=0.0, le=10.0)
    tau: float = Field(1e-3, gt=0.0, le=1.0)


FEDOPT_STATE = ("m_t", "v_t")
"""Flower's FedOpt moments, checkpointed with every round (its ``current_arrays`` is set from the model
sent every round). Bias correction counts the run's global round (`FedtailStrategy.aggregate_train`), so
the moments and their correction carry over the tasks as one optimiser's."""
