"""Shared fixtures: a throw-away project root (git + DVC) with the digits data staged once."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if "PYTEST_XDIST_WORKER" in os.environ and "PREFECT_HOME" not in os.environ:
    # Each xdist worker's `fedtail run` children get their own Prefect home: two temporary servers on
    # one SQLite file lock each other out. Set before anything imports Prefect.
    import atexit
    import shutil
    import tempfile

    _home = tempfile.mkdtemp(prefix=f"fedtail-prefect-{os.environ['PYTEST_XDIST_WORKER']}-")
    atexit.register(shutil.rmtree, _home, ignore_errors=True)
    os.environ["PREFECT_HOME"] = _home

import fedtail  # noqa: F401  (applies the offline env defaults before Prefect/DVC/Flower import)
from fedtail.config import FedtailConfig, load_config

if TYPE_CHECKING:
    import torch

    from clients.local import LocalContext

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Import Flower before any test captures output: its console handler binds ``sys.stderr`` on import,
    and bound to one test's capture it fails on every later line once that capture is closed."""
    import flwr.common.logger  # noqa: F401


def git(root: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    out = subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True, text=True)
    return out.stdout


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repo with DVC initialised, a local remote and digits versioned in data.dvc, as a fresh clone
    would have."""
    from fedtail.staging import add_data, init_dvc

    root = tmp_path_factory.mktemp("project")
    git(root, "init", "-q")
    (root / "README.md").write_text("test project\n")
    git(root, "add", "README.md")
    git(root, "commit", "-q", "-m", "init")
    init_dvc(root)
    add_data(smoke_config(root), root)
    return root


def as_terminal_job() -> None:
    """``preexec_fn`` for a child that plays a terminal's foreground job: SIGINT back to its default.

    A job started in the background by a non-interactive shell (as a CI runner may start the suite)
    inherits SIGINT *ignored*, and Python then never raises KeyboardInterrupt; a terminal's foreground
    job, which the Ctrl-C tests imitate, always has the default.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def smoke_config(root: Path, **overrides) -> FedtailConfig:
    """configs/smoke.yaml with every output under ``root``."""
    base = {
        "output.data_dir": str(root / "data"),
        "output.artifacts_dir": str(root / "artifacts"),
        "output.runs_dir": str(root / "runs"),
    }
    return load_config(REPO / "configs" / "smoke.yaml", {**base, **overrides})


def smoke_run(root: Path, run_id: str, **overrides) -> tuple[Path, dict]:
    """Stage, partition and simulate `smoke_config` (in-process); the run folder and its metrics."""
    import json

    from fedtail import pipeline

    cfg = smoke_config(root, **{"output.run_id": run_id, **overrides})
    staged = pipeline.stage(cfg, root)
    parts = pipeline.partition(cfg, staged, root)
    run_dir = pipeline.simulate(cfg, staged, parts, pipeline.new_run_dir(cfg, root))
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def crashed_run(cfg: FedtailConfig, root: Path, crash_at: int) -> Path:
    """Stage, partition and simulate until global round ``crash_at``, then 'crash' (KeyboardInterrupt).

    Returns the run folder, left with a checkpoint and without metrics.json.
    """
    from fedtail import pipeline

    staged = pipeline.stage(cfg, root)
    parts = pipeline.partition(cfg, staged, root)
    run_dir = pipeline.new_run_dir(cfg, root)

    def crash(row: dict) -> None:
        if row["global_round"] == crash_at:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        pipeline.simulate(cfg, staged, parts, run_dir, on_round=crash)
    assert not (run_dir / "metrics.json").exists()
    return run_dir


def local_context(cfg: FedtailConfig, model: torch.nn.Module, **fields) -> LocalContext:
    """A `LocalContext` for one client's round outside a federation: task 0, round 1, all classes seen,
    an empty state, ``model`` as the received global model; any field can be overridden."""
    import copy

    import numpy as np
    import torch
    from flwr.app import RecordDict

    from clients.local import LocalContext
    from fedtail.protocol import Job

    frozen = copy.deepcopy(model)
    classes = list(range(cfg.num_classes))
    base = {
        "job": Job(cfg, Path("."), Path(".")),
        "partition_id": 0,
        "task": 0,
        "global_round": 1,
        "task_classes": classes,
        "seen_classes": classes,
        "class_prior": np.full(cfg.num_classes, 1.0 / cfg.num_classes),
        "class_counts": np.zeros(cfg.num_classes, dtype=np.int64),
        "model": model,
        "global_model_fn": lambda: frozen,
        "state": RecordDict(),
        "device": torch.device("cpu"),
    }
    return LocalContext(**{**base, **fields})
