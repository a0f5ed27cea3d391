"""`fedtail serve` against a real `prefect server start`: a cron schedule produces a completed run, and
stopping serve pauses the schedule (no pile of Late runs), starting it again resumes it.

One server on loopback for the module, its own PREFECT_HOME and SQLite database, with a scheduler that
looks every second instead of every minute. The whole module takes about a minute or two: the cron's next
minute boundary is the floor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import as_terminal_job

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
DEPLOYMENT = "fedtail-pipeline/serve-test"


def test_sqlalchemy_is_below_2_1() -> None:
    """With SQLAlchemy 2.1 the Prefect 3.7 scheduler fails every loop: deployments never get runs."""
    assert Version(version("sqlalchemy")) < Version("2.1"), "pyproject.toml pins sqlalchemy>=2.0,<2.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Signal a process started in its own session, wait (bounded), then kill its whole group."""
    try:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return -999
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _wait_for(
    what: str, check: Callable[[], Any], timeout: float, proc: subprocess.Popen | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        if result := check():
            return result
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`prefect server start` on 127.0.0.1; yields the environment a client process needs."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
    }
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        import httpx

        def healthy() -> bool:
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for("the Prefect server", healthy, timeout=180, proc=server)
        yield {**env, "PREFECT_API_URL": api, "PYTHONPATH": str(REPO), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    finally:
        _stop(server)
        log.close()
        text = (home / "server.log").read_text()
        assert "bulk DML" not in text, f"the scheduler failed (SQLAlchemy 2.1?): {home / 'server.log'}"


def _serve(
    env: dict[str, str], project: Path, out: Path, log: Path, command: tuple[str, ...] = ("serve",)
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "fedtail.cli",
        *command,
        "--config",
        SMOKE,
        "--root",
        str(project),
        "--set",
        "serve.name=serve-test",
        "--set",
        "serve.cron=['* * * * *']",
        "--set",
        f"output.data_dir={project / 'data'}",
        "--set",
        f"output.artifacts_dir={out / 'artifacts'}",
        "--set",
        f"output.runs_dir={out / 'runs'}",
        "--set",
        f"output.sweeps_dir={out / 'sweeps'}",
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=as_terminal_job,  # stopped with SIGINT like Ctrl-C in its terminal
    )


def _deployment_runs(api: str, name: str = DEPLOYMENT) -> tuple[Any, list[Any]]:
    """The deployment and its flow runs, read from the API (None, [] before it is registered)."""
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except Exception:  # noqa: BLE001 - not registered yet
            return None, []
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        )
        return deployment, runs


def test_serve_runs_on_schedule_and_pauses_when_stopped(
    live_server: dict[str, str], project: Path, tmp_path: Path
) -> None:
    api = live_server["PREFECT_API_URL"]
    log = tmp_path / "serve.log"
    serve = _serve(live_server, project, tmp_path, log)
    try:

        def completed() -> list[Any]:
            _, runs = _deployment_runs(api)
            bad = [r for r in runs if r.state and r.state.type.value in ("FAILED", "CRASHED")]
            assert not bad, f"scheduled run failed: {bad[0].state}\n{log.read_text()[-3000:]}"
            return [r for r in runs if r.state and r.state.type.value == "COMPLETED"]

        done = _wait_for("a scheduled run to complete", completed, timeout=200, proc=serve)
        assert done[0].auto_scheduled
        assert list((tmp_path / "runs").glob("*/metrics.json")), "the scheduled run wrote no results"
        deployment, runs = _deployment_runs(api)
        assert not deployment.paused and any(r.state.type.value == "SCHEDULED" for r in runs)
    finally:
        rc = _stop(serve, signal.SIGINT)  # what Ctrl-C in serve's terminal sends
    assert rc == 0, log.read_text()[-3000:]

    deployment, runs = _deployment_runs(api)
    assert deployment.paused, "stopping serve must pause the schedule"
    assert not [r for r in runs if r.state.type.value == "SCHEDULED"], "paused: no runs left to go Late"

    serve = _serve(live_server, project, tmp_path, log)
    try:

        def resumed() -> bool:
            deployment, runs = _deployment_runs(api)
            return bool(deployment and not deployment.paused) and any(
                r.state.type.value == "SCHEDULED" for r in runs
            )

        _wait_for("serve to resume the schedule", resumed, timeout=60, proc=serve)
    finally:
        rc = _stop(serve, signal.SIGTERM)
    assert rc == 0, log.read_text()[-3000:]
    assert _deployment_runs(api)[0].paused


def test_a_served_sweep_runs_on_its_schedule(
    live_server: dict[str, str], project: Path, tmp_path: Path
) -> None:
    """`fedtail sweep FILE --serve`: the sweep file's cron gives a completed sweep with its table."""
    api = live_server["PREFECT_API_URL"]
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"base: {SMOKE}\n"
        "set: {tasks.classes_per_task: null, federation.rounds_per_task: 1}\n"
        "axes: {partition.alpha: [0.5]}\n"
        "seeds: [0]\n"
        "serve: {name: sweep-serve-test, cron: '* * * * *'}\n"
    )
    log = tmp_path / "serve.log"
    serve = _serve(live_server, project, tmp_path, log, ("sweep", str(grid), "--serve"))
    try:

        def completed() -> list[Any]:
            _, runs = _deployment_runs(api, "fedtail-sweep/sweep-serve-test")
            bad = [r for r in runs if r.state and r.state.type.value in ("FAILED", "CRASHED")]
            assert not bad, f"scheduled sweep failed: {bad[0].state}\n{log.read_text()[-3000:]}"
            return [r for r in runs if r.state and r.state.type.value == "COMPLETED"]

        _wait_for("a scheduled sweep to complete", completed, timeout=200, proc=serve)
    finally:
        rc = _stop(serve, signal.SIGINT)
    assert rc == 0, log.read_text()[-3000:]
    summary = (tmp_path / "sweeps" / "grid" / "summary.md").read_text()
    assert "| 0.5 | 1 |" in summary
    assert _deployment_runs(api, "fedtail-sweep/sweep-serve-test")[0].paused
