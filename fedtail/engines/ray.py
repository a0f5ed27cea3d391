"""Ray engine: Flower's simulation runtime (`flwr.simulation.run_simulation`), one ClientApp actor per
``engine.cpus_per_client`` CPUs. The path that scales out onto a Ray cluster; costs ~10 s of start-up."""

from __future__ import annotations

import logging

from flwr.serverapp import ServerApp

from fedtail.config import FedtailConfig
from fedtail.engines import load_client_app
from fedtail.registry import ENGINES


@ENGINES.register("ray")
def run_ray(server_app: ServerApp, client_app_ref: str, cfg: FedtailConfig) -> None:
    from flwr.simulation import run_simulation

    gpus = 0.0
    if cfg.engine.device in ("auto", "cuda"):
        import torch

        gpus = 1.0 / max(cfg.federation.num_clients, 1) if torch.cuda.is_available() else 0.0
    run_simulation(
        server_app=server_app,
        client_app=load_client_app(client_app_ref),
        num_supernodes=cfg.federation.num_clients,
        backend_config={
            "client_resources": {"num_cpus": cfg.engine.cpus_per_client, "num_gpus": gpus},
            "init_args": {"logging_level": logging.WARNING, "log_to_driver": True},
        },
    )
