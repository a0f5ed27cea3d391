"""Engines under misbehaving clients: a hung, crashing or exiting ClientApp costs its node an error
reply, never the round; and a local Ray listens on loopback only."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Message
from flwr.common.constant import ErrorCode

from fedtail.engines.inprocess import InProcessGrid, set_server_identity
from tests.engine_apps import HANG_SECONDS, calls, send_round

APP = "tests.engine_apps:app"
REPO = Path(__file__).resolve().parents[1]


def _grid(workers: int, timeout: float | None = 3.0) -> InProcessGrid:
    set_server_identity()
    return InProcessGrid(APP, num_nodes=3, workers=workers, timeout=timeout)


def _calls(grid: InProcessGrid) -> list[int]:
    return [calls(grid.contexts[node]) for node in grid.node_ids]


def _error(reply: Message) -> tuple[int, str]:
    assert reply.has_error()
    return reply.error.code, reply.error.reason


@pytest.mark.parametrize("workers", [1, 2])
def test_hung_client_is_abandoned_after_timeout(workers: int) -> None:
    grid = _grid(workers)
    try:
        start = time.monotonic()
        replies = send_round(grid, ["ok", "hang", "ok"])
        assert time.monotonic() - start < HANG_SECONDS / 4  # bounded: the round did not wait for the hang
        assert not replies[0].has_error() and not replies[2].has_error()
        assert _error(replies[1]) == (ErrorCode.REPLY_MESSAGE_UNAVAILABLE, "client timed out after 3s")
        assert _calls(grid) == [1, 0, 1]  # the hung call's (in-place) Context update was never applied
        replies = send_round(grid, ["ok", "ok", "ok"])  # a fresh worker serves the next round
        assert not any(r.has_error() for r in replies)
        assert _calls(grid) == [2, 1, 2]
    finally:
        grid.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_each_call_of_a_round_has_its_own_time_limit(workers: int) -> None:
    """Calls run as one batch per round; every hung call still costs only its own node a reply."""
    grid = _grid(workers, timeout=1.0)
    try:
        start = time.monotonic()
        replies = send_round(grid, ["hang", "ok", "hang"])
        assert time.monotonic() - start < HANG_SECONDS / 4
        codes = [r.error.code if r.has_error() else None for r in replies]
        hung = ErrorCode.REPLY_MESSAGE_UNAVAILABLE
        assert codes == [hung, None, hung]
        assert _calls(grid) == [0, 1, 0]
    finally:
        grid.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_misbehaving_clients_get_error_replies(workers: int) -> None:
    grid = _grid(workers)
    try:
        replies = send_round(grid, ["raise", "sys_exit", "interrupt"])
        reasons = [_error(r) for r in replies]
        assert reasons == [
            (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "ValueError: client bug"),
            (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "SystemExit: 3"),
            (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "KeyboardInterrupt: "),
        ]
        replies = send_round(grid, ["garbage", "none", "ok"])
        assert "returned dict, not Message" in _error(replies[0])[1]
        assert "returned NoneType, not Message" in _error(replies[1])[1]
        assert not replies[2].has_error()
        assert _calls(grid) == [0, 0, 1]  # failed calls leave the node's Context as it was
    finally:
        grid.close()


def test_worker_process_that_exits_is_replaced() -> None:
    grid = _grid(workers=2)
    try:
        send_round(grid, ["ok", "ok", "ok"])
        first = {w.process.pid for w in grid._procs}
        replies = send_round(grid, ["ok", "os_exit", "ok"])
        code, reason = _error(replies[1])
        assert code == ErrorCode.CLIENT_APP_CRASHED and "exit code 3" in reason
        assert not replies[0].has_error() and not replies[2].has_error()
        now = {w.process.pid for w in grid._procs}
        assert len(first) == len(now) == 2 and len(first & now) == 1  # exactly the dead worker replaced
        assert all(w.process.is_alive() for w in grid._procs)
        replies = send_round(grid, ["ok", "ok", "ok"])
        assert not any(r.has_error() for r in replies)
        assert {int(r.content["metrics"]["pid"]) for r in replies} <= now
    finally:
        grid.close()


def _ray_probe(actions: list[str], timeout: float) -> dict:
    """`tests.engine_apps.ray_probe` in a subprocess, so that a hang fails the test instead of blocking it."""
    code = (
        "import json; from tests.engine_apps import ray_probe; "
        f"print(json.dumps(ray_probe({actions!r}, {timeout})))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="Ray's loopback-only mode is checked on Linux")
def test_ray_engine_listens_on_loopback_and_survives_a_hung_client() -> None:
    seen = _ray_probe(["ok", "hang", "ok"], timeout=3.0)
    assert seen["warm_up"] == ["ok", "ok", "ok"]
    assert seen["listening"], "found no listening socket of the Ray processes"
    for ip, process in seen["listening"]:
        addr = ipaddress.ip_address(ip)
        loopback = addr.is_loopback or (addr.version == 6 and (addr.ipv4_mapped or addr).is_loopback)
        assert loopback, f"{process} listens on {ip}"
    # The hung client's reply misses the round (Flower's round timeout); the others arrive, and the run
    # ends: the subprocess returned (before, Flower's worker waited on the hung actor forever).
    assert seen["round"][0] == "ok" and seen["round"][2] == "ok"
    assert seen["round"][1] in ("missing", "client timed out after 3s")


@pytest.mark.parametrize("address", [None, "auto", "ray://head:10001"])
def test_ray_address_picks_a_private_local_ray_or_an_explicit_cluster(monkeypatch, address) -> None:
    import flwr.simulation
    from ray._private import ray_constants

    from fedtail.config import FedtailConfig
    from fedtail.registry import ENGINES

    seen = {}

    def fake_run_simulation(**kwargs) -> None:
        seen["init_args"] = kwargs["backend_config"]["init_args"]
        seen["cluster_mode"] = ray_constants.ENABLE_RAY_CLUSTER

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # never joined implicitly
    before = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    cfg = FedtailConfig.model_validate({"engine": {"name": "ray", "ray_address": address, "device": "cpu"}})
    ENGINES.get("ray")(None, APP, cfg)
    assert seen["init_args"]["address"] == (address or "local")
    assert seen["init_args"]["include_dashboard"] is False
    # Ray's loopback-only mode is on for the private Ray only, and restored afterwards.
    assert seen["cluster_mode"] is (before[0] if address else False)
    assert (ray_constants.ENABLE_RAY_CLUSTER, os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")) == before


@pytest.mark.parametrize(
    ("engine", "resources", "expected"),
    [
        ({}, {"CPU": 8.0}, (3, 0.0)),  # never more actors than clients
        ({"cpus_per_client": 4.0}, {"CPU": 8.0, "GPU": 2.0}, (2, 1.0)),
        ({"cpus_per_client": 2.0}, {"CPU": 1.0}, (1, 0.0)),  # at least one
        ({"actors": 2}, {"CPU": 1.0, "GPU": 1.0}, (2, 0.5)),
        ({"actors": 2, "device": "cpu"}, {"CPU": 8.0, "GPU": 1.0}, (2, 0.0)),
    ],
)
def test_ray_actors_fill_the_cluster(engine: dict, resources: dict, expected: tuple) -> None:
    from fedtail.config import FedtailConfig
    from fedtail.engines.ray_actors import plan_actors

    cfg = FedtailConfig.model_validate({"federation": {"num_clients": 3}, "engine": engine})
    assert plan_actors(cfg, resources) == expected


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1:6379", True), ("localhost:6379", True), ("ray://127.0.0.1:10001", True),
     ("[::1]:6379", True), ("10.0.0.1:6379", False), ("auto", False), ("ray://head:10001", False)],
)  # fmt: skip
def test_a_cluster_on_loopback_is_joined_in_loopback_mode(address: str, loopback: bool) -> None:
    from fedtail.engines.ray_actors import is_loopback_address

    assert is_loopback_address(address) is loopback


@pytest.mark.parametrize("workers", [1, 2])
def test_timeout_beyond_what_the_clock_can_wait_means_no_limit(workers: int) -> None:
    grid = _grid(workers, timeout=float("inf"))  # engine.timeout accepts inf and 1e12
    try:
        assert not any(r.has_error() for r in send_round(grid, ["ok", "ok", "ok"]))
    finally:
        grid.close()
