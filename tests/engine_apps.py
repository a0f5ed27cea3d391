"""A ClientApp that misbehaves on request, for tests/test_engines.py (engines load it by import path,
``tests.engine_apps:app``). Each train message names an ``action``; every call first counts itself in
``context.state`` (in place), so a test can see whether an abandoned call's Context was applied."""

from __future__ import annotations

import os
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
    return Message(RecordDict({"metrics": MetricRecord({"pid": os.getpid()})}), reply_to=msg)


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
