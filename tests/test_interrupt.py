"""Stopping `fedtail run` for real: Ctrl-C in a terminal (SIGINT to the whole process group) and kill -9.

Each test starts `python -m fedtail.cli run` in its own session, as a terminal's foreground job, on a run
long enough to be interrupted mid-way, and waits for the first checkpoint before signalling.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import as_terminal_job

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")


@dataclass
class Run:
    proc: subprocess.Popen
    run_dir: Path
    children: list[psutil.Process]  # taken before any signal: the temporary server among them
    log: Path


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups and parent-death signal")


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture
def start_run(project: Path, tmp_path: Path, prefect_home: Path) -> Iterator[Callable[..., Run]]:
    """Starts a `fedtail run` of thousands of rounds and returns once it is past its first checkpoint."""
    started: list[tuple[subprocess.Popen, list[psutil.Process]]] = []
    log = (tmp_path / "run.log").open("w")

    def start(*overrides: str) -> Run:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # temporary server
        env |= {"PYTHONPATH": str(REPO), "PREFECT_HOME": str(prefect_home)}
        cmd = [sys.executable, "-m", "fedtail.cli", "run", "--config", SMOKE, "--root", str(project)]
        for override in (
            f"output.data_dir={project / 'data'}",
            f"output.artifacts_dir={tmp_path / 'artifacts'}",
            f"output.runs_dir={tmp_path / 'runs'}",
            "federation.rounds_per_task=5000",
            *overrides,
        ):
            cmd += ["--set", override]
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=as_terminal_job,
        )
        started.append((proc, []))
        deadline = time.monotonic() + 240
        while not list((tmp_path / "runs").glob("*/checkpoint.pt")):
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        started[-1] = (proc, children)
        assert any("uvicorn" in _cmdline(p) for p in children), "no temporary Prefect server?"
        run_dir = next((tmp_path / "runs").glob("*/checkpoint.pt")).parent
        return Run(proc, run_dir, children, tmp_path / "run.log")

    yield start
    for proc, children in started:
        for p in [proc, *children]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()
        proc.wait(10)
    log.close()


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()[:4])
    except psutil.Error:  # gone meanwhile
        return ""


def _alive(procs: list[psutil.Process], timeout: float) -> list[str]:
    """Command lines of the processes still running after waiting up to ``timeout`` for them to go."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [_cmdline(p) for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize(
    ("engine", "how"),
    [("inprocess", "ctrl-c"), ("ray", "ctrl-c"), ("ray-actors", "ctrl-c"), ("inprocess", "sigterm")],
)
def test_ctrl_c_stops_quickly_leaves_a_checkpoint_and_says_how_to_resume(
    start_run: Callable[..., Run], engine: str, how: str
) -> None:
    long_run = start_run(f"engine.name={engine}")
    if how == "ctrl-c":
        os.killpg(long_run.proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
    else:
        long_run.proc.terminate()  # `kill PID`, a scheduler or container stop: the main process only
    try:
        rc = long_run.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail("fedtail run did not stop within 20 s of Ctrl-C")
    output = long_run.log.read_text()
    assert rc == 130, output[-3000:]
    assert f"fedtail run --resume {long_run.run_dir.name}" in output
    assert "Connection refused" not in output and "ConnectError" not in output, output[-3000:]
    assert (long_run.run_dir / "checkpoint.pt").is_file() and not (long_run.run_dir / "metrics.json").exists()
    assert _alive(long_run.children, timeout=5) == []


def test_kill_9_takes_the_temporary_prefect_server_with_it(start_run: Callable[..., Run]) -> None:
    long_run = start_run()
    long_run.proc.kill()
    long_run.proc.wait(10)
    assert _alive(long_run.children, timeout=10) == []


def test_ctrl_c_before_the_run_folder_exists_offers_no_resume(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import flows.pipeline
    from fedtail.cli import main

    def interrupted(**_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.pipeline, "fl_pipeline", interrupted)
    monkeypatch.setattr("fedtail.prefect_server.check_api", lambda url: None)  # nothing answers there
    args = ["run", "--config", SMOKE, "--set", f"output.runs_dir={tmp_path}", "--run-id", "x"]
    try:
        with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # no temporary server
            rc = main(args)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped `fedtail run`")
    assert rc == 130
    assert "interrupted; nothing to resume yet" in capsys.readouterr().err


def test_ctrl_c_in_the_dvc_simulate_stage_says_how_to_resume(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`fedtail simulate` (what `dvc repro` runs) stops like `fedtail run`: exit 130 and its own hint."""
    import fedtail.pipeline
    from fedtail import runs
    from fedtail.cli import main

    def interrupted(cfg, staged, parts, run_dir, mode, **_: object) -> None:
        with runs.claim(run_dir, mode):
            (run_dir / "config.yaml").write_text("seed: 0\n")
            raise KeyboardInterrupt

    monkeypatch.setattr(fedtail.pipeline, "simulate", interrupted)
    args = ["simulate", "--config", SMOKE, "--root", str(project), "--run-id", "s"]
    args += ["--set", f"output.runs_dir={tmp_path}", "--set", f"output.artifacts_dir={tmp_path / 'a'}"]
    assert main(args) == 130
    assert "interrupted; resume with: fedtail simulate --run-id s --resume" in capsys.readouterr().err
    # the run id given as a config override is the one to resume (it printed "None" before)
    args = [*args[:5], "--set", "output.run_id=via-set", *args[7:]]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "resume with: fedtail simulate --run-id via-set --resume" in err and "None" not in err


def test_detached_server_runs_exactly_prefects_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """fedtail copies Prefect's uvicorn command to add two Popen options; a Prefect upgrade that changes
    the command (or its environment) must fail here rather than drift silently."""
    import subprocess as sp

    from prefect.server.api.server import SubprocessASGIServer

    from fedtail.prefect_server import DetachedServer

    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(sp, "Popen", lambda *a, **k: calls.append((a, k)))
    server = DetachedServer.__new__(DetachedServer)
    server.port = 4321
    SubprocessASGIServer._run_uvicorn_command(server)
    DetachedServer._run_uvicorn_command(server)
    (prefect_args, prefect_kwargs), (our_args, our_kwargs) = calls
    assert our_args == prefect_args
    assert our_kwargs.pop("start_new_session") is True and callable(our_kwargs.pop("preexec_fn"))
    assert our_kwargs == prefect_kwargs
    assert "127.0.0.1" in our_kwargs["args"]


def test_ctrl_c_stops_a_sweep_and_running_it_again_gives_the_same_table(
    project: Path, tmp_path: Path, prefect_home: Path
) -> None:
    """Ctrl-C mid-sweep: exit 130, workers gone, the hint; the same command again finishes the sweep with
    the table an uninterrupted sweep gives (finished runs kept, the interrupted one resumed)."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"base: {SMOKE}\n"
        "set:\n"
        "  tasks.classes_per_task: null\n"
        "  federation.rounds_per_task: 60\n"  # a run takes seconds: room to see one finished, one mid-way
        f"  output.data_dir: {project / 'data'}\n"
        f"  output.artifacts_dir: {tmp_path / 'artifacts'}\n"
        f"  output.sweeps_dir: {tmp_path / 'sweeps'}\n"
        "axes: {partition.alpha: [0.5, 5.0]}\n"
        "seeds: [0]\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PYTHONPATH": str(REPO), "PREFECT_HOME": str(prefect_home)}
    log_path = tmp_path / "sweep.log"

    def sweep(*extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "fedtail.cli", "sweep", str(grid), "--root", str(project), *extra]
        with log_path.open("a") as log:
            return subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=as_terminal_job,
            )

    runs = tmp_path / "sweeps" / "grid" / "runs"
    proc = sweep()
    try:
        deadline = time.monotonic() + 240
        while not (  # one run finished, the next one mid-way (its checkpoint written)
            list(runs.glob("*/metrics.json"))
            and [c for c in runs.glob("*/checkpoint.pt") if not (c.parent / "metrics.json").exists()]
        ):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no finished run and one mid-way within 240 s"
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert rc == 130, output[-3000:]
    assert "interrupted; run the same command again to continue sweep grid" in output
    assert "Traceback" not in output, output[-3000:]
    assert _alive(children, timeout=10) == []
    assert not (tmp_path / "sweeps" / "grid" / "summary.csv").exists()
    assert len(list(runs.glob("*/metrics.json"))) < 2

    assert sweep().wait(300) == 0, log_path.read_text()[-3000:]
    assert sweep("--sweep-id", "reference").wait(300) == 0, log_path.read_text()[-3000:]

    def table(sweep_id: str) -> list[dict[str, str]]:
        with (tmp_path / "sweeps" / sweep_id / "summary.csv").open() as fh:
            return list(csv.DictReader(fh))

    resumed, reference = table("grid"), table("reference")
    assert [r["partition.alpha"] for r in resumed] == ["0.5", "5.0"]
    assert len(resumed) == len(reference)
    for got, want in zip(resumed, reference, strict=True):
        assert got.keys() == want.keys() and got["runs"] == "1" and got["failed"] == "0"
        for key in got:  # the same machine's float kernels: equal up to a stated 1e-9 ('' is NaN)
            value, expected = (float(row[key] or "nan") for row in (got, want))
            assert value == pytest.approx(expected, rel=1e-9, abs=1e-9, nan_ok=True), key
