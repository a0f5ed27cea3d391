"""The fedtail pipeline as a Prefect flow: stage -> partition -> simulate -> report.

Each task is a thin wrapper around a plain function of `fedtail.pipeline`; Prefect adds what plain calls
lack: cross-run caching of the data steps, a progress bar and per-round log lines while the federation
trains, and the report as UI artifacts. The config is validated in the flow body before any task runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from fedtail import pipeline, runs
from fedtail.config import FedtailConfig, check_paths, load_config
from fedtail.partition import partition_problems
from fedtail.progress import ROUND_RECORD, RoundProgress, round_description
from fedtail.report import embedded_report_markdown, rounds_table, ui_rounds
from fedtail.staging import check_versioned, ensure_raw, staged_problems
from flows.errors import fails_cleanly

log = logging.getLogger(__name__)

TABLE_EVERY_SECONDS = 10.0
"""The live per-round table artifact is re-sent at most this often (and at every task's end): each
update sends the whole table, so updating it every round of a long run would grow quadratically."""


def artifact_key(run_id: str, what: str) -> str:
    """``fedtail-<run id>-<what>``: one key per run, so the Artifacts page keeps every run's progress,
    table, config and report (Prefect keys: lowercase letters, digits, dashes)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-") or "run"
    return f"fedtail-{slug}-{what}"


# ---- caching -------------------------------------------------------------------------------------
@dataclass
class OutputDirCache(CachePolicy):
    """Cache a task that returns a content-addressed directory, keyed on ``key_fn(task inputs)``.

    Prefect would happily return a cached path whose directory someone deleted since (``rm -rf
    artifacts/``). Before Prefect looks the key up, this policy reads the stored record itself: if the path
    it holds is gone, the key is None, so the task runs again (and is not persisted). Because the
    directory is content-addressed, the rerun recreates the same path and the old record is valid again.
    The same holds when ``problems_fn(path)`` reports a file that no longer matches its recorded sha256
    (the task rebuilds it), so a modified or truncated staged array is never handed on from the cache.
    """

    key_fn: Callable[[dict[str, Any]], str] | None = None
    problems_fn: Callable[[Path], list[str]] | None = None

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        if self.key_fn is None:
            raise ValueError("OutputDirCache needs a key_fn")
        key = re.sub(r"[^A-Za-z0-9._-]", "_", f"fedtail-{self.key_fn(inputs)}")
        store = task_ctx.result_store
        if store.exists(key):
            cached = store.read(key).result
            if not Path(cached).is_dir():
                log.warning("cached output %s no longer exists; running %s again", cached, task_ctx.task.name)
                return None
            if self.problems_fn is not None and (problems := self.problems_fn(Path(cached))):
                log.warning(
                    "cached output %s fails its check (%s); running %s again",
                    cached,
                    ", ".join(problems),
                    task_ctx.task.name,
                )
                return None
        return key


def _location(cfg: FedtailConfig, root: Path) -> str:
    """Hash of where outputs land, so two project checkouts never share a cached path."""
    where = [str(Path(root).resolve()), cfg.output.data_dir, cfg.output.artifacts_dir]
    return hashlib.sha256(json.dumps(where).encode()).hexdigest()[:10]


def stage_key(inputs: dict[str, Any]) -> str:
    cfg, root = inputs["cfg"], Path(inputs["root"])
    return f"{pipeline.cache_key_stage(cfg, root)}-{_location(cfg, root)}"


def partition_key(inputs: dict[str, Any]) -> str:
    cfg, root = inputs["cfg"], Path(inputs["root"])
    return f"{pipeline.cache_key_partition(cfg, Path(inputs['staged_dir']))}-{_location(cfg, root)}"


STAGE_CACHE = OutputDirCache(key_fn=stage_key, problems_fn=staged_problems)
PARTITION_CACHE = OutputDirCache(key_fn=partition_key, problems_fn=partition_problems)


# ---- per-round progress (plain functions) --------------------------------------------------------
def round_progress(row: dict[str, Any], total_rounds: int) -> float:
    """Percent done after ``row``; ``global_round`` counts rounds over all tasks, so resumes are right."""
    return min(100.0, 100.0 * int(row["global_round"]) / max(total_rounds, 1))


def round_message(row: dict[str, Any], num_tasks: int, rounds_per_task: int) -> str:
    return (
        f"{round_description(row, num_tasks, rounds_per_task)} "
        f"balanced_acc={float(row['balanced_accuracy']):.4f} acc={float(row['accuracy']):.4f} "
        f"macro_f1={float(row['macro_f1']):.4f} loss={float(row['train_loss']):.4f}"
    )


# ---- tasks ---------------------------------------------------------------------------------------
@task(name="verify-data", cache_policy=NO_CACHE, persist_result=False)
def verify_data_task(cfg: FedtailConfig, root: Path) -> Path:
    """Check data/ against data.dvc on every run (~10 ms), even when the staged arrays come from cache."""
    return ensure_raw(cfg, root)


@task(name="stage", cache_policy=STAGE_CACHE, persist_result=True)
def stage_task(cfg: FedtailConfig, root: Path) -> Path:
    return pipeline.stage(cfg, root).resolve()


@task(name="partition", cache_policy=PARTITION_CACHE, persist_result=True)
def partition_task(cfg: FedtailConfig, staged_dir: Path, root: Path) -> Path:
    return pipeline.partition(cfg, staged_dir, root).resolve()


@task(name="simulate", cache_policy=NO_CACHE, persist_result=False)
def simulate_task(
    cfg: FedtailConfig, staged_dir: Path, partition_dir: Path, run_dir: Path, mode: runs.Mode = runs.Mode.NEW
) -> Path:
    """Train; every round moves the progress artifact, logs one line to the Prefect run log, draws the
    terminal bar and grows the per-round table artifact (at most every `TABLE_EVERY_SECONDS`)."""
    logger = get_run_logger()  # captured here: Flower may call on_round from its own thread
    num_tasks, rounds = cfg.num_tasks, cfg.task_rounds
    total = num_tasks * rounds
    run_id = run_dir.name
    progress_id = create_progress_artifact(
        0.0, key=artifact_key(run_id, "progress"), description=f"{run_id}: rounds done of {total}"
    )
    table: list[dict[str, Any]] = []
    if mode is runs.Mode.RESUME and (run_dir / "rounds.csv").is_file():
        table = rounds_table(run_dir)  # the rounds before the crash (trimmed to the checkpoint below)
    sent = [0.0]

    def on_round(row: dict[str, Any]) -> None:
        logger.info(round_message(row, num_tasks, rounds), extra={ROUND_RECORD: True})
        bar.update(row)
        while table and table[-1]["global_round"] >= int(row["global_round"]):
            table.pop()  # a resumed run's rows past its checkpoint, recorded again now
        table.extend(ui_rounds(runs.public_rows([row])))
        try:
            update_progress_artifact(progress_id, round_progress(row, total))
            now = time.monotonic()
            if now - sent[0] >= TABLE_EVERY_SECONDS or int(row["round"]) == rounds:
                rounds_artifact(run_id, table)
                sent[0] = now
        except Exception as err:  # a UI artifact must never stop hours of training
            logger.warning("progress artifacts not updated: %s", err)

    with RoundProgress(total, num_tasks, rounds) as bar:
        return pipeline.simulate(cfg, staged_dir, partition_dir, run_dir, on_round, mode)


def rounds_artifact(run_id: str, rows: list[dict[str, Any]]) -> None:
    create_table_artifact(
        rows,
        key=artifact_key(run_id, "rounds"),
        description=f"{run_id}: metrics per round (tasks and rounds 1-based, as in the log; "
        "recall_0, recall_1, ...: each class's recall)",
    )


@task(name="report", cache_policy=NO_CACHE, persist_result=False)
def report_task(run_dir: Path) -> Path:
    report = pipeline.report(run_dir)
    run_id = run_dir.name
    create_markdown_artifact(
        embedded_report_markdown(run_dir), key=artifact_key(run_id, "report"), description=str(report)
    )
    rounds_artifact(run_id, rounds_table(run_dir))
    return report


# ---- flow ----------------------------------------------------------------------------------------
def run_name(config_path: str, overrides: dict[str, Any]) -> str:
    """``<run id>: <preset> k=v, ...``: the run id and what differs from the default config (the preset
    file, when not ``params.yaml``, and the overrides), so runs can be told apart in the UI's list."""
    run_id = str(overrides.get("output.run_id") or "new run")
    differs = [Path(config_path).stem] if Path(config_path).name != "params.yaml" else []
    differs += [f"{k}={v}" for k, v in sorted(overrides.items()) if k != "output.run_id"]
    name = f"{run_id}: {' '.join(differs)}" if differs else f"{run_id}: defaults"
    return name if len(name) <= 120 else name[:119] + "…"


def _run_name() -> str:
    """`run_name` of the flow run's parameters; never raises, so a bad config fails in the flow body."""
    params = flow_run.parameters
    try:
        return run_name(str(params.get("config_path", "params.yaml")), dict(params.get("overrides") or {}))
    except Exception:  # a name must not crash the run before the flow body reports the error
        return "fedtail-run"


@flow(name="fedtail-pipeline", flow_run_name=_run_name)
@fails_cleanly
def fl_pipeline(
    config_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    root: str = ".",
    resume: bool = False,
    overwrite: bool = False,
) -> str:
    """Run the whole experiment; returns the run folder. Data steps are cached across runs.

    An existing run folder is refused unless ``resume`` (continue its checkpoint) or ``overwrite``
    (replace it) is set; both are checked before any task runs. fedtail's own errors end the run as
    Failed with their message (`flows.errors.fails_cleanly`).
    """
    cfg = load_config(config_path, overrides or {})
    mode = runs.Mode.from_flags(resume, overwrite)
    root_dir = Path(root).resolve()
    check_paths(cfg, root_dir)
    run_dir = pipeline.new_run_dir(cfg, root_dir)
    pipeline.check_run_target(cfg, run_dir, mode)
    check_versioned(cfg, root_dir)
    create_markdown_artifact(
        f"# Config of run `{run_dir.name}`\n\nResolved from `{config_path}` and the overrides "
        f"`{json.dumps(overrides or {})}`:\n\n```yaml\n{cfg.to_yaml()}```\n",
        key=artifact_key(run_dir.name, "config"),
        description=f"{run_dir.name}: the resolved config",
    )
    verify_data_task(cfg, root_dir)
    staged = stage_task(cfg, root_dir)
    parts = partition_task(cfg, staged, root_dir)
    simulate_task(cfg, staged, parts, run_dir, mode)
    report_task(run_dir)
    return str(run_dir)
