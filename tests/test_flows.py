"""The Prefect layer: cache policy, progress helpers, deployment schedules, and whole flow runs.

Flow runs use one temporary Prefect server for the session (about 7 s to start here) and a temporary
result store, so nothing lands in ``~/.prefect``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from fedtail.config import ConfigError, load_config
from flows.pipeline import (
    OutputDirCache,
    _location,
    artifact_key,
    fl_pipeline,
    round_message,
    round_progress,
    run_name,
)
from flows.serve import build_deployment, build_sweep_deployment

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One temporary Prefect API for all flow tests, with results stored in a temp folder."""
    storage = tmp_path_factory.mktemp("prefect-results")
    with (
        temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}),
        prefect_test_harness(server_startup_timeout=180),
    ):
        yield


def task_states(flow_state: Any, expected: int, timeout: float = 60.0) -> dict[str, str]:
    """Task name -> final state name of one flow run, read back from the API.

    Task run states reach the server as events, a moment after the flow returns: poll until all are in.
    """
    flow_run_id = flow_state.state_details.flow_run_id
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            done = [r for r in runs if r.state is not None and r.state.type.value in FINAL]
            if len(done) >= expected or time.monotonic() > deadline:
                return {r.name.split("-")[0]: r.state.name for r in done}
            time.sleep(0.5)


# ---- plain helpers (no server) -------------------------------------------------------------------
def _policy_ctx(tmp_path: Path) -> SimpleNamespace:
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path / "store")))
    return SimpleNamespace(result_store=store, task=SimpleNamespace(name="stage"))


def test_output_dir_cache_key_is_stable_and_none_when_output_is_gone(tmp_path: Path) -> None:
    ctx = _policy_ctx(tmp_path)
    policy = OutputDirCache(key_fn=lambda inputs: f"stage-{inputs['x']}")
    key = policy.compute_key(ctx, {"x": "a/b"}, {})
    assert key == policy.compute_key(ctx, {"x": "a/b"}, {})  # no record yet: a key, so the run persists
    assert key != policy.compute_key(ctx, {"x": "c"}, {})
    assert key is not None and "/" not in key  # keys become file names in the result store

    out = tmp_path / "artifacts" / "staged"
    out.mkdir(parents=True)
    ctx.result_store.write(out, key=key)
    assert policy.compute_key(ctx, {"x": "a/b"}, {}) == key  # cached path exists: cache hit allowed

    shutil.rmtree(tmp_path / "artifacts")
    assert policy.compute_key(ctx, {"x": "a/b"}, {}) is None  # gone: no cache, the task runs again

    out.mkdir(parents=True)  # the rerun recreates the content-addressed path
    assert policy.compute_key(ctx, {"x": "a/b"}, {}) == key


def test_cache_location_separates_project_roots(tmp_path: Path) -> None:
    cfg = load_config(SMOKE)
    assert _location(cfg, tmp_path / "a") != _location(cfg, tmp_path / "b")
    assert _location(cfg, tmp_path / "a") == _location(cfg, tmp_path / "a")


def test_round_progress_and_message() -> None:
    row = {
        "task": 1,
        "round": 2,
        "global_round": 6,
        "balanced_accuracy": 0.51234,
        "accuracy": 0.6,
        "macro_f1": 0.25,
        "train_loss": 0.75,
    }
    assert round_progress(row, total_rounds=8) == pytest.approx(75.0)
    assert round_progress({**row, "global_round": 9}, total_rounds=8) == 100.0
    assert round_message(row, num_tasks=2, rounds_per_task=4) == (
        "task 2/2 round 2/4 balanced_acc=0.5123 acc=0.6000 macro_f1=0.2500 loss=0.7500"
    )


def test_run_names_and_artifact_keys_tell_runs_apart() -> None:
    assert run_name("params.yaml", {"output.run_id": "r1"}) == "r1: defaults"
    assert (
        run_name("configs/smoke.yaml", {"output.run_id": "r2", "train.lr": 0.1}) == "r2: smoke train.lr=0.1"
    )
    assert len(run_name("params.yaml", {"output.run_id": "r", "x": "y" * 300})) == 120
    assert artifact_key("2026-12-02T10.00_Ab", "report") == "fedtail-2026-12-02t10-00-ab-report"


def test_deployment_has_one_cron_schedule_per_entry(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("serve: {name: nightly, cron: ['0 3 * * *', '30 12 * * 1-5']}\n")
    deployment = build_deployment(str(config), {"partition.alpha": 0.1}, root=str(tmp_path))

    assert deployment.name == "nightly"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *", "30 12 * * 1-5"]
    assert deployment.parameters == {
        "config_path": str(config.resolve()),
        "overrides": {"partition.alpha": 0.1},
        "root": str(tmp_path.resolve()),
    }


def test_sweep_deployment_continues_one_sweep_on_its_cron(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text("axes: {partition.alpha: [0.1, 1.0]}\nserve: {cron: '0 2 * * 0'}\n")
    deployment = build_sweep_deployment(str(path), "grid", {"train.epochs": 1}, root=str(tmp_path), workers=2)

    assert deployment.name == "sweep-grid" and deployment.flow_name == "fedtail-sweep"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * 0"]
    assert deployment.parameters == {
        "sweep_path": str(path.resolve()),
        "sweep_id": "grid",
        "root": str(tmp_path.resolve()),
        "workers": 2,
        "overrides": {"train.epochs": 1},
    }
    path.write_text("serve: {name: weekly, cron: ['0 2 * * 0', '0 2 * * 3']}\n")
    deployment = build_sweep_deployment(str(path), "grid")
    assert deployment.name == "weekly" and len(deployment.schedules) == 2
    path.write_text("serve: {cron: '0 25 * * *'}\n")
    with pytest.raises(ConfigError, match="serve.cron"):
        build_sweep_deployment(str(path), "grid")


def test_deployment_rejects_a_bad_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="partition.alpha"):
        build_deployment(SMOKE, {"partition.alpha": -1})


# ---- flow runs (temporary Prefect server) --------------------------------------------------------
def test_bad_config_fails_before_any_task(prefect_server: None, tmp_path: Path) -> None:
    state = fl_pipeline(
        config_path=SMOKE, overrides={"partition.alpha": -1}, root=str(tmp_path), return_state=True
    )
    assert state.is_failed()
    with pytest.raises(ConfigError, match="partition.alpha"):
        state.result()
    time.sleep(1.0)  # let any (wrongly) started task run reach the server before asserting there is none
    assert task_states(state, expected=0, timeout=0) == {}
    assert not any(tmp_path.iterdir())


def test_pipeline_runs_then_caches_data_steps(prefect_server: None, project: Path, tmp_path: Path) -> None:
    """End to end on digits: run, run again (stage + partition Cached), delete artifacts, run again,
    damage a staged array, run again (stage rebuilt, not handed on from the cache)."""
    base = {
        "federation.num_clients": 3,
        "federation.rounds_per_task": 1,
        "tasks.classes_per_task": 5,
        "train.epochs": 1,
        "output.data_dir": str(project / "data"),
        "output.artifacts_dir": str(tmp_path / "artifacts"),
        "output.runs_dir": str(tmp_path / "runs"),
    }

    names: dict[str, str] = {}

    def run(run_id: str) -> tuple[Path, dict[str, str]]:
        state = fl_pipeline(
            config_path=SMOKE,
            overrides={**base, "output.run_id": run_id},
            root=str(project),
            return_state=True,
        )
        assert state.is_completed(), state
        with get_client(sync_client=True) as client:
            names[run_id] = client.read_flow_run(state.state_details.flow_run_id).name
        return Path(state.result()), task_states(state, expected=5)

    run_dir, states = run("first")
    assert names["first"].startswith("first: smoke ") and "federation.num_clients=3" in names["first"]
    report = Artifact.get(artifact_key("first", "report"))
    assert report is not None and "data:image/png;base64," in str(report.data)  # the plots, inline
    rows = json.loads(str(Artifact.get(artifact_key("first", "rounds")).data))
    assert [(r["task"], r["round"]) for r in rows] == [(1, 1), (2, 1)]  # 1-based, as the log
    assert "recall_0" in rows[0] and rows[0]["balanced_accuracy"] == round(rows[0]["balanced_accuracy"], 4)
    assert "federation:" in str(Artifact.get(artifact_key("first", "config")).data)
    assert run_dir == tmp_path / "runs" / "first"
    for name in ("metrics.json", "rounds.csv", "report.md", "plots/balanced_accuracy.png"):
        assert (run_dir / name).is_file(), name
    assert states == {
        "verify": "Completed",
        "stage": "Completed",
        "partition": "Completed",
        "simulate": "Completed",
        "report": "Completed",
    }

    run_dir, states = run("second")
    assert (run_dir / "metrics.json").is_file()
    assert Artifact.get(artifact_key("first", "report")) is not None  # each run keeps its own artifacts
    assert Artifact.get(artifact_key("second", "report")) is not None
    assert states["stage"] == "Cached" and states["partition"] == "Cached"
    assert states["verify"] == "Completed"  # the data check itself is never cached
    assert states["simulate"] == "Completed" and states["report"] == "Completed"

    shutil.rmtree(tmp_path / "artifacts")  # a cached path must not outlive its directory
    run_dir, states = run("third")
    assert (run_dir / "metrics.json").is_file()
    assert states["stage"] == "Completed" and states["partition"] == "Completed"
    assert (tmp_path / "artifacts").is_dir()

    (x_train,) = (tmp_path / "artifacts" / "staged").glob("*/x_train.npy")
    good = x_train.read_bytes()
    x_train.write_bytes(good[:-4] + bytes(b ^ 0xFF for b in good[-4:]))  # same size, last value changed
    run_dir, states = run("fourth")
    assert states["stage"] == "Completed" and x_train.read_bytes() == good
    assert states["partition"] == "Cached"  # its own files still match their manifest


def test_cli_resume_continues_a_crashed_run(prefect_server: None, project: Path, tmp_path: Path) -> None:
    """`fedtail run --resume RUN_ID` picks up the run's own config.yaml and finishes from its checkpoint."""
    from fedtail.cli import main
    from tests.conftest import crashed_run

    overrides = [
        f"output.data_dir={project / 'data'}",
        f"output.artifacts_dir={tmp_path / 'artifacts'}",
        f"output.runs_dir={tmp_path / 'runs'}",
    ]
    # no run id: the folder name is generated, as for `fedtail run`
    run_dir = crashed_run(load_config(SMOKE, overrides), project, crash_at=2)

    args = ["run", "--config", SMOKE, "--root", str(project), "--resume", run_dir.name]
    assert main([*args, *[a for o in overrides for a in ("--set", o)]]) == 0
    rows = (run_dir / "rounds.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and (run_dir / "metrics.json").is_file() and (run_dir / "report.md").is_file()


def test_stage_cache_key_reads_the_configured_data_dir(tmp_path: Path) -> None:
    """The key carries the dataset's version recorded beside ``output.data_dir``, wherever that is, and
    only that dataset's: recording another dataset leaves it unchanged."""
    from fedtail.pipeline import cache_key_stage

    entry = "- md5: {}\n  path: raw/{}\n"
    digits = entry.format("ab" * 16, "digits/images.npy") + entry.format("cd" * 16, "digits/labels.npy")
    (tmp_path / "raw.dvc").write_text("outs:\n" + digits)
    cfg = load_config(SMOKE, {"output.data_dir": "raw"})
    key = cache_key_stage(cfg, tmp_path)
    assert key != cache_key_stage(load_config(SMOKE), tmp_path)  # data/ has no data.dvc here
    (tmp_path / "raw.dvc").write_text("outs:\n" + digits + entry.format("ef" * 16, "mnist1d/x_n4000.npy"))
    assert cache_key_stage(cfg, tmp_path) == key
    (tmp_path / "raw.dvc").write_text("outs:\n" + digits.replace("ab" * 16, "ba" * 16))
    assert cache_key_stage(cfg, tmp_path) != key


def test_flow_refuses_an_existing_run_before_any_task(prefect_server: None, tmp_path: Path) -> None:
    """A scheduled or UI-started flow is held to the same rule as the CLI: no silent overwrite."""
    from fedtail import runs

    with runs.claim(tmp_path / "runs" / "taken", runs.Mode.NEW) as run_dir:
        (run_dir / "metrics.json").write_text("{}\n")
    overrides = {"output.runs_dir": str(tmp_path / "runs"), "output.run_id": "taken"}
    state = fl_pipeline(config_path=SMOKE, overrides=overrides, root=str(tmp_path), return_state=True)
    assert state.is_failed()
    with pytest.raises(runs.RunFolderError, match="already exists"):
        state.result()
    time.sleep(1.0)
    assert task_states(state, expected=0, timeout=0) == {}
    assert (run_dir / "metrics.json").read_text() == "{}\n"


def _flow_run_message(state: Any) -> str | None:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).state.message


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_run_in_progress_fails_the_flow_with_its_one_line(
    prefect_server: None, project: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """fedtail's own error raised inside a task (here the run lock, in simulate) ends the flow run as
    Failed with that error's message, and Prefect logs no ERROR record or traceback about it."""
    from fedtail import runs

    overrides = {
        "output.data_dir": str(project / "data"),
        "output.artifacts_dir": str(tmp_path / "artifacts"),
        "output.runs_dir": str(tmp_path / "runs"),
        "output.run_id": "busy",
    }
    (tmp_path / "runs").mkdir()
    with runs.lock_run(tmp_path / "runs" / "busy"):  # another process writing the run
        state = fl_pipeline(config_path=SMOKE, overrides=overrides, root=str(project), return_state=True)
    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), runs.RunFolderError)
    message = _flow_run_message(state)
    assert message is not None and message.startswith("run 'busy' is being written by process "), message
    assert _errors_logged(caplog) == []


def test_corrupted_raw_data_fails_the_flow_with_its_one_line(
    prefect_server: None, project: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "project"
    shutil.copytree(project, copy)
    images = copy / "data" / "digits" / "images.npy"
    good = images.read_bytes()
    images.unlink()  # never write through a DVC link
    images.write_bytes(good[:-4] + bytes(b ^ 0xFF for b in good[-4:]))
    overrides = {"output.runs_dir": str(tmp_path / "runs"), "output.run_id": "corrupt"}
    state = fl_pipeline(config_path=SMOKE, overrides=overrides, root=str(copy), return_state=True)
    assert state.is_failed()
    message = _flow_run_message(state)
    assert message is not None and message.startswith("digits in data/ does not match"), message
    assert _errors_logged(caplog) == []


def test_disk_full_while_writing_the_report_leaves_a_run_to_report_later(
    prefect_server: None,
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`fedtail run` whose disk fills while the report's plots are written: one line naming the plot and
    the command that finishes the report, which then does."""
    import errno

    from fedtail import io, report
    from fedtail.cli import main

    def full(fh: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def plots(run_dir: Path) -> None:  # the first plot's PNG write fails as on a full disk
        io.write_with(Path(run_dir) / "plots" / "balanced_accuracy.png", full)

    args = ["--config", SMOKE, "--root", str(project), "--set", f"output.data_dir={project / 'data'}"]
    args += ["--set", f"output.artifacts_dir={tmp_path / 'artifacts'}"]
    args += ["--set", f"output.runs_dir={tmp_path / 'runs'}", "--run-id", "full"]
    with monkeypatch.context() as patch:
        patch.setattr(report, "write_plots", plots)
        assert main(["run", *args]) == 1
    err = capsys.readouterr().err
    run_dir = tmp_path / "runs" / "full"
    assert err.startswith(f"fedtail: cannot write {run_dir / 'plots' / 'balanced_accuracy.png'}: ") and (
        "Traceback" not in err
    ), err
    assert "no space left on the device; free some space, then write its report" in err
    assert err.strip().endswith(
        f"fedtail report --run-id full --root {project} --set output.runs_dir={tmp_path / 'runs'}"
    ), err
    assert not (run_dir / "report.md").exists() and (run_dir / "metrics.json").is_file()
    assert main(["report", *args]) == 0
    assert (run_dir / "report.md").is_file()
