"""In-process engine: a Flower `Grid` that calls the ClientApp directly, with no Ray and no polling.

The ServerApp talks to `InProcessGrid` exactly as to Flower's own grids (the Grid interface:
``create_message / get_node_ids / push_messages / pull_messages / send_and_receive``). Each node keeps its
own `Context` (``context.state`` persists across rounds and tasks). With ``engine.workers > 1`` the
messages of a round run in a pool of processes, each returning the reply and the updated Context.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedtail import protocol as P
from fedtail.config import FedtailConfig
from fedtail.engines import load_client_app
from fedtail.registry import ENGINES

CLIENT_APP_ERROR = ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def _process(ref: str, message: Message, context: Context) -> tuple[Message, Context]:
    """Run one message through the ClientApp; an exception becomes an error reply, as in Flower."""
    try:
        reply = load_client_app(ref)(message, context)
    except Exception as ex:  # noqa: BLE001 - reported to the server like Flower's engines do
        reply = Message(Error(code=CLIENT_APP_ERROR, reason=f"{type(ex).__name__}: {ex}"), reply_to=message)
    reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return reply, context


class InProcessGrid(Grid):
    """Grid whose nodes are ClientApp calls in this process (or a process pool)."""

    def __init__(self, client_app_ref: str, num_nodes: int, run_id: int = 1, workers: int = 1) -> None:
        self.client_app_ref = client_app_ref
        self.workers = workers
        self.run_id = run_id
        self._run = None
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config={P.NODE_PARTITION_ID: i, P.NODE_NUM_PARTITIONS: num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i, node in enumerate(self.node_ids)
        }
        self._inbox: dict[str, Message] = {}
        self._pool: cf.ProcessPoolExecutor | None = None

    # ---- Grid interface -------------------------------------------------------------------------
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"message for unknown node {msg.metadata.dst_node_id}")
            msg_id = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            msg.metadata.__dict__["_run_id"] = self.run_id
            self._inbox[msg_id] = msg
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        batch = [self._inbox.pop(i) for i in list(message_ids) if i in self._inbox]
        if self.workers > 1 and len(batch) > 1:
            results = list(self._executor().map(_process, *zip(*[self._job(m) for m in batch], strict=True)))
        else:
            results = [_process(*self._job(m)) for m in batch]
        replies = []
        for reply, context in results:
            self.contexts[context.node_id] = context
            replies.append(reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # ---- helpers --------------------------------------------------------------------------------
    def _job(self, msg: Message) -> tuple[str, Message, Context]:
        return self.client_app_ref, msg, self.contexts[msg.metadata.dst_node_id]

    def _executor(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def set_server_identity(run_id: int = 1) -> None:
    """Flower stamps new Messages with the process's task identity; set it as its runtimes do."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


@ENGINES.register("inprocess")
def run_inprocess(server_app: ServerApp, client_app_ref: str, cfg: FedtailConfig) -> InProcessGrid:
    grid = InProcessGrid(client_app_ref, cfg.federation.num_clients, workers=cfg.engine.workers)
    set_server_identity(grid.run_id)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    try:
        server_app(grid, context)
    finally:
        grid.close()
    return grid
