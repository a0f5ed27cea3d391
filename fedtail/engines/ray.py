"""Ray engine: Flower's simulation runtime (`flwr.simulation.run_simulation`), one ClientApp actor per
``engine.cpus_per_client`` CPUs. The path that scales out onto a Ray cluster; costs ~10 s of start-up.

By default it starts a private local Ray whose servers (GCS, raylet, object manager, workers, agents)
listen on 127.0.0.1 only; ``engine.ray_address`` joins an existing cluster instead.

Each ClientApp call runs through `TimedClientApp`, which gives it at most ``engine.timeout`` seconds on a
thread inside the actor, as the in-process engine does: without it a hung client keeps Flower's worker
waiting on its actor, and `run_simulation` never returns after the last round. A client's exceptions,
exits and non-replies become error replies there too.

``engine.timeout`` is also Flower's round timeout here (the strategy passes it to ``send_and_receive``):
the server stops waiting for a round's replies after it, and a reply that comes later is dropped
(missing, not an error reply). Clients run in parallel actors, so a call that waited for a free actor can
miss the round's deadline even though the call itself stayed within its limit.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtail.config import FedtailConfig
from fedtail.engines.inprocess import ThreadRunner
from fedtail.registry import ENGINES

# Ray binds its servers to the node IP it resolves; on Linux that is the machine's address, with servers
# on all interfaces, unless its "cluster" mode is off (then the node IP is localhost and every server binds
# 127.0.0.1). `ray._private.ray_constants` reads this at import, so it is set there too.
RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class TimedClientApp(ClientApp):
    """The ClientApp at ``ref``, each call limited to ``timeout`` seconds (see `ThreadRunner`).

    Pickled to the Ray actors as (ref, timeout); each actor process keeps its own worker thread.
    """

    def __init__(self, ref: str, timeout: float | None) -> None:
        super().__init__()
        self.ref = ref
        self.timeout = timeout
        self._runner: ThreadRunner | None = None

    def __reduce__(self):
        return TimedClientApp, (self.ref, self.timeout)

    def __call__(self, message: Message, context: Context) -> Message:
        if self._runner is None:
            self._runner = ThreadRunner(self.ref, self.timeout)
        reply, updated = self._runner(message, context)
        if updated is not None:
            vars(context).update(vars(updated))  # Flower sends this Context object back to the node
        return reply


@contextlib.contextmanager
def loopback_ray() -> Iterator[None]:
    """While inside, a Ray started in this process (and its child processes) listens on loopback only."""
    import ray
    from ray._private import ray_constants, services

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; set engine.ray_address to join it")
    old_env, old_flag = os.environ.get(RAY_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        node_ip = services.get_node_ip_address()
        if not ipaddress.ip_address(node_ip).is_loopback:
            raise RuntimeError(f"a local Ray would listen on {node_ip}, not on loopback; not starting it")
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(RAY_CLUSTER_ENV, None)
        else:
            os.environ[RAY_CLUSTER_ENV] = old_env


@ENGINES.register("ray")
def run_ray(server_app: ServerApp, client_app_ref: str, cfg: FedtailConfig) -> None:
    from flwr.simulation import run_simulation

    gpus = 0.0
    if cfg.engine.device in ("auto", "cuda"):
        import torch

        gpus = 1.0 / max(cfg.federation.num_clients, 1) if torch.cuda.is_available() else 0.0
    address = cfg.engine.ray_address
    init_args = {
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        "include_dashboard": False,
        # "local" always starts a new Ray, even if RAY_ADDRESS is exported: joining a cluster is explicit.
        "address": address or "local",
    }
    stop = threading.Event()
    with loopback_ray() if address is None else contextlib.nullcontext():
        try:
            run_simulation(
                server_app=_stoppable(server_app, stop),
                client_app=TimedClientApp(client_app_ref, cfg.engine.timeout),
                num_supernodes=cfg.federation.num_clients,
                backend_config={
                    "client_resources": {"num_cpus": cfg.engine.cpus_per_client, "num_gpus": gpus},
                    "init_args": init_args,
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
