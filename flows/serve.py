"""Serve the pipeline as a Prefect deployment that runs on the config's cron schedules.

`build_deployment` does everything but block, so the schedules can be checked without a runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import serve as prefect_serve
from prefect.deployments.runner import RunnerDeployment

from fedtail.config import load_config
from flows.pipeline import fl_pipeline


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
    prefect_serve(build_deployment(config_path, overrides, root), pause_on_shutdown=True)
