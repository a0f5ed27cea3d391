"""The temporary Prefect server of a ``fedtail run``, kept out of the terminal's reach and tied to fedtail.

Without ``PREFECT_API_URL`` Prefect starts a temporary server (``python -m uvicorn``) in fedtail's own
process group. A terminal's Ctrl-C reaches that group, so the server died first and the interrupted run
spent minutes printing ``Connection refused``; after ``kill -9`` of fedtail the server kept running.
Here fedtail starts that server itself: in a new session (no terminal signals) with the Linux parent-death
signal set (it gets SIGTERM when fedtail dies, however fedtail dies), and stops it after the flow.

Before any of that, what would otherwise fail minutes later in retries and tracebacks is checked at once:
a configured ``PREFECT_API_URL`` must answer, and a temporary server's SQLite database must be writable
and have room to grow (disk space, ``ulimit -f``).
"""

from __future__ import annotations

import ctypes
import inspect
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import prefect
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    get_current_settings,
    temporary_settings,
)

from prefect.server.api.server import SubprocessASGIServer  # isort: skip (after the settings)

from fedtail.errors import EnvironmentProblem

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
API_CHECK_SECONDS = 3.0
DATABASE_ROOM = 32 * 2**20
"""Bytes a temporary server's SQLite database may need beyond its size: one smoke run grew its
write-ahead log by 4 MiB, and every run adds logs and events."""


def check_api(url: str) -> None:
    """``url`` answers at all (any HTTP status: a Prefect Cloud URL without a key answers 401); else one
    clear error instead of the client's three tracebacks."""
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=API_CHECK_SECONDS)
    except httpx.HTTPError as err:
        raise EnvironmentProblem(
            f"PREFECT_API_URL={url}: nothing answers there ({err or type(err).__name__}); unset "
            "PREFECT_API_URL to run on a temporary server, or start that server (`prefect server start`)"
        ) from None


def check_configured_api() -> None:
    """`check_api` for the ``PREFECT_API_URL`` in force, if one is set."""
    if PREFECT_API_URL.value():
        check_api(str(PREFECT_API_URL.value()))


def _database_file() -> Path | None:
    """The SQLite file a temporary server would use (None for another database)."""
    url = get_current_settings().server.database.connection_url
    value = url.get_secret_value() if url is not None else ""
    if not value.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    name = make_url(value).database
    return Path(name).expanduser() if name and name != ":memory:" else None


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def check_database() -> None:
    """Before a temporary server starts: its database folder (``PREFECT_HOME``) is writable, and the disk
    and the file-size limit leave the database `DATABASE_ROOM` to grow. Else the server failed with
    SQLite tracebacks, and the client retried for minutes."""
    db = _database_file()
    if db is None:
        return
    other = "or set PREFECT_API_URL to a running Prefect server"
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=db.parent):
            pass
    except OSError as err:
        raise EnvironmentProblem(
            f"Prefect's database folder {db.parent} cannot be written ({err.strerror}): set PREFECT_HOME "
            f"to a writable folder, {other}"
        ) from None
    size = sum(f.stat().st_size for f in (db, Path(f"{db}-wal")) if f.is_file())
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < size + DATABASE_ROOM:
        raise EnvironmentProblem(
            f"the file-size limit (ulimit -f) of {_mib(limit)} leaves Prefect's database {db} "
            f"({_mib(size)}) no room to grow (a run needs up to {_mib(DATABASE_ROOM)} more): raise it "
            f"(`ulimit -f unlimited`), {other}"
        )
    free = shutil.disk_usage(db.parent).free
    if free < DATABASE_ROOM:
        raise EnvironmentProblem(
            f"only {_mib(free)} free on the disk of Prefect's database {db} (a run needs up to "
            f"{_mib(DATABASE_ROOM)}): free some space, set PREFECT_HOME to another disk, {other}"
        )


def _die_with_parent(parent: int) -> Any:
    """A ``preexec_fn``: SIGTERM this child when ``parent`` dies (Linux), even by ``kill -9``."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class DetachedServer(SubprocessASGIServer):
    """Prefect's temporary server, started in its own session and bound to 127.0.0.1 only."""

    _instances: dict[int | None, SubprocessASGIServer] = {}  # apart from Prefect's own registry

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        # The same command and environment as SubprocessASGIServer._run_uvicorn_command in prefect 3.7.7.
        server_env = {
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        return subprocess.Popen(
            args=[
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={
                **os.environ,
                **server_env,
                **get_current_settings().to_environment_variables(exclude_unset=True),
            },
            start_new_session=True,  # a terminal's Ctrl-C goes to fedtail, which then stops the server
            preexec_fn=_die_with_parent(os.getpid()),
        )


def _drain_prefect_workers() -> None:
    """Send the queued logs and events before the server goes (as prefect_test_harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


@contextmanager
def temporary_server(while_starting: Callable[[], None] | None = None) -> Iterator[str | None]:
    """Run the block against a detached temporary server; yields its API URL (None if one is configured).

    With ``PREFECT_API_URL`` set (it must answer: `check_api`), or ephemeral mode off, Prefect's own
    settings decide and nothing starts; else the database is checked first (`check_database`).
    The server is registered as Prefect's default temporary server, so every part of Prefect that would
    start one (clients, log and event workers, in any thread) uses this one instead. ``while_starting``
    runs in another thread while this one starts the server (the seconds of a server start and of the
    run's imports overlap instead of adding up).
    """
    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        check_configured_api()
        if while_starting is not None:
            while_starting()
        yield None
        return
    check_database()
    server = DetachedServer()
    prior = SubprocessASGIServer._instances.get(None)
    SubprocessASGIServer._instances[None] = server
    try:
        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        if while_starting is None:
            server.start(timeout=timeout)
        else:  # the server from this thread: its parent-death signal follows the thread that started it
            failure: list[BaseException] = []

            def work() -> None:
                try:
                    while_starting()
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                    failure.append(err)

            worker = threading.Thread(target=work, name="fedtail-imports", daemon=True)
            worker.start()
            server.start(timeout=timeout)
            worker.join()
            if failure:
                raise failure[0]
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                _drain_prefect_workers()
    finally:
        server.stop()
        if prior is not None:
            SubprocessASGIServer._instances[None] = prior
        else:
            SubprocessASGIServer._instances.pop(None, None)
