"""Ray-actors engine: the in-process engine's Grid, with the ClientApp calls spread over a few long-lived
Ray actors (on one machine or a Ray cluster) in batches, so Ray's per-call cost is paid per actor and
round, not per client message as in Flower's simulation engine (`engine.name=ray`).

`RayActorGrid` is `InProcessGrid` (same messages, same node ids, the nodes' Contexts kept here on the
driver) except for how a round's calls run: its messages are cut into one contiguous chunk per actor,
and each actor runs its chunk's calls one after another and returns the replies with the nodes' new
Contexts in one Ray call. Replies come back in the order the messages were sent, and a call's result
depends only on its message and its node's Context, so every actor count gives the metrics of the
in-process engine; and since the Contexts travel with the calls, client state and resume work as there.

``engine.timeout`` bounds each ClientApp call inside its actor (a call over it gets an error reply, the
actor goes on with the rest of its chunk on a fresh thread, see `ThreadRunner`, and is then replaced so
that the abandoned call stops using its CPUs). An actor that dies (a client calling
``os._exit``, a crashed worker) or does not answer within its chunk's time (chunk length × timeout plus
`SLACK`) is killed and replaced, and its chunk's calls are run again one by one on the actors, so only
the client that failed gets an error reply. Re-running a call is safe: nothing of it was kept.

``engine.actors`` actors (default: the cluster's CPUs / ``engine.cpus_per_client``, at most one per
client) each reserve ``engine.cpus_per_client`` CPUs. ``engine.ray_address`` null starts a private local
Ray listening on 127.0.0.1 only (as the ``ray`` engine does); an address joins that cluster, whose nodes
must be able to import fedtail and read the run's data at the same absolute paths.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from flwr.app import Context, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import ServerApp

from fedtail.config import FedtailConfig
from fedtail.engines import load_client_app
from fedtail.engines.inprocess import (
    InProcessGrid,
    Result,
    ThreadRunner,
    error_reply,
    serve,
    timeout_reply,
)
from fedtail.engines.ray import loopback_ray
from fedtail.registry import ENGINES

SLACK = 30.0  # seconds on top of a chunk's calls for moving it to its actor and back
START_LIMIT = 300.0  # seconds an actor may take to start (import the ClientApp) before the run fails
SHARE_GRACE = 10.0  # seconds (on top of twice the first actor's start) the others get before being dropped

log = logging.getLogger("fedtail")


class ClientActor:
    """Body of one Ray actor: runs batches of ClientApp calls, each limited to ``timeout`` seconds."""

    def __init__(self, ref: str, timeout: float | None) -> None:
        with contextlib.suppress(Exception):  # a failure to load is reported per message by the runner
            load_client_app(ref)
        self.runner = ThreadRunner(ref, timeout)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, batch: list[tuple[Message, Context]]) -> tuple[list[Result], bool]:
        """The calls' results, and whether a call timed out (its thread may still be running here)."""
        results = self.runner.run_batch(batch)
        timed_out = any(
            context is None and reply.has_error() and reply.error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE
            for reply, context in results
        )
        return results, timed_out


class RayActorGrid(InProcessGrid):
    """Grid whose ClientApp calls run on ``actors`` Ray actors (Ray must be initialised by the caller)."""

    def __init__(
        self,
        client_app_ref: str,
        num_nodes: int,
        actors: int,
        timeout: float | None = None,
        cpus_per_actor: float = 1.0,
        gpus_per_actor: float = 0.0,
        run_id: int = 1,
    ) -> None:
        import ray

        super().__init__(client_app_ref, num_nodes, run_id=run_id, timeout=timeout)
        self._options = {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor, "max_restarts": 0}
        self._remote = ray.remote(ClientActor)
        self.actors: list[Any] = []
        try:
            self._start(actors)
        except BaseException:
            self.close()
            raise

    def _start(self, n: int) -> None:
        """Start ``n`` actors and keep those that start: the first may take `START_LIMIT`, the others
        twice its time plus `SHARE_GRACE`; actors still waiting for CPUs then are dropped. A cluster
        shared with other runs (a sweep's workers, other users) is thus shared, instead of every run
        waiting for all of it; results do not depend on the number of actors."""
        import ray

        began = time.monotonic()
        self.actors = [self._new_actor() for _ in range(n)]
        refs = [a.node_id.remote() for a in self.actors]
        first, _ = ray.wait(refs, num_returns=1, timeout=START_LIMIT)
        if not first:
            raise RuntimeError(
                f"ray-actors: none of {n} actors started within {START_LIMIT:g}s (does the cluster have "
                f"{self._options['num_cpus']:g} free CPUs for one?)"
            )
        grace = 2 * (time.monotonic() - began) + SHARE_GRACE
        ready = set(ray.wait(refs, num_returns=n, timeout=grace)[0])
        keep = [i for i, ref in enumerate(refs) if ref in ready]
        for i in set(range(n)) - set(keep):
            with contextlib.suppress(Exception):
                ray.kill(self.actors[i], no_restart=True)
        if len(keep) < n:
            log.warning(
                "ray-actors: %d of %d actors started (the cluster's CPUs are busy); running on %d",
                len(keep),
                n,
                len(keep),
            )
        self.actors = [self.actors[i] for i in keep]
        self.actor_nodes = ray.get([refs[i] for i in keep])

    def _new_actor(self) -> Any:
        return self._remote.options(**self._options).remote(self.client_app_ref, self.timeout)

    def _wait_started(self, actors: list[Any]) -> list[str]:
        """Each actor's Ray node id, once all have loaded the ClientApp."""
        import ray

        refs = [a.node_id.remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=START_LIMIT)
        if len(ready) < len(refs):
            raise RuntimeError(
                f"ray-actors: {len(refs) - len(ready)} of {len(refs)} actors did not start within "
                f"{START_LIMIT:g}s (does the cluster have {self._options['num_cpus']:g} free CPUs per actor?)"
            )
        return ray.get(refs)

    def pull_messages(self, message_ids):
        batch = [self._inbox.pop(i) for i in list(message_ids) if i in self._inbox]
        results = self._run_on_actors(batch)
        for msg, (_, context) in zip(batch, results, strict=True):
            if context is not None:
                self.contexts[msg.metadata.dst_node_id] = context
        return [reply for reply, _ in results]

    def _run_on_actors(self, batch: list[Message]) -> list[Result]:
        """Run ``batch`` as one contiguous chunk per actor; a failed chunk is run again call by call."""
        import ray

        results: list[Result | None] = [None] * len(batch)
        n, k = len(batch), len(self.actors)
        todo = deque(c for c in (list(range(i * n // k, (i + 1) * n // k)) for i in range(k)) if c)
        free = list(range(k))
        running: dict[Any, tuple[int, list[int], float]] = {}  # ref -> (actor, message indices, deadline)
        per_call = float("inf") if self.timeout is None else self.timeout
        while todo or running:
            while todo and free:
                actor, chunk = free.pop(0), todo.popleft()
                payload = [(batch[i], self._context_for(batch[i])) for i in chunk]
                ref = self.actors[actor].run.remote(payload)
                running[ref] = (actor, chunk, time.monotonic() + len(chunk) * per_call + SLACK)
            left = max(0.0, min(d for _, _, d in running.values()) - time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=None if left == float("inf") else left)
            for ref in list(running):
                actor, chunk, deadline = running[ref]
                if ref in ready:
                    del running[ref]
                    try:
                        out, timed_out = ray.get(ref)
                    except ray.exceptions.RayError as ex:
                        self._replace(actor)
                        self._failed(batch, chunk, results, todo, ErrorCode.CLIENT_APP_CRASHED, _reason(ex))
                    else:
                        for i, result in zip(chunk, out, strict=True):
                            results[i] = result
                        if timed_out:  # a fresh actor: the abandoned call must not keep using its CPUs
                            self._replace(actor)
                    free.append(actor)
                elif time.monotonic() >= deadline:
                    del running[ref]
                    self._replace(actor)
                    self._failed(batch, chunk, results, todo, None, "")
                    free.append(actor)
        return results  # type: ignore[return-value]  (every index was filled above)

    def _failed(
        self,
        batch: list[Message],
        chunk: list[int],
        results: list[Result | None],
        todo: deque,
        code: int | None,
        reason: str,
    ) -> None:
        """A chunk whose actor died (``code``) or hung (``code`` None): its one call gets an error reply,
        or its calls are queued again one by one (first, so that they run next)."""
        if len(chunk) > 1:
            todo.extendleft([i] for i in reversed(chunk))
        elif code is None:
            results[chunk[0]] = (timeout_reply(batch[chunk[0]], self.timeout or 0.0), None)
        else:
            results[chunk[0]] = (error_reply(batch[chunk[0]], code, reason), None)

    def _replace(self, actor: int) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.actors[actor], no_restart=True)
        self.actors[actor] = self._new_actor()
        self.actor_nodes[actor] = self._wait_started([self.actors[actor]])[0]

    def close(self) -> None:
        import ray

        super().close()
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors = []


def _reason(ex: Exception) -> str:
    first = str(ex).strip().splitlines()
    return f"client actor failed: {type(ex).__name__}" + (f": {first[0]}" if first else "")


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray initialised for this process: a private local one on loopback (``address`` None) or the
    cluster at ``address``; shut down on exit either way.

    A cluster on this machine's loopback (``127.0.0.1:6379``) is joined in Ray's loopback mode too: in
    its cluster mode Ray replaces a loopback address by the machine's own and would not find it.
    """
    import ray

    args: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    local = address is None or is_loopback_address(address)
    with loopback_ray() if local else contextlib.nullcontext():
        if address is None:
            # "local" always starts a new Ray, even if RAY_ADDRESS is exported: joining a cluster is explicit
            ray.init(address="local", include_dashboard=False, **args)
        else:
            ray.init(address=address, **args)
        try:
            yield
        finally:
            ray.shutdown()


def is_loopback_address(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``ray://host:port``) names this machine's loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plan_actors(cfg: FedtailConfig, resources: dict[str, float]) -> tuple[int, float]:
    """(number of actors, GPUs per actor) for the cluster's total ``resources``."""
    per = cfg.engine.cpus_per_client
    actors = cfg.engine.actors or max(1, int(resources.get("CPU", 1.0) // per))
    actors = min(actors, cfg.federation.num_clients)
    gpus = resources.get("GPU", 0.0) if cfg.engine.device != "cpu" else 0.0
    return actors, min(1.0, gpus / actors)


@ENGINES.register("ray-actors")
def run_ray_actors(server_app: ServerApp, client_app_ref: str, cfg: FedtailConfig) -> RayActorGrid:
    import ray

    with ray_session(cfg.engine.ray_address):
        actors, gpus = plan_actors(cfg, ray.cluster_resources())
        grid = RayActorGrid(
            client_app_ref,
            cfg.federation.num_clients,
            actors,
            timeout=cfg.engine.timeout,
            cpus_per_actor=cfg.engine.cpus_per_client,
            gpus_per_actor=gpus,
        )
        return serve(server_app, grid)
