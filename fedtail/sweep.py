"""Experiment grids: a sweep file expands into runs (axes × variants × seeds), run in parallel, summarised.

A sweep file (YAML) names a base config, common overrides, the axes (config fields, each with a list of
values), optional named variants (several fields under one label), the seeds and the metrics to summarise::

    base: params.yaml
    set: {tasks.classes_per_task: null}
    axes:
      partition.alpha: [0.1, 0.5]
    variants:
      plain: {}
      long-tail: {partition.imbalance_factor: 50}
    seeds: [0, 1, 2]
    metrics: [final_accuracy, final_balanced_accuracy]

Everything here is plain functions: `load_sweep` (checks the file), `expand` (every cell's config,
every invalid one reported before anything runs), `run_cells` (the runs, in worker processes), and
`write_summary` (runs.csv, summary.csv/.md, plot). Each run is an ordinary fedtail run folder in
``<sweeps_dir>/<sweep-id>/runs/r-<experiment fingerprint>-<data version>``: a finished run is skipped on
the next invocation, a crashed one resumes from its checkpoint, and a new axis value only runs its new
cells.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import json
import math
import multiprocessing as mp
import signal
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedtail import io, runs
from fedtail.config import (
    ConfigError,
    FedtailConfig,
    ServeConfig,
    _check_key,
    _format_errors,
    _parse_yaml,
    apply_overrides,
    build_config,
    check_run_id,
    read_config_file,
    read_small_text,
)

#: final metrics of `metrics.json` a sweep can summarise, and whether higher is better
METRICS: dict[str, bool] = {
    "final_accuracy": True,
    "final_balanced_accuracy": True,
    "final_macro_f1": True,
    "final_g_mean": True,
    "final_head_accuracy": True,
    "final_medium_accuracy": True,
    "final_tail_accuracy": True,
    "final_ece": False,
    "final_auroc": True,
    "final_auprc": True,
    "final_adjusted_accuracy": True,
    "final_adjusted_balanced_accuracy": True,
    "final_adjusted_macro_f1": True,
    "final_adjusted_g_mean": True,
    "final_adjusted_tail_accuracy": True,
    "final_adjusted_ece": False,
    "final_client_accuracy_mean": True,
    "final_client_accuracy_std": False,
    "final_client_accuracy_worst10": True,
    "final_adjusted_client_accuracy_mean": True,
    "final_adjusted_client_accuracy_worst10": True,
    "average_incremental_accuracy": True,
    "final_average_accuracy": True,
    "forgetting": False,
    "final_old_class_accuracy": True,
    "final_new_class_accuracy": True,
    "max_client_memory_bytes": False,
    "backward_transfer": True,
    "final_pl_precision": True,
    "final_pl_used": True,
    "final_tail_pl_precision": True,
    "final_tail_pl_recall": True,
    "final_seen_accuracy": True,
    "final_novel_accuracy": True,
    "final_all_accuracy": True,
}
SEED = "seed"


class SweepServe(ServeConfig):
    """`fedtail sweep FILE --serve`: the sweep as a Prefect deployment on cron schedule(s)."""

    name: str | None = Field(  # type: ignore[assignment]
        None, max_length=200, description="Prefect deployment name (null: sweep-<sweep id>)."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None, info: Any) -> str | None:
        from fedtail.config import _check_deployment_name

        return None if value is None else _check_deployment_name(value, info)


class SweepSpec(BaseModel):
    """A sweep file, checked."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field("params.yaml", description="Base config (YAML), relative to the project root.")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides applied to every run.")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="Config field -> values to try.")
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Label -> overrides applied together (one more axis)."
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="Values of `seed`.")
    metrics: list[str] = Field(
        default_factory=lambda: ["final_accuracy", "final_balanced_accuracy", "final_macro_f1"],
        min_length=1,
        description=f"Final metrics to summarise, among {list(METRICS)}.",
    )
    workers: int = Field(1, ge=1, le=64, description="Runs at a time (processes on this machine).")
    serve: SweepServe = Field(
        default_factory=SweepServe, description="Deployment name and cron schedule(s) for --serve."
    )

    @field_validator("set", "axes")
    @classmethod
    def _dotted(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            _check_key(key, "sweep key")
            if key == SEED:
                raise ValueError("give seeds under 'seeds:', not as an axis or override")
        return value

    @field_validator("axes")
    @classmethod
    def _non_empty(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in value.items():
            if not values:
                raise ValueError(f"axis {key!r} has no values")
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ValueError(f"axis {key!r} repeats a value: {values}")
        return value

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for label, overrides in value.items():
            check_run_id(label)  # a plain name: it becomes a table label
            for key in overrides:
                _check_key(key, f"variant {label!r}")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds repeat: {value}")
        if any(not 0 <= s <= 2**31 - 1 for s in value):
            raise ValueError(f"seeds must be in [0, 2**31 - 1]: {value}")
        return value

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; allowed: {list(METRICS)}")
        return value

    def columns(self) -> list[str]:
        """The table's label columns: the axes, then the variant (if any)."""
        return [*self.axes, *(["variant"] if self.variants else [])]


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file (ConfigError naming the file and the field on any problem)."""
    p = Path(path)
    where = f"sweep file {str(p)!r}"
    if not p.is_file():
        raise ConfigError(f"{where} does not exist (or is not a file)")
    data = _parse_yaml(read_small_text(p, where), where)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with axes:, seeds:, ... at the top")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            f"{where}: " + _format_errors(err).replace("invalid fedtail config:", "invalid sweep:")
        ) from None


@dataclass
class Cell:
    """One run of the grid: its labels (axis values, variant), seed and validated config."""

    labels: dict[str, Any]
    seed: int
    config: FedtailConfig

    @property
    def run_id(self) -> str:
        """The run folder's name: ``r-<experiment fingerprint>-<data version>`` (set by `expand`)."""
        return self.config.output.run_id or ""

    def key(self) -> str:
        return json.dumps(self.labels, sort_keys=True)


@dataclass
class InvalidCells(ConfigError):
    """Cells the config refuses, each with why (reported before anything runs)."""

    problems: list[tuple[dict[str, Any], str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{len(self.problems)} sweep cell(s) are not valid configs; nothing was run:"]
        for labels, reason in self.problems:
            what = ", ".join(f"{k}={v!r}" for k, v in labels.items()) or "(base)"
            lines.append(f"- {what}:\n    " + reason.replace("\n", "\n    "))
        return "\n".join(lines)


def expand(spec: SweepSpec, root: Path, sweep_dir: Path) -> list[Cell]:
    """Every cell in a stable order (axes in file order, then variants, then seeds), each run folder at
    ``sweep_dir/runs/r-<experiment fingerprint>-<data version>``; raises `InvalidCells` listing every
    refused one. The data version (its md5 in data.dvc) is part of the name: a sweep re-run after
    ``fedtail data add`` recorded new data runs again instead of reusing results of the old data."""
    from fedtail.staging import data_md5

    base = read_config_file(io.under(root, spec.base))
    grids = [list(values) for values in spec.axes.values()]
    variants = list(spec.variants) or [None]
    cells, problems = [], []
    for combo in itertools.product(*grids):
        for label in variants:
            labels = dict(zip(spec.axes, combo, strict=True))
            if label is not None:
                labels["variant"] = label
            for seed in spec.seeds:
                data = apply_overrides(base, {**spec.set, **labels_to_overrides(labels, spec), SEED: seed})
                data = apply_overrides(
                    data, {"output.runs_dir": str(sweep_dir / "runs"), "output.run_id": None}
                )
                try:
                    cfg = build_config(data, schedule=False)
                except ConfigError as err:
                    problems.append(
                        ({**labels, SEED: seed}, str(err).removeprefix("invalid fedtail config:\n"))
                    )
                    continue
                run_id = _cell_run_id(cfg, data_md5(cfg, root)[:8] or "unversioned", sweep_dir / "runs")
                cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"run_id": run_id})})
                cells.append(Cell(labels, seed, cfg))
    if problems:
        raise InvalidCells(problems=problems)
    return cells


def _cell_run_id(cfg: FedtailConfig, data_version: str, runs_dir: Path) -> str:
    """``r-<experiment fingerprint>-<data version>``; where only a folder named by an older fedtail's
    fingerprint of the same experiment exists (`FedtailConfig.legacy_experiment_fingerprints`), that
    one, so a sweep continued after an upgrade keeps its finished and crashed runs."""
    run_id = f"r-{cfg.experiment_fingerprint()}-{data_version}"
    if not (runs_dir / run_id).exists():
        for legacy in sorted(cfg.legacy_experiment_fingerprints()):
            if runs.is_run(runs_dir / f"r-{legacy}-{data_version}"):
                return f"r-{legacy}-{data_version}"
    return run_id


def labels_to_overrides(labels: dict[str, Any], spec: SweepSpec) -> dict[str, Any]:
    out = {k: v for k, v in labels.items() if k != "variant"}
    if "variant" in labels:
        out.update(spec.variants[labels["variant"]])
    return out


# ---- running ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one cell's run gave: metrics, or the error that stopped it."""

    cell: Cell
    status: str  # done | skipped (finished before) | failed
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = float("nan")
    error: str = ""


def finished_metrics(run_dir: Path, cfg: FedtailConfig) -> dict[str, Any] | None:
    """The metrics of a run folder that finished under this same experiment, else None."""
    metrics, config = run_dir / "metrics.json", run_dir / "config.yaml"
    if not (runs.is_run(run_dir) and metrics.is_file() and config.is_file()):
        return None
    try:
        from fedtail.config import load_config

        if load_config(config, schedule=False).experiment_fingerprint() != cfg.experiment_fingerprint():
            return None
        return json.loads(metrics.read_text())
    except (ConfigError, ValueError):
        return None


def _run_seconds(run_dir: Path) -> float:
    """The wall time a finished run recorded (timing.json), NaN if unknown."""
    try:
        return float(json.loads((run_dir / "timing.json").read_text())["simulate_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.nan


def _mode_for(run_dir: Path) -> runs.Mode:
    """A crashed run resumes from its checkpoint; one that died before its first round starts over."""
    if not run_dir.exists():
        return runs.Mode.NEW
    return runs.Mode.RESUME if (run_dir / "checkpoint.pt").is_file() else runs.Mode.OVERWRITE


def run_one(cfg_json: str, root: str, staged: str, parts: str) -> dict[str, Any]:
    """Worker body: one fedtail run; its metrics and wall time, or its error (never raises)."""
    from fedtail import pipeline
    from fedtail.config import build_config

    start = time.perf_counter()
    try:
        cfg = build_config(json.loads(cfg_json), schedule=False)
        run_dir = pipeline.new_run_dir(cfg, Path(root))
        pipeline.simulate(cfg, Path(staged), Path(parts), run_dir, mode=_mode_for(run_dir))
        pipeline.report(run_dir)  # the same run folder `fedtail run` leaves: plots and report.md too
        metrics = json.loads((run_dir / "metrics.json").read_text())
        return {"metrics": metrics, "seconds": time.perf_counter() - start}
    except BaseException as err:  # noqa: BLE001 - a failed run is a row of the table, not a crash
        if isinstance(err, KeyboardInterrupt):
            raise
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        return {"error": last, "seconds": time.perf_counter() - start}


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers


def run_cells(
    cells: list[Cell],
    root: Path,
    data: Callable[[FedtailConfig], tuple[Path, Path]],
    workers: int,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run every cell not finished before, ``workers`` at a time in spawned processes; outcomes in cell
    order. ``data(cfg)`` gives (staged dir, partition dir) for a config: staged once per data variant in
    this process, before the runs, so runs share it."""
    from fedtail import pipeline

    outcomes: dict[int, Outcome] = {}
    todo: list[tuple[int, Cell, Path, Path]] = []
    for i, cell in enumerate(cells):
        run_dir = pipeline.new_run_dir(cell.config, root)
        done = finished_metrics(run_dir, cell.config)
        if done is not None:
            outcomes[i] = Outcome(cell, "skipped", done, _run_seconds(run_dir))
            if on_outcome:
                on_outcome(outcomes[i])
            continue
        try:
            staged, parts = data(cell.config)
        except Exception as err:  # noqa: BLE001 - e.g. a partition the data cannot give: a failed row
            first = str(err).splitlines()[0] if str(err) else ""
            outcomes[i] = Outcome(cell, "failed", error=f"{type(err).__name__}: {first}")
            if on_outcome:
                on_outcome(outcomes[i])
            continue
        todo.append((i, cell, staged, parts))
    if todo:
        with _pool(workers) as pool:
            futures = {
                pool.submit(run_one, cell.config.model_dump_json(), str(root), str(s), str(p)): (i, cell)
                for i, cell, s, p in todo
            }
            for future in cf.as_completed(futures):
                i, cell = futures[future]
                try:
                    result = future.result()
                except Exception as err:  # noqa: BLE001 - e.g. a worker process killed
                    result = {"error": f"{type(err).__name__}: {err}"}
                if "error" in result:
                    outcomes[i] = Outcome(
                        cell, "failed", seconds=result.get("seconds", math.nan), error=result["error"]
                    )
                else:
                    outcomes[i] = Outcome(cell, "done", result["metrics"], result["seconds"])
                if on_outcome:
                    on_outcome(outcomes[i])
    return [outcomes[i] for i in range(len(cells))]


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[cf.ProcessPoolExecutor]:
    """Spawned workers (no forked torch/Ray state); on Ctrl-C or an error they are killed at once (each
    run keeps its last checkpoint and resumes on the next invocation)."""
    pool = cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init
    )
    try:
        yield pool
    except BaseException:
        for proc in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(Exception):
                proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# ---- summary ---------------------------------------------------------------------------------------
def runs_rows(outcomes: list[Outcome], spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per run: labels, seed, run id, status, every final metric, wall time, error."""
    rows = []
    for o in outcomes:
        row: dict[str, Any] = {
            **o.cell.labels,
            SEED: o.cell.seed,
            "run_id": o.cell.run_id,
            "status": o.status,
        }
        for m in METRICS:
            row[m] = o.metrics.get(m, math.nan)
        row["seconds"] = o.seconds
        row["error"] = o.error
        rows.append(row)
    return rows


def summary_rows(outcomes: list[Outcome], spec: SweepSpec) -> list[dict[str, Any]]:
    """Mean and sample std over the seeds of each cell's finished runs, per summarised metric."""
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(o.cell.key(), []).append(o)
    rows = []
    for members in groups.values():
        ok = [o for o in members if o.status != "failed"]
        row: dict[str, Any] = {**members[0].cell.labels, "runs": len(ok), "failed": len(members) - len(ok)}
        for m in spec.metrics:
            values = [float(o.metrics[m]) for o in ok if o.metrics.get(m) is not None]
            values = [v for v in values if not math.isnan(v)]
            row[f"{m}_mean"] = statistics.fmean(values) if values else math.nan
            row[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan  # 1 run: unknown
        rows.append(row)
    return rows


def best_index(rows: list[dict[str, Any]], metric: str) -> int | None:
    """Index of the best mean of ``metric`` (higher or lower is better per `METRICS`), None if none."""
    values = [(r[f"{metric}_mean"], i) for i, r in enumerate(rows) if not math.isnan(r[f"{metric}_mean"])]
    if not values:
        return None
    return (max(values) if METRICS[metric] else min(values))[1]


def summary_markdown(rows: list[dict[str, Any]], spec: SweepSpec, title: str) -> str:
    """mean ± std per cell; the best of each column in bold (↑ higher / ↓ lower is better)."""
    labels = spec.columns()
    head = [*labels, "runs", *(f"{m} {'↑' if METRICS[m] else '↓'}" for m in spec.metrics)]
    best = {m: best_index(rows, m) for m in spec.metrics}
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(rows):
        cells = [str(row.get(c, "")) for c in labels]
        cells.append(f"{row['runs']}" + (f" ({row['failed']} failed)" if row["failed"] else ""))
        for m in spec.metrics:
            mean, std = row[f"{m}_mean"], row[f"{m}_std"]
            if math.isnan(mean):  # no finished run, or none that reports it (adjusted_* unadjusted)
                text = "failed" if row["runs"] == 0 else "–"
            else:
                text = f"{mean:.4f}" + ("" if math.isnan(std) else f" ± {std:.4f}")
            cells.append(f"**{text}**" if best[m] == i else text)
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(str(s) for s in spec.seeds)
    lines += ["", f"mean ± sample std over seeds {seeds} (no ± for one run); bold: best of the column."]
    return "\n".join(lines) + "\n"


def _err(std: float) -> float:
    return 0.0 if math.isnan(std) else std


def plot_summary(rows: list[dict[str, Any]], spec: SweepSpec, path: Path) -> Path:
    """Lines over the first numeric axis with 3+ values (one line per other label), else grouped bars
    (one group per cell, one bar per metric); error bars are the std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = spec.columns()
    numeric = [
        a
        for a, vals in spec.axes.items()
        if len(vals) >= 3 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals)
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 3), 4.2))
    metric = spec.metrics[0]
    if numeric:
        x_axis = numeric[0]
        others = [c for c in labels if c != x_axis]
        series: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            series.setdefault(", ".join(f"{c}={row[c]}" for c in others) or metric, []).append(row)
        for name, members in series.items():
            members = sorted(members, key=lambda r: r[x_axis])
            ax.errorbar(
                [r[x_axis] for r in members],
                [r[f"{metric}_mean"] for r in members],
                yerr=[_err(r[f"{metric}_std"]) for r in members],
                marker="o",
                capsize=3,
                label=name,
            )
        values = [float(v) for v in spec.axes[x_axis]]
        if min(values) > 0 and max(values) / min(values) >= 10:  # e.g. Dirichlet alpha: a log quantity
            ax.set_xscale("log")
            ax.set_xticks(values, [str(v) for v in spec.axes[x_axis]])
            ax.minorticks_off()
        ax.set_xlabel(x_axis)
        ax.set_ylabel(metric)
    else:
        width = 0.8 / len(spec.metrics)
        names = [", ".join(str(r[c]) for c in labels) or "base" for r in rows]
        for j, m in enumerate(spec.metrics):
            ax.bar(
                [i + (j - (len(spec.metrics) - 1) / 2) * width for i in range(len(rows))],
                [r[f"{m}_mean"] for r in rows],
                width,
                yerr=[_err(r[f"{m}_std"]) for r in rows],
                capsize=3,
                label=m,
            )
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
        ax.set_ylabel("mean over seeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    io.write_with(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
    return path


def write_summary(sweep_dir: Path, outcomes: list[Outcome], spec: SweepSpec, title: str) -> dict[str, Path]:
    """runs.csv, summary.csv, summary.md and plot.png in ``sweep_dir`` (each written atomically)."""
    from server.recorder import csv_text

    rows = summary_rows(outcomes, spec)
    labels = spec.columns()

    def as_given(table: list[dict[str, Any]]) -> list[dict[str, Any]]:  # 0.1, not 0.100000
        return [
            {k: json.dumps(v) if k in labels and not isinstance(v, str) else v for k, v in r.items()}
            for r in table
        ]

    paths = {
        "runs": io.write_text(sweep_dir / "runs.csv", csv_text(as_given(runs_rows(outcomes, spec)))),
        "summary_csv": io.write_text(sweep_dir / "summary.csv", csv_text(as_given(rows))),
        "summary": io.write_text(sweep_dir / "summary.md", summary_markdown(rows, spec, title)),
    }
    if any(not math.isnan(r[f"{spec.metrics[0]}_mean"]) for r in rows):
        paths["plot"] = plot_summary(rows, spec, sweep_dir / "plot.png")
    return paths


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[Callable[[Outcome], None]]:
    """A terminal bar (rich): runs finished / total, failures, elapsed and ETA; a no-op when disabled."""
    if not enabled:
        yield lambda outcome: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("runs", total=total, failed=0)
        failed = 0

        def advance(outcome: Outcome) -> None:
            nonlocal failed
            failed += outcome.status == "failed"
            bar.update(task, advance=1, failed=failed)

        yield advance
