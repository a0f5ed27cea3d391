"""Benchmark: what `fedtail sweep` costs or saves against launching the same runs one after another.

The grid is the issue's: the default run (params.yaml) at 3 values of ``partition.alpha`` x 3 seeds,
9 runs. Three ways, side by side in one invocation, each in a fresh output folder of one throw-away
project whose staged data and partitions are made first (untimed, shared):

- ``sequential``: 9 x ``fedtail run --set seed=S --set partition.alpha=A`` (each its own process,
  Prefect temporary server and flow run: what a user scripting a loop gets);
- ``sweep-1``: ``fedtail sweep GRID --workers 1`` (one process, one Prefect server, runs in a worker);
- ``sweep-2``: the same with ``--workers 2``.

Every way must give the same final metrics for every run (checked, stated tolerance); the results are
the wall-time ratios to ``sequential``. Writes ``benchmarks/results/sweep_overhead.{json,md}``.

    .venv/bin/python benchmarks/sweep_overhead.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, config, make_project  # benchmarks/common.py; puts the project on sys.path

from fedtail import io, pipeline  # noqa: E402

ALPHAS = [0.1, 0.5, 5.0]
SEEDS = [0, 1, 2]
METRICS = ("final_accuracy", "final_balanced_accuracy", "final_macro_f1", "average_incremental_accuracy")
TOLERANCE = 1e-6  # same machine, same kernels: the runs are the same computation


def _fedtail(root: Path, *args: str) -> float:
    """Run the CLI in ``root``; its wall time (a failure stops the benchmark with its output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(root / ".prefect")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedtail.cli", *args, "--root", str(root)],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"fedtail {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def _outputs(root: Path, name: str) -> list[str]:
    return [
        "--set", f"output.data_dir={root / 'data'}",
        "--set", f"output.artifacts_dir={root / 'artifacts'}",
        "--set", f"output.runs_dir={root / name / 'runs'}",
        "--set", f"output.sweeps_dir={root / name / 'sweeps'}",
    ]  # fmt: skip


def sequential(root: Path) -> tuple[float, dict[tuple[float, int], dict]]:
    metrics, total = {}, 0.0
    for alpha in ALPHAS:
        for seed in SEEDS:
            run_id = f"a{alpha}-s{seed}"
            total += _fedtail(
                root, "run", "--run-id", run_id, "--set", f"seed={seed}",
                "--set", f"partition.alpha={alpha}", *_outputs(root, "sequential"),
            )  # fmt: skip
            metrics[(alpha, seed)] = json.loads(
                (root / "sequential" / "runs" / run_id / "metrics.json").read_text()
            )
    return total, metrics


def swept(root: Path, grid: Path, workers: int) -> tuple[float, dict[tuple[float, int], dict]]:
    name = f"sweep-{workers}"
    seconds = _fedtail(root, "sweep", str(grid), "--workers", str(workers), *_outputs(root, name))
    rows = (root / name / "sweeps" / "grid" / "runs.csv").read_text().splitlines()
    header = rows[0].split(",")
    metrics = {}
    for line in rows[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        assert row["status"] == "done", row
        metrics[(float(row["partition.alpha"]), int(row["seed"]))] = {m: float(row[m]) for m in METRICS}
    return seconds, metrics


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        math.isclose(float(a[k][m]), float(b[k][m]), rel_tol=TOLERANCE, abs_tol=TOLERANCE)
        for k in a
        for m in METRICS
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sweep_overhead"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedtail-sweep-bench-") as tmp:
        root = make_project(Path(tmp))
        for alpha in ALPHAS:  # staged data and partitions first, untimed: every way finds them cached
            for seed in SEEDS:
                cfg = config(root, {"seed": seed, "partition.alpha": alpha})
                pipeline.partition(cfg, pipeline.stage(cfg, root), root)
        grid = root / "grid.yaml"
        grid.write_text(
            f"base: {REPO / 'params.yaml'}\naxes: {{partition.alpha: {ALPHAS}}}\nseeds: {SEEDS}\n"
            f"metrics: [{', '.join(METRICS)}]\n"
        )
        seq_s, seq_m = sequential(root)
        one_s, one_m = swept(root, grid, 1)
        two_s, two_m = swept(root, grid, 2)
    assert same(seq_m, one_m) and same(seq_m, two_m), "a sweep gave other metrics than fedtail run"
    result = {
        "grid": f"params.yaml, partition.alpha {ALPHAS} x seeds {SEEDS} (9 runs)",
        "seconds": {"sequential": seq_s, "sweep_workers_1": one_s, "sweep_workers_2": two_s},
        "ratio_to_sequential": {"sweep_workers_1": one_s / seq_s, "sweep_workers_2": two_s / seq_s},
        "same_metrics": True,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.system()},
    }
    out = Path(args.out)
    io.write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    md = [
        "# Sweep overhead: 9 default runs (3 alpha x 3 seeds)",
        "",
        "| way | wall time | per run | ratio to 9 x `fedtail run` |",
        "|---|---|---|---|",
        f"| 9 x `fedtail run`, one after another | {seq_s:.1f} s | {seq_s / 9:.1f} s | 1.00 |",
        f"| `fedtail sweep --workers 1` | {one_s:.1f} s | {one_s / 9:.1f} s | {one_s / seq_s:.2f} |",
        f"| `fedtail sweep --workers 2` | {two_s:.1f} s | {two_s / 9:.1f} s | {two_s / seq_s:.2f} |",
        "",
        f"Same final metrics for every run in all three ways (tolerance {TOLERANCE}). "
        f"{os.cpu_count()} CPUs; `python benchmarks/sweep_overhead.py`.",
    ]
    io.write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
