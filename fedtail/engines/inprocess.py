"""In-process engine: a Flower `Grid` that calls the ClientApp directly, with no Ray and no polling.

The ServerApp talks to `InProcessGrid` exactly as to Flower's own grids (the Grid interface:
``create_message / get_node_ids / push_messages / pull_messages / send_and_receive``). Each node keeps its
own `Context` (``context.state`` persists across rounds and tasks).

Clients run one after another, so ``engine.timeout`` bounds each ClientApp *call* (not the round): a call
that takes longer is abandoned and its node gets an error reply, and the round goes on with the others.
With ``engine.workers == 1`` calls run on one persistent daemon thread (a hung call's thread is left
behind and a fresh one takes over); with ``engine.workers > 1`` they run in spawned worker processes (a
hung or crashed process is killed and replaced). Either way a call works on a copy of its node's Context,
which replaces the node's Context only when the call returns a proper reply in time.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing as mp
import queue
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from multiprocessing.connection import Connection, wait

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedtail import protocol as P
from fedtail.config import FedtailConfig
from fedtail.engines import load_client_app
from fedtail.registry import ENGINES

CLIENT_APP_ERROR = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
Result = tuple[Message, Context | None]  # the reply, and the node's new Context (None: keep the old one)


def error_reply(message: Message, code: int, reason: str) -> Message:
    reply = Message(Error(code=code, reason=reason), reply_to=message)
    reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return reply


def _finite(timeout: float | None) -> float | None:
    """A limit the standard library can wait for (it overflows past ~292 years); beyond it: no limit."""
    return None if timeout is None or timeout >= threading.TIMEOUT_MAX else timeout


def timeout_reply(message: Message, timeout: float) -> Message:
    return error_reply(message, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, f"client timed out after {timeout:g}s")


def _copy_record(record):
    """An independent copy of one record: Config/MetricRecords hold scalars (immutable) and lists of them,
    so copying the lists is enough; anything else goes through `copy.deepcopy`."""
    if type(record) in (ConfigRecord, MetricRecord):
        return type(record)({k: list(v) if isinstance(v, list) else v for k, v in record.items()})
    return copy.deepcopy(record)


def copy_context(context: Context) -> Context:
    """What ``copy.deepcopy(context)`` gives, at a fraction of its cost (one copy per ClientApp call):
    the configs are flat mappings of scalars, the state's records are copied one by one."""
    state = RecordDict()
    for key, record in context.state.items():
        state[key] = _copy_record(record)
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=dict(context.node_config),
        state=state,
        run_config=dict(context.run_config),
        series_id=context.series_id,
    )


def _process(ref: str, message: Message, context: Context) -> Result:
    """Run one message through the ClientApp. Whatever the client does (raise, even SystemExit or
    KeyboardInterrupt, or return something that is not a reply to ``message``) becomes an error reply,
    as in Flower's engines; only a proper reply carries the updated Context back."""
    try:
        app = load_client_app(ref)
    except Exception as ex:  # noqa: BLE001 - reported to the server like Flower's engines do
        return error_reply(message, ErrorCode.LOAD_CLIENT_APP_EXCEPTION, f"{type(ex).__name__}: {ex}"), None
    try:
        reply = app(message, context)
    except BaseException as ex:  # noqa: BLE001 - a client's exit or interrupt must not end the server
        return error_reply(message, CLIENT_APP_ERROR, f"{type(ex).__name__}: {ex}"), None
    if not isinstance(reply, Message) or reply.metadata.reply_to_message_id != message.metadata.message_id:
        what = "a Message that is not a reply to it" if isinstance(reply, Message) else type(reply).__name__
        reason = f"ClientApp returned {what}, not Message(reply_to=msg)"
        return error_reply(message, CLIENT_APP_ERROR, reason), None
    reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return reply, context


class _Batch:
    """Calls handed to a worker thread in one go, and how far it got. ``current`` is (index, start time)
    of the call running now; ``abandoned`` (set by the caller on a timeout or an interrupt) makes the
    thread drop the result of the call it is in and stop."""

    def __init__(self, items: list[tuple[Message, Context]]) -> None:
        self.items = items
        self.results: list[Result] = []
        self.current: tuple[int, float] | None = None
        self.abandoned = False
        self.lock = threading.Lock()
        self.done = threading.Event()


class _ThreadWorker:
    """A daemon thread that runs batches of ClientApp calls (no thread per message, and no thread
    switch per message: the caller sleeps until the batch is done or a call's deadline). One whose call
    hangs is abandoned: its batch is marked so, and a late result is never applied."""

    def __init__(self, ref: str) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, args=(ref,), name="fedtail-client", daemon=True).start()

    def _loop(self, ref: str) -> None:
        while (batch := self.jobs.get()) is not None:
            for i, (message, context) in enumerate(batch.items):
                with batch.lock:
                    if batch.abandoned:
                        break
                    batch.current = (i, time.monotonic())
                result = _process(ref, message, context)
                with batch.lock:
                    if batch.abandoned:
                        return  # this thread was given up on while in the call: end it
                    batch.results.append(result)
            batch.done.set()

    def stop(self) -> None:
        self.jobs.put(None)


class ThreadRunner:
    """Runs ClientApp calls on one persistent daemon thread, each for at most ``timeout`` seconds and on
    a copy of the node's Context. A call over the limit gets a timeout error reply; its thread is left to
    finish (or not) on its own and a fresh one takes the next call."""

    def __init__(self, ref: str, timeout: float | None) -> None:
        self.ref = ref
        self.timeout = _finite(timeout)
        self._worker: _ThreadWorker | None = None

    def __call__(self, message: Message, context: Context) -> Result:
        return self.run_batch([(message, context)])[0]

    def run_batch(self, items: list[tuple[Message, Context]]) -> list[Result]:
        """Every call's result, in order; each call runs on a copy of its Context."""
        results: list[Result] = []
        while len(results) < len(items):
            todo = [(m, copy_context(c)) for m, c in items[len(results) :]]
            done, timed_out = self._run_on_worker(_Batch(todo))
            results += done
            if timed_out is not None:
                results.append((timeout_reply(timed_out, self.timeout), None))
        return results

    def _run_on_worker(self, batch: _Batch) -> tuple[list[Result], Message | None]:
        """Run ``batch`` on the worker thread; on a timeout, the finished results and the message that
        timed out (the thread is abandoned with it)."""
        if self._worker is None:
            self._worker = _ThreadWorker(self.ref)
        self._worker.jobs.put(batch)
        try:
            while not batch.done.wait(self._time_left(batch)):
                with batch.lock:
                    i, started = batch.current or (0, time.monotonic())
                    running = len(batch.results) == i  # (not just finished, before the next started)
                    if running and self.timeout is not None and time.monotonic() - started >= self.timeout:
                        batch.abandoned = True
                        self._worker = None  # its thread ends if the hung call ever returns
                        return list(batch.results), batch.items[i][0]
        except BaseException:  # Ctrl-C while waiting: the thread stops after its current call
            with batch.lock:
                batch.abandoned = True
            self._worker = None
            raise
        return batch.results, None

    def _time_left(self, batch: _Batch) -> float | None:
        if self.timeout is None:
            return None
        current = batch.current
        started = time.monotonic() if current is None else current[1]
        return max(0.0, started + self.timeout - time.monotonic())

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


_READY = "ready"


def _worker_main(conn: Connection, ref: str) -> None:
    """Body of a worker process: answer jobs from the pipe until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it kills its workers
    with contextlib.suppress(Exception):  # a failure to load is reported per message by _process
        load_client_app(ref)
    conn.send(_READY)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        result = _process(ref, *job)
        try:
            conn.send(result)
        except Exception as ex:  # noqa: BLE001 - e.g. a reply that cannot be pickled
            conn.send((error_reply(job[0], CLIENT_APP_ERROR, f"reply not sendable: {ex}"), None))


class _ProcessWorker:
    """One spawned worker process and its pipe; ``job`` is (batch index, message, deadline) while busy."""

    def __init__(self, ref: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, ref), name="fedtail-client", daemon=True)
        self.process.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.job: tuple[int, Message, float] | None = None

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(5)
        self.kill()


class InProcessGrid(Grid):
    """Grid whose nodes are ClientApp calls in this process (or in worker processes).

    ``timeout`` bounds each ClientApp call in seconds (None: no bound).
    """

    def __init__(
        self,
        client_app_ref: str,
        num_nodes: int,
        run_id: int = 1,
        workers: int = 1,
        timeout: float | None = None,
    ) -> None:
        self.client_app_ref = client_app_ref
        self.workers = workers
        self.timeout = _finite(timeout)
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
        self._thread = ThreadRunner(client_app_ref, timeout)
        self._procs: list[_ProcessWorker] = []

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

    def partition_ids(self) -> dict[int, int]:
        """``{node id: partition id}``: this grid writes its nodes' ``node_config`` itself, so the server
        need not ask each node (see `server.app.discover_clients`); with 10,000 nodes the one-time query
        cost more than a round."""
        return {node: int(ctx.node_config[P.NODE_PARTITION_ID]) for node, ctx in self.contexts.items()}

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
        if self.workers > 1:
            results = self._run_in_processes(batch)
        else:
            results = self._thread.run_batch([(msg, self._context_for(msg)) for msg in batch])
        for msg, (_, context) in zip(batch, results, strict=True):
            if context is not None:
                self.contexts[msg.metadata.dst_node_id] = context
        return [reply for reply, _ in results]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Every message gets a reply (an error reply if its call failed or exceeded ``self.timeout``);
        the round-level ``timeout`` of Flower's strategies is not needed on top of that."""
        return self.pull_messages(self.push_messages(messages))

    # ---- running calls --------------------------------------------------------------------------
    def _context_for(self, msg: Message) -> Context:
        return self.contexts[msg.metadata.dst_node_id]

    def _run_in_processes(self, batch: list[Message]) -> list[Result]:
        """Keep up to ``workers`` processes busy; a call's clock starts when a ready process receives it."""
        results: list[Result | None] = [None] * len(batch)
        todo = deque(enumerate(batch))
        while len(self._procs) < min(self.workers, len(batch)):
            self._procs.append(_ProcessWorker(self.client_app_ref))
        limit = float("inf") if self.timeout is None else self.timeout
        start_limit = max(limit, 60.0) if self.timeout is not None else float("inf")
        while todo or any(w.job is not None for w in self._procs):
            for w in self._procs:
                if w.ready and w.job is None and todo:
                    i, msg = todo.popleft()
                    w.job = (i, msg, time.monotonic() + limit)
                    with contextlib.suppress(OSError):  # if the process died, wait() sees its pipe closed
                        w.conn.send((msg, self._context_for(msg)))
            pending = [w for w in self._procs if w.job is not None or not w.ready]
            deadline = min(w.job[2] if w.job else w.started + start_limit for w in pending)
            left = None if deadline == float("inf") else max(0.0, deadline - time.monotonic())
            ready = wait([w.conn for w in pending], timeout=left)
            for w in pending:
                if w.conn in ready:
                    self._receive(w, results)
                elif w.job is not None and time.monotonic() >= w.job[2]:
                    results[w.job[0]] = (timeout_reply(w.job[1], self.timeout), None)
                    self._replace(w)
                elif not w.ready and time.monotonic() >= w.started + start_limit:
                    self._replace(w)
                    raise RuntimeError(f"an engine.workers process did not start within {start_limit:g}s")
        return results  # type: ignore[return-value]  (every index was filled above)

    def _receive(self, w: _ProcessWorker, results: list[Result | None]) -> None:
        try:
            out = w.conn.recv()
        except (EOFError, OSError):
            w.process.join(1)
            code = w.process.exitcode
            if w.job is None:
                self._replace(w)
                raise RuntimeError(
                    f"an engine.workers process exited while starting (exit code {code})"
                ) from None
            reason = f"client process exited (exit code {code}) while handling the message"
            results[w.job[0]] = (error_reply(w.job[1], ErrorCode.CLIENT_APP_CRASHED, reason), None)
            self._replace(w)
            return
        if out == _READY:
            w.ready = True
        elif w.job is not None:
            results[w.job[0]] = out
            w.job = None

    def _replace(self, w: _ProcessWorker) -> None:
        w.kill()
        self._procs[self._procs.index(w)] = _ProcessWorker(self.client_app_ref)

    def close(self) -> None:
        self._thread.close()
        for w in self._procs:
            if w.job is None:
                w.stop()
            else:
                w.kill()  # busy (e.g. Ctrl-C mid-round): do not wait for its call
        self._procs = []


def set_server_identity(run_id: int = 1) -> None:
    """Flower stamps new Messages with the process's task identity; set it as its runtimes do."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def serve(server_app: ServerApp, grid: InProcessGrid) -> InProcessGrid:
    """Run ``server_app`` against ``grid`` (any `InProcessGrid`), closing the grid however it ends."""
    set_server_identity(grid.run_id)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    try:
        server_app(grid, context)
    finally:
        grid.close()
    return grid


@ENGINES.register("inprocess")
def run_inprocess(server_app: ServerApp, client_app_ref: str, cfg: FedtailConfig) -> InProcessGrid:
    grid = InProcessGrid(
        client_app_ref, cfg.federation.num_clients, workers=cfg.engine.workers, timeout=cfg.engine.timeout
    )
    return serve(server_app, grid)
