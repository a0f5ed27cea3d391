"""End-to-end federation: same ServerApp/ClientApp on the in-process and both Ray engines, client state,
resume after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fedtail import pipeline, runs
from tests.conftest import crashed_run, smoke_config, smoke_run


@pytest.fixture(scope="module")
def inprocess_run(project: Path) -> tuple[Path, dict]:
    return smoke_run(project, "inprocess")


def test_inprocess_run_writes_every_output(inprocess_run: tuple[Path, dict]) -> None:
    run_dir, metrics = inprocess_run
    for name in (
        "config.yaml",
        "rounds.csv",
        "metrics.json",
        "accuracy_matrix.csv",
        "model.pt",
        "partition_stats.csv",
        "clients.csv",
        "timing.json",
    ):
        assert (run_dir / name).is_file(), name
    rounds = pd.read_csv(run_dir / "rounds.csv")
    assert len(rounds) == 2 * 2  # 2 tasks x 2 rounds (configs/smoke.yaml)
    assert list(rounds["global_round"]) == [1, 2, 3, 4]
    assert rounds["balanced_accuracy"].between(0, 1).all()
    assert 0.0 <= metrics["final_balanced_accuracy"] <= 1.0
    matrix = pd.read_csv(run_dir / "accuracy_matrix.csv", index_col="after_task")
    assert matrix.shape == (2, 2) and pd.isna(matrix.iloc[0, 1])


def test_client_state_persists_across_rounds_and_tasks(inprocess_run: tuple[Path, dict]) -> None:
    clients = pd.read_csv(inprocess_run[0] / "clients.csv")
    # fraction_train = 1: every client trained in all 4 rounds; its context.state counted them.
    assert list(clients["rounds-trained"]) == [4, 4, 4]
    assert all(s == "[0, 1]" for s in clients["tasks-seen"])


@pytest.mark.parametrize("engine", ["ray", "ray-actors"])
def test_ray_engines_give_identical_metrics(
    project: Path, inprocess_run: tuple[Path, dict], engine: str
) -> None:
    ray_dir, ray_metrics = smoke_run(project, engine, **{"engine.name": engine})
    _, metrics = inprocess_run
    for key, value in metrics.items():
        if isinstance(value, float):
            assert ray_metrics[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert ray_metrics[key] == value, key
    clients = pd.read_csv(ray_dir / "clients.csv")
    assert list(clients["rounds-trained"]) == [4, 4, 4]


def test_crashed_run_resumes_to_the_same_result(project: Path, inprocess_run: tuple[Path, dict]) -> None:
    cfg = smoke_config(project, **{"output.run_id": "crashy"})
    run_dir = crashed_run(cfg, project, crash_at=3)
    assert len(pd.read_csv(run_dir / "rounds.csv")) == 3
    staged = pipeline.stage(cfg, project)
    pipeline.simulate(cfg, staged, pipeline.partition(cfg, staged, project), run_dir, mode=runs.Mode.RESUME)
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed == inprocess_run[1]


def test_worker_pool_matches_sequential(project: Path, inprocess_run: tuple[Path, dict]) -> None:
    _, pooled = smoke_run(project, "pool", **{"engine.workers": 2})
    assert pooled == inprocess_run[1]


def test_flwr_run_entry_point_runs_the_whole_pipeline(project: Path, tmp_path: Path) -> None:
    """``flwr run .`` loads ``server.app:app``; drive it through a Grid with the run-config it would get."""
    from flwr.app import Context, RecordDict

    from fedtail.engines.inprocess import InProcessGrid, set_server_identity
    from server.app import app
    from tests.conftest import REPO

    grid = InProcessGrid("clients.app:app", 3)
    set_server_identity(grid.run_id)
    overrides = f"output.runs_dir={tmp_path / 'runs'} output.artifacts_dir={tmp_path / 'art'} output.run_id=f"
    run_config = {"config-file": str(REPO / "configs" / "smoke.yaml"), "root": str(project), "set": overrides}
    app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    run_dir = tmp_path / "runs" / "f"
    assert (run_dir / "metrics.json").is_file() and (run_dir / "report.md").is_file()
    assert (run_dir / runs.MARKER).is_file()


def test_a_stateful_strategy_gives_the_same_result_on_ray(project: Path) -> None:
    """SCAFFOLD (a server variate, clients' variates in their state, records both ways) on Ray's
    simulation engine, against the in-process engine."""
    _, inprocess = smoke_run(project, "scaffold", **{"strategy.name": "scaffold"})
    _, ray = smoke_run(project, "scaffold-ray", **{"strategy.name": "scaffold", "engine.name": "ray"})
    for key, value in inprocess.items():
        if isinstance(value, float):
            assert ray[key] == pytest.approx(value, abs=1e-6), key
