"""Engines under misbehaving clients: a hung, crashing or exiting ClientApp costs its node an error
reply, never the round; and a local Ray listens on loopback only."""

from __future__ import annotations

import ipaddress
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedtail.engines.inprocess import InProcessGrid, set_server_identity
from tests.engine_apps import HANG_SECONDS, calls

APP = "tests.engine_apps:app"


def _grid(workers: int, timeout: float | None = 3.0) -> InProcessGrid:
    set_server_identity()
    return InProcessGrid(APP, num_nodes=3, workers=workers, timeout=timeout)


def _round(grid: InProcessGrid, actions: list[str]) -> list[Message]:
    messages = [
        Message(RecordDict({"cfg": ConfigRecord({"action": a})}), dst_node_id=node, message_type="train")
        for node, a in zip(grid.node_ids, actions, strict=True)
    ]
    replies = list(grid.send_and_receive(messages))
    assert [r.metadata.src_node_id for r in replies] == grid.node_ids
    return replies


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
        replies = _round(grid, ["ok", "hang", "ok"])
        assert time.monotonic() - start < HANG_SECONDS / 4  # bounded: the round did not wait for the hang
        assert not replies[0].has_error() and not replies[2].has_error()
        assert _error(replies[1]) == (ErrorCode.REPLY_MESSAGE_UNAVAILABLE, "client timed out after 3s")
        assert _calls(grid) == [1, 0, 1]  # the hung call's (in-place) Context update was never applied
        replies = _round(grid, ["ok", "ok", "ok"])  # a fresh worker serves the next round
        assert not any(r.has_error() for r in replies)
        assert _calls(grid) == [2, 1, 2]
    finally:
        grid.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_misbehaving_clients_get_error_replies(workers: int) -> None:
    grid = _grid(workers)
    try:
        replies = _round(grid, ["raise", "sys_exit", "interrupt"])
        reasons = [_error(r) for r in replies]
        assert reasons == [
            (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "ValueError: client bug"),
            (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "SystemExit: 3"),
            (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "KeyboardInterrupt: "),
        ]
        replies = _round(grid, ["garbage", "none", "ok"])
        assert "returned dict, not Message" in _error(replies[0])[1]
        assert "returned NoneType, not Message" in _error(replies[1])[1]
        assert not replies[2].has_error()
        assert _calls(grid) == [0, 0, 1]  # failed calls leave the node's Context as it was
    finally:
        grid.close()


def test_worker_process_that_exits_is_replaced() -> None:
    grid = _grid(workers=2)
    try:
        replies = _round(grid, ["ok", "os_exit", "ok"])
        code, reason = _error(replies[1])
        assert code == ErrorCode.CLIENT_APP_CRASHED and "exit code 3" in reason
        assert not replies[0].has_error() and not replies[2].has_error()
        replies = _round(grid, ["ok", "ok", "ok"])
        assert not any(r.has_error() for r in replies)
        assert len({int(r.content["metrics"]["pid"]) for r in replies}) >= 1
    finally:
        grid.close()
