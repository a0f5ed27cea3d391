"""A ClientApp that misbehaves on request, for tests/test_engines.py (engines load it by import path,
``tests.engine_apps:app``). Each train message names an ``action``; every call first counts itself in
``context.state`` (in place), so a test can see whether an abandoned call's Context was applied."""

from __future__ import annotations

import os
import re
import sys
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

HANG_SECONDS = 600.0

app = ClientApp()


def calls(context: Context) -> int:
    return int(context.state["calls"]["n"]) if "calls" in context.state else 0


@app.train()
def train(msg: Message, context: Context):
    context.state["calls"] = ConfigRecord({"n": calls(context) + 1})
    action = str(msg.content["cfg"]["action"])
    if action == "hang":
        time.sleep(HANG_SECONDS)
    elif action == "hang_holding_the_gil":  # no other thread of the process runs (nor times it out)
        re.match(r"(a+)+$", "a" * 64 + "b")
    elif action == "raise":
        raise ValueError("client bug")
    elif action == "sys_exit":
        sys.exit(3)
    elif action == "os_exit":
        os._exit(3)
    elif action == "interrupt":
        raise KeyboardInterrupt
    elif action == "garbage":
        return {"not": "a message"}
    elif action == "none":
        return None
    content = RecordDict({"metrics": MetricRecord({"pid": os.getpid()})})
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # in a Ray worker: say on which node
        content["where"] = ConfigRecord({"node": sys.modules["ray"].get_runtime_context().get_node_id()})
    return Message(content, reply_to=msg)


def ray_probe(actions: list[str], timeout: float) -> dict:
    """Run the ray engine on this app: a warm-up round, the listening sockets of this process tree while
    Ray is up, then one round with ``actions``. Returns what it saw (run it in a subprocess: a hang there
    must not hang the test)."""
    import psutil
    from flwr.serverapp import Grid, ServerApp

    from fedtail.config import FedtailConfig
    from fedtail.registry import ENGINES

    n = len(actions)
    cfg = FedtailConfig.model_validate(
        {"federation": {"num_clients": n}, "engine": {"name": "ray", "timeout": timeout, "device": "cpu"}}
    )
    seen: dict = {}
    server = ServerApp()

    def round_(grid: Grid, nodes: list[int], acts: list[str], limit: float) -> list[str]:
        messages = [
            Message(RecordDict({"cfg": ConfigRecord({"action": a})}), dst_node_id=node, message_type="train")
            for node, a in zip(nodes, acts, strict=True)
        ]
        by_node = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=limit)}
        return [
            "missing"
            if node not in by_node
            else by_node[node].error.reason
            if by_node[node].has_error()
            else "ok"
            for node in nodes
        ]

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        while len(nodes := sorted(grid.get_node_ids())) < n:
            time.sleep(0.2)
        seen["warm_up"] = round_(grid, nodes, ["ok"] * n, 300.0)
        me = psutil.Process()
        tree = {p.pid: p.name() for p in [me, *me.children(recursive=True)]}
        seen["listening"] = sorted(
            {
                (c.laddr.ip, tree[c.pid])
                for c in psutil.net_connections("inet")
                if c.status == psutil.CONN_LISTEN and c.pid in tree
            }
        )
        seen["round"] = round_(grid, nodes, actions, cfg.engine.timeout)

    ENGINES.get("ray")(server, "tests.engine_apps:app", cfg)
    return seen


def listening(pids: set[int] | None = None) -> list[tuple[str, str]]:
    """(address, process name) of the listening sockets of ``pids`` (default: this process tree)."""
    import psutil

    if pids is None:
        me = psutil.Process()
        pids = {p.pid for p in [me, *me.children(recursive=True)]}
    names = {}
    for pid in pids:
        try:
            names[pid] = psutil.Process(pid).name()
        except psutil.Error:
            continue
    return sorted(
        {
            (c.laddr.ip, names[c.pid])
            for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in names
        }
    )


def send_round(grid, actions: list[str]) -> list[Message]:
    """One train message per node of an `InProcessGrid` (or subclass) with the given actions; the replies,
    checked to come back in the nodes' order."""
    messages = [
        Message(RecordDict({"cfg": ConfigRecord({"action": a})}), dst_node_id=node, message_type="train")
        for node, a in zip(grid.node_ids, actions, strict=True)
    ]
    replies = list(grid.send_and_receive(messages))
    assert [r.metadata.src_node_id for r in replies] == grid.node_ids
    return replies


def _outcome(reply: Message) -> list:
    """[error reason, None, None], or ["ok", the Ray node and the process the call ran in]."""
    if reply.has_error():
        return [reply.error.reason, None, None]
    return ["ok", str(reply.content["where"]["node"]), int(reply.content["metrics"]["pid"])]


def ray_actors_probe(
    address: str | None, actions: list[str], timeout: float, actors: int, slack: float | None = None
) -> dict:
    """Run the ray-actors engine's Grid on this app (at ``address``, or a private local Ray): a warm-up
    round, then one round with ``actions``, then one more plain round. Returns the replies (an error's
    reason, or "ok") with the Ray node each ran on, the actors' nodes and this process's listening
    sockets (run it in a subprocess: a hang there must not hang the test). ``slack``: the engine's
    `SLACK`, the time an actor gets on top of its calls' limits before it counts as hung."""
    from fedtail.engines import ray_actors
    from fedtail.engines.inprocess import set_server_identity
    from fedtail.engines.ray_actors import RayActorGrid, ray_session

    if slack is not None:
        ray_actors.SLACK = slack

    def round_(grid: RayActorGrid, acts: list[str]) -> list[list]:
        return [_outcome(r) for r in send_round(grid, acts)]

    seen: dict = {}
    with ray_session(address):
        set_server_identity()
        grid = RayActorGrid("tests.engine_apps:app", len(actions), actors=actors, timeout=timeout)
        try:
            seen["actor_nodes"] = list(grid.actor_nodes)
            seen["warm_up"] = round_(grid, ["ok"] * len(actions))
            seen["listening"] = listening()
            seen["round"] = round_(grid, actions)
            seen["after"] = round_(grid, ["ok"] * len(actions))
            seen["calls"] = [calls(grid.contexts[node]) for node in grid.node_ids]
        finally:
            grid.close()
    return seen
