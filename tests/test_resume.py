"""Resume = uninterrupted, byte for byte: SIGKILL a real run at random instants, resume, compare files.

The run uses a stateful ClientApp (tests/apps/stateful_client.py: client-side momentum in
``context.state``), so a resume that lost the clients' state would give different numbers. Byte
identity is promised on one machine (both runs here use the same CPU kernels); across machines the
metrics agree within tolerance (see docs/architecture.md).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedtail import pipeline, runs
from server.recorder import CHECKPOINT, json_from_tensor
from tests.apps.stateful_client import ROUNDS_PER_TASK, config
from tests.conftest import REPO

OUTPUTS = (
    "rounds.csv",
    "clients.csv",
    "metrics.json",
    "accuracy_matrix.csv",
    "model.pt",
    "schedule.json",
    "partition_stats.csv",
    runs.MARKER,
)
TOTAL_ROUNDS = 2 * ROUNDS_PER_TASK
DELAY = 0.1  # seconds each client sleeps per round while a test means to kill the run


def _start(project: Path, runs_dir: Path, engine: str, mode: str, delay: float) -> subprocess.Popen:
    env = {**os.environ, "FEDTAIL_TEST_CLIENT_DELAY": str(delay), "PYTHONPATH": str(REPO)}
    args = [project, runs_dir, project / "artifacts", "r", engine, mode]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.apps.stateful_client", *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill reaches every process it started
    )


def _session_alive(sid: int) -> list[str]:
    """Command lines of processes still in session ``sid``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                alive.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except (OSError, IndexError, ValueError):
            continue
    return alive


def _wait_gone(sid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (alive := _session_alive(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"processes left behind after SIGKILL: {alive}"


def _rounds_done(run_dir: Path) -> int:
    path = run_dir / "rounds.csv"
    return max(len(path.read_text().splitlines()) - 1, 0) if path.is_file() else 0


def _kill_mid_run(proc: subprocess.Popen, run_dir: Path, rng: random.Random) -> bool:
    """Once the process has checkpointed a new round, SIGKILL its whole group at a random instant.

    The instant is drawn within the time its remaining rounds must take (each client sleeps ``DELAY``, so
    a round takes at least that even when clients run in parallel), so the kill lands mid-run: inside a
    round, an evaluation or a checkpoint write. Returns False, killing nothing, when too few rounds are
    left to do that.
    """
    before = _rounds_done(run_dir)
    deadline = time.monotonic() + 180
    while (done := _rounds_done(run_dir)) <= before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    left = TOTAL_ROUNDS - done - 1
    if left <= 0:
        return False
    time.sleep(rng.uniform(0.0, 0.9 * left * DELAY))  # a round takes >= DELAY even with parallel clients
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _wait_gone(proc.pid)
    return True


@pytest.fixture(scope="module")
def reference(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, uninterrupted, in this process (in-process engine)."""
    from tests.apps.stateful_client import main

    runs_dir = tmp_path_factory.mktemp("reference-runs")
    main([str(project), str(runs_dir), str(project / "artifacts"), "r", "inprocess", "new"])
    return runs_dir / "r"


@pytest.mark.parametrize(("engine", "kills"), [("inprocess", 3), ("ray", 1), ("ray-actors", 1)])
def test_sigkilled_run_resumes_byte_for_byte(
    project: Path, tmp_path: Path, reference: Path, engine: str, kills: int
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    run_dir = tmp_path / "runs" / "r"
    print(f"random kill instants from seed {seed}")
    for i in range(kills):
        proc = _start(project, tmp_path / "runs", engine, "new" if i == 0 else "resume", delay=DELAY)
        if not _kill_mid_run(proc, run_dir, rng):
            proc.kill()
            proc.wait()
            break
        assert not (run_dir / "metrics.json").exists(), "the run finished before it was killed"
        assert (run_dir / CHECKPOINT).is_file() and not list(run_dir.glob(f".{CHECKPOINT}.*"))
        state = torch.load(run_dir / CHECKPOINT, weights_only=True)
        assert 0 < len(json_from_tensor(state["rows"])) < TOTAL_ROUNDS and state["client_states"]

    proc = _start(project, tmp_path / "runs", engine, "resume", delay=0.0)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]
    for name in OUTPUTS:
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), name
    ours, theirs = (yaml.safe_load((d / "config.yaml").read_text()) for d in (run_dir, reference))
    assert {**ours, "output": None, "engine": None} == {**theirs, "output": None, "engine": None}


def test_resume_without_client_state_would_differ(project: Path, tmp_path: Path, reference: Path) -> None:
    """Guards the test above: dropping the saved client states changes the result."""
    from tests.apps.stateful_client import main

    runs_dir = tmp_path / "runs"
    cfg = config(project, runs_dir, project / "artifacts", "r", "inprocess")
    staged = pipeline.stage(cfg, project)
    parts = pipeline.partition(cfg, staged, project)

    def crash(row: dict) -> None:
        if row["global_round"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.simulate(
            cfg, staged, parts, runs_dir / "r", on_round=crash, client_app="tests.apps.stateful_client:app"
        )
    path = runs_dir / "r" / CHECKPOINT
    state = torch.load(path, weights_only=True)
    state["client_states"] = {}
    torch.save(state, path)
    main([str(project), str(runs_dir), str(project / "artifacts"), "r", "inprocess", "resume"])
    assert (runs_dir / "r" / "model.pt").read_bytes() != (reference / "model.pt").read_bytes()
