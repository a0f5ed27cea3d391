"""Serve the pipeline (or a sweep) as a Prefect deployment that runs on cron schedules.

`build_deployment` / `build_sweep_deployment` do everything but block, so the schedules can be checked
without a runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import serve as prefect_serve
from prefect.deployments.runner import RunnerDeployment

from fedtail.config import load_config
from fedtail.prefect_server import check_configured_api
from fedtail.sweep import load_sweep
from flows.pipeline import fl_pipeline
from flows.sweep import fl_sweep


def build_deployment(
    config_path: str = "params.yaml", overrides: dict[str, Any] | None = None, root: str = "."
) -> RunnerDeployment:
    """A deployment named ``serve.name`` with one cron schedule per ``serve.cron`` entry.

    Paths are made absolute: scheduled runs must not depend on the directory they start in.
    """
    cfg = load_config(config_path, overrides or {})
    return fl_pipeline.to_deployment(
        name=cfg.serve.name,
        cron=list(cfg.serve.cron),
        parameters={
            "config_path": str(Path(config_path).resolve()),
            "overrides": dict(overrides or {}),
            "root": str(Path(root).resolve()),
        },
        description=f"fedtail pipeline for {Path(config_path).name}, on cron {', '.join(cfg.serve.cron)}",
    )


def serve(config_path: str = "params.yaml", overrides: dict[str, Any] | None = None, root: str = ".") -> None:
    """Block, running the pipeline on schedule.

    Stopping (Ctrl-C, SIGTERM) pauses the schedules, so no pile of Late runs waits for the next start;
    starting again registers the deployment unpaused, which resumes them.
    """
    check_configured_api()
    prefect_serve(build_deployment(config_path, overrides, root), pause_on_shutdown=True)


def build_sweep_deployment(
    sweep_path: str,
    sweep_id: str,
    overrides: dict[str, Any] | None = None,
    root: str = ".",
    workers: int | None = None,
) -> RunnerDeployment:
    """A deployment of `fl_sweep` named by the sweep file's ``serve.name`` (default ``sweep-<id>``), one
    cron schedule per ``serve.cron`` entry.

    Every scheduled run continues the same sweep folder: finished cells are skipped, so a run does work
    only for what changed since the last one (new axis values or seeds in the file, failed cells, data
    recorded anew in data.dvc, which gives new run folders).
    """
    spec = load_sweep(sweep_path)
    return fl_sweep.to_deployment(
        name=spec.serve.name or f"sweep-{sweep_id}",
        cron=list(spec.serve.cron),
        parameters={
            "sweep_path": str(Path(sweep_path).resolve()),
            "sweep_id": sweep_id,
            "root": str(Path(root).resolve()),
            "workers": workers,
            "overrides": dict(overrides or {}),
        },
        description=f"fedtail sweep {sweep_id} ({Path(sweep_path).name}), "
        f"on cron {', '.join(spec.serve.cron)}",
    )


def serve_sweep(
    sweep_path: str,
    sweep_id: str,
    overrides: dict[str, Any] | None = None,
    root: str = ".",
    workers: int | None = None,
) -> None:
    """Block, running the sweep on schedule (stopping pauses the schedules, as `serve` does)."""
    check_configured_api()
    prefect_serve(
        build_sweep_deployment(sweep_path, sweep_id, overrides, root, workers), pause_on_shutdown=True
    )
