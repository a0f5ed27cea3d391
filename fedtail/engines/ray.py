"""Ray engine: Flower's simulation runtime (`flwr.simulation.run_simulation`), one ClientApp actor per
``engine.cpus_per_client`` CPUs. The path that scales out onto a Ray cluster; costs ~10 s of start-up."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

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
    stop = threading.Event()
    try:
        run_simulation(
            server_app=_stoppable(server_app, stop),
            client_app=load_client_app(client_app_ref),
            num_supernodes=cfg.federation.num_clients,
            backend_config={
                "client_resources": {"num_cpus": cfg.engine.cpus_per_client, "num_gpus": gpus},
                "init_args": {"logging_level": logging.WARNING, "log_to_driver": True},
            },
        )
    except BaseException:  # Ctrl-C above all: the ServerApp thread must not outlive the simulation
        stop.set()
        raise


def _stoppable(server_app: ServerApp, stop: threading.Event) -> ServerApp:
    """``server_app`` that gives up at its next grid call once ``stop`` is set.

    Flower runs the ServerApp in a non-daemon thread. When Ctrl-C ends the simulation in the main thread,
    that thread keeps waiting for replies from the dead Ray actors (up to ``engine.timeout``) and the
    process cannot exit until it returns.
    """
    app = ServerApp()

    def checked(call: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if stop.is_set():
                raise RuntimeError("simulation interrupted")
            return call(*args, **kwargs)

        return guarded

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        grid.push_messages = checked(grid.push_messages)  # type: ignore[method-assign]
        grid.pull_messages = checked(grid.pull_messages)  # type: ignore[method-assign]
        server_app(grid, context)

    return app
