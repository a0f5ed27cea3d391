"""An experiment grid as a Prefect flow: expand the sweep file, check every cell, stage the data each cell
needs once, run the cells in worker processes, write and publish the comparison table.

The work is `fedtail.sweep`'s plain functions; the flow adds a progress artifact (runs done / total),
one log line per finished run, and the summary table and plot path as artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.logging import get_run_logger

from fedtail import io, pipeline, sweep
from fedtail.config import FedtailConfig, check_paths, check_run_id, load_config
from fedtail.staging import check_versioned, ensure_raw
from flows.errors import fails_cleanly

SUMMARY_ARTIFACT = "fedtail-sweep-summary"
RUNS_ARTIFACT = "fedtail-sweep-runs"
PROGRESS_ARTIFACT = "fedtail-sweep-progress"


def sweep_dir_of(spec: sweep.SweepSpec, sweep_id: str, root: Path) -> Path:
    """``<output.sweeps_dir>/<sweep_id>``, the folder as the base config with the sweep's ``set`` says."""
    where = {k: v for k, v in spec.set.items() if k == "output.sweeps_dir"}
    base = load_config(io.under(root, spec.base), where, schedule=False)
    return io.under(root, base.output.sweeps_dir) / check_run_id(sweep_id)


def prepare(spec: sweep.SweepSpec, sweep_id: str, root: Path) -> tuple[Path, list[sweep.Cell]]:
    """Everything that can fail before a run starts: the sweep folder, every cell's config, paths and
    data versions."""
    sweep_dir = sweep_dir_of(spec, sweep_id, root)
    cells = sweep.expand(spec, root, sweep_dir)
    seen: set[str] = set()
    for cell in cells:
        check_paths(cell.config, root)
        key = cell.config.fingerprint("dataset")
        if key not in seen:
            seen.add(key)
            check_versioned(cell.config, root)
    return sweep_dir, cells


class _Data:
    """(staged, partition) per data config, staged and partitioned once (content-addressed folders)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[str, tuple[Path, Path]] = {}

    def __call__(self, cfg: FedtailConfig) -> tuple[Path, Path]:
        key = cfg.fingerprint("seed", "dataset", "partition", "tasks", "output")
        if key not in self.cache:
            ensure_raw(cfg, self.root)
            staged = pipeline.stage(cfg, self.root).resolve()
            self.cache[key] = (staged, pipeline.partition(cfg, staged, self.root).resolve())
        return self.cache[key]


@flow(name="fedtail-sweep", flow_run_name="sweep-{sweep_id}")
@fails_cleanly
def fl_sweep(
    sweep_path: str,
    sweep_id: str,
    root: str = ".",
    workers: int | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
) -> str:
    """Run (or continue) the sweep; returns the sweep folder. ``workers`` overrides the file's;
    ``overrides`` apply to every run on top of the file's ``set``; ``progress`` shows a terminal bar."""
    logger = get_run_logger()
    root_dir = Path(root).resolve()
    spec = sweep.load_sweep(sweep_path)
    if overrides:
        spec = spec.model_copy(update={"set": {**spec.set, **overrides}})
    sweep_dir, cells = prepare(spec, sweep_id, root_dir)
    io.write_text(sweep_dir / "sweep.yaml", Path(sweep_path).read_text(encoding="utf-8"))
    total = len(cells)
    progress_id = create_progress_artifact(
        0.0, key=PROGRESS_ARTIFACT, description=f"{sweep_id}: runs of {total}"
    )
    done = 0

    def on_outcome(outcome: sweep.Outcome) -> None:
        nonlocal done
        done += 1
        what = ", ".join(f"{k}={v}" for k, v in outcome.cell.labels.items())
        tail = (
            outcome.error
            if outcome.status == "failed"
            else f"final_accuracy={outcome.metrics.get('final_accuracy')}"
        )
        logger.info("%d/%d %s seed=%d: %s (%s)", done, total, what, outcome.cell.seed, outcome.status, tail)
        try:
            update_progress_artifact(progress_id, 100.0 * done / total)
        except Exception as err:  # noqa: BLE001 - a progress bar must never stop the sweep
            logger.warning("progress artifact not updated: %s", err)

    with sweep.progress_bar(total, enabled=progress) as advance:

        def both(outcome: sweep.Outcome) -> None:
            on_outcome(outcome)
            advance(outcome)

        outcomes = sweep.run_cells(cells, root_dir, _Data(root_dir), workers or spec.workers, both)
    paths = sweep.write_summary(sweep_dir, outcomes, spec, f"sweep {sweep_id}")
    create_markdown_artifact(
        paths["summary"].read_text() + (f"\nplot: `{paths['plot']}`\n" if "plot" in paths else ""),
        key=SUMMARY_ARTIFACT,
        description=str(sweep_dir),
    )
    create_table_artifact(sweep.runs_rows(outcomes, spec), key=RUNS_ARTIFACT, description="one row per run")
    failed = sum(o.status == "failed" for o in outcomes)
    if failed:
        logger.warning("%d of %d runs failed; see %s", failed, total, paths["runs"])
    return str(sweep_dir)
