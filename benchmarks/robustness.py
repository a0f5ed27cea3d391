"""Issue 18's robustness table: every continual method and every objective at its default options over a
grid of settings nobody tuned them on, with the diverged and collapsed runs counted.

    python benchmarks/robustness.py            # runs both sweeps (resumable), then writes the table
    python benchmarks/robustness.py --table    # only the table, from the sweeps' runs.csv
    python benchmarks/robustness.py --grids strategies   # one grid; the others keep their last tables

Sweeps: benchmarks/sweeps/robustness/{continual,objectives,objectives-cosine}.yaml (into
``sweeps/robustness-*``; finished runs are reused). Writes benchmarks/results/robustness/summary.{md,json}.

A run *diverged* when it failed on non-finite updates (a client update with NaN or Inf is rejected;
every client rejected ends the run); any other failure is counted apart (none is expected). A run
*collapsed* when its final balanced accuracy over the 10 seen classes is at or below chance (0.1). A
method is *below its baseline* in a cell (fine-tuning for continual methods, CE on the same head for
objectives) when its mean over the seeds is lower by more than the larger of the two cells' sample
stds, and at least 0.01.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from strategies.base import DIVERGED  # noqa: E402  (the rejection message of a NaN/Inf update)

SWEEPS = {
    "continual": "continual.method",
    "objectives": "train.objective",
    "objectives-cosine": "train.objective",
    "strategies": "strategy.name",
}
BASELINE = {"continual": "finetune", "objectives": "ce", "objectives-cosine": "ce", "strategies": "fedavg"}
HEADLINE = {grid: "final_accuracy" for grid in SWEEPS} | {
    "continual": "final_average_accuracy",
    "strategies": "final_average_accuracy",
}
CHANCE = 0.1  # balanced accuracy of a constant prediction over the 10 seen classes
OUT = REPO / "benchmarks" / "results" / "robustness"


def run_sweeps(grids: list[str]) -> None:
    for grid in grids:
        cmd = [sys.executable, "-m", "fedtail.cli", "sweep", f"benchmarks/sweeps/robustness/{grid}.yaml"]
        subprocess.run([*cmd, "--sweep-id", f"robustness-{grid}"], cwd=REPO, check=True)


def read_runs(grid: str) -> list[dict[str, str]]:
    path = REPO / "sweeps" / f"robustness-{grid}" / "runs.csv"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `python benchmarks/robustness.py` first")
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def cell_stats(rows: list[dict[str, str]], method_field: str, metric: str) -> dict[tuple[str, str], dict]:
    """(method, cell) -> runs, diverged, collapsed, mean and std of ``metric`` and balanced accuracy."""
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault((row[method_field], row["variant"]), []).append(row)
    out = {}
    for key, members in groups.items():
        done = [r for r in members if r["status"] != "failed"]
        errors = [r["error"] for r in members if r["status"] == "failed"]
        head = [_float(r[metric]) for r in done]
        bal = [_float(r["final_balanced_accuracy"]) for r in done]
        out[key] = {
            "runs": len(members),
            "diverged": sum(DIVERGED in e for e in errors),
            "failed": sum(DIVERGED not in e for e in errors),
            "errors": sorted(set(errors)),
            "collapsed": sum(b <= CHANCE + 1e-9 for b in bal),
            "mean": statistics.fmean(head) if head else math.nan,
            "std": statistics.stdev(head) if len(head) > 1 else 0.0,
            "balanced": statistics.fmean(bal) if bal else math.nan,
        }
    return out


def below_baseline(stats: dict, method: str, cell: str, baseline: str) -> bool:
    mine, base = stats[(method, cell)], stats[(baseline, cell)]
    if math.isnan(mine["mean"]):
        return True
    return base["mean"] - mine["mean"] > max(mine["std"], base["std"], 0.01)


def table(grid: str) -> tuple[str, dict]:
    field, baseline, metric = SWEEPS[grid], BASELINE[grid], HEADLINE[grid]
    rows = read_runs(grid)
    stats = cell_stats(rows, field, metric)
    methods = list(dict.fromkeys(r[field] for r in rows))
    cells = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [
        f"| {field} | " + " | ".join(cells) + " | diverged | collapsed | below " + baseline + " |",
        "|---" * (len(cells) + 4) + "|",
    ]
    summary: dict = {}
    for m in methods:
        cols, below = [], []
        for c in cells:
            s = stats[(m, c)]
            text = "failed" if math.isnan(s["mean"]) else f"{s['mean']:.3f} / {s['balanced']:.3f}"
            if m != baseline and below_baseline(stats, m, c, baseline):
                text += " ↓"
                below.append(c)
            cols.append(text)
        diverged = sum(stats[(m, c)]["diverged"] for c in cells)
        failed = sum(stats[(m, c)]["failed"] for c in cells)
        collapsed = sum(stats[(m, c)]["collapsed"] for c in cells)
        runs = sum(stats[(m, c)]["runs"] for c in cells)
        counts = f" | {diverged}/{runs} | {failed}/{runs} | {collapsed}/{runs} | {len(below)} |"
        lines.append(f"| {m} | " + " | ".join(cols) + counts)
        summary[m] = {
            "cells": {c: stats[(m, c)] for c in cells},
            "diverged": diverged,
            "failed": failed,
            "collapsed": collapsed,
            "runs": runs,
            "below_baseline": below,
        }
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="only write the table from existing sweeps")
    parser.add_argument("--grids", nargs="*", default=list(SWEEPS), choices=list(SWEEPS))
    args = parser.parse_args()
    if not args.table:
        run_sweeps(args.grids)
    OUT.mkdir(parents=True, exist_ok=True)
    previous = json.loads((OUT / "summary.json").read_text()) if (OUT / "summary.json").is_file() else {}
    sections = dict(previous.get("_sections", {}))
    data = {k: v for k, v in previous.items() if k != "_sections"}
    for grid in args.grids:
        text, summary = table(grid)
        data[grid] = summary
        sections[grid] = "\n".join(
            [
                f"## {grid} (`benchmarks/sweeps/robustness/{grid}.yaml`)",
                "",
                f"Each cell: {HEADLINE[grid]} / final_balanced_accuracy, mean over seeds 0, 1; ↓: below "
                f"{BASELINE[grid]} by more than the seeds' spread.",
                "",
                text,
                "",
            ]
        )
    parts = ["# Robustness grid (issues 18 and 19)", ""]
    parts += [sections[g] for g in SWEEPS if g in sections]  # a grid not re-run keeps its last table
    (OUT / "summary.md").write_text("\n".join(parts))
    (OUT / "summary.json").write_text(
        json.dumps({**data, "_sections": sections}, indent=1, sort_keys=True) + "\n"
    )
    print((OUT / "summary.md").read_text())


if __name__ == "__main__":
    main()
