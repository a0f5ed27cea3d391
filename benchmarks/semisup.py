"""Benchmark: semi-supervised local updates against supervised-only and all-labels (issue 20).

Per dataset (``--datasets``: digits, mnist1d), ``fedtail sweep benchmarks/sweeps/semisup-<dataset>.yaml``:
balanced data whose labeled part is long-tailed (IF 10, 10 % of the head labeled) and whose unlabeled
part is consistent with, uniform against or reversed to it, 10 clients, Dirichlet alpha 0.5, every
method at its defaults; then the open-world and class-incremental row sets (``--extras``,
benchmarks/sweeps/semisup-openworld.yaml and semisup-cil.yaml); then
``benchmarks/results/semisup/summary.{md,json}``: mean ± sample std over the seeds of balanced and tail
accuracy and of the last round's pseudo-label precision (tail classes: those with fewer than
``evaluation.few_shot`` labels), the share of the gap between supervised-only and all-labels each method
closes, bytes and time per round relative to supervised-only's (side by side in one sweep).

Finished runs are reused (the sweep skips them), so an interrupted benchmark resumes.

    .venv/bin/python benchmarks/semisup.py [--workers 2] [--datasets digits mnist1d]
        [--extras openworld cil] [--seeds 0 1 2] [--summarise]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling benchmark modules
_spec = importlib.util.spec_from_file_location("bench_strategies", HERE / "strategies.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # its table helpers; a plain import would find the strategies package

SPECS = {d: REPO / "benchmarks" / "sweeps" / f"semisup-{d}.yaml" for d in ("digits", "mnist1d")}
OUT = REPO / "benchmarks" / "results" / "semisup"
METRICS = {
    "final_balanced_accuracy": "balanced acc. ↑",
    "final_tail_accuracy": "tail acc. ↑",
    "final_tail_pl_precision": "tail pseudo-label precision ↑",
    "final_pl_precision": "pseudo-label precision ↑",
    "final_pl_used": "unlabeled used ↑",
}
EXTRAS = {  # row sets beside the datasets' tables: sweep file, its metrics, the table's title
    "openworld": (
        REPO / "benchmarks" / "sweeps" / "semisup-openworld.yaml",
        {
            "final_seen_accuracy": "seen acc. ↑",
            "final_novel_accuracy": "novel acc. (Hungarian) ↑",
            "final_all_accuracy": "all acc. (Hungarian) ↑",
            "final_balanced_accuracy": "balanced acc. ↑",
        },
        "Open world: classes 3 and 8 hold no label (digits, consistent unlabeled part)",
    ),
    "cil": (
        REPO / "benchmarks" / "sweeps" / "semisup-cil.yaml",
        {
            "average_incremental_accuracy": "avg. incremental acc. ↑",
            "final_average_accuracy": "final avg. acc. ↑",
            "forgetting": "forgetting ↓",
            "final_balanced_accuracy": "final balanced acc. ↑",
        },
        "Class-incremental: Split-digits (5 tasks × 2 classes), iCaRL, 10 % of the head labeled",
    ),
}
LOWER, UPPER = "supervised", "all_labels"
AXIS = "partition.unlabeled_distribution"


def gap_closed(rows: dict[str, dict[str, list[float]]], label: str, suffix: str = "") -> float:
    """(method - supervised-only) / (all-labels - supervised-only) on mean balanced accuracy, against
    the baselines of variant-name ``suffix`` (``_scaffold``: the same strategy's), plain FedAvg's by
    default."""
    key = "final_balanced_accuracy"
    lo, hi, mine = (bench._mean(rows[r][key]) for r in (LOWER + suffix, UPPER + suffix, label))
    return (mine - lo) / (hi - lo) if hi > lo else math.nan


def gap_line(rows: dict[str, dict[str, list[float]]]) -> str:
    """Each method's share of the gap; a variant ``<method>_<strategy>`` whose baselines ran with the
    same strategy (``supervised_<strategy>``, ``all_labels_<strategy>``) also against those."""
    baselines = {LOWER, UPPER}
    suffixes = sorted({r[len(LOWER) :] for r in rows if r.startswith(LOWER + "_")})
    baselines |= {b + s for s in suffixes for b in (LOWER, UPPER)}
    parts = []
    for r in rows:
        if r in baselines:
            continue
        text = f"{r} {gap_closed(rows, r):+.2f}"
        own = [s for s in suffixes if r.endswith(s) and UPPER + s in rows]
        if own:
            text += f" ({gap_closed(rows, r, own[0]):+.2f} against `{LOWER + own[0]}` → `{UPPER + own[0]}`)"
        parts.append(text)
    return "Share of the supervised-only → all-labels gap closed: " + ", ".join(parts) + "."


def write_summary(results: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Semi-supervised local updates on long-tailed labels (issue 20)", ""]
    for dataset, part in results["datasets"].items():
        lines += bench.dataset_header(dataset, SPECS[dataset], part["seeds"])
        for distribution, rows in part["distributions"].items():
            lines += [f"## {dataset}: unlabeled part {distribution}", ""]
            lines += bench.table(rows, rows.get(LOWER), METRICS, "method", "supervised-only")
            lines += ["", gap_line(rows), ""]
    for name, part in results.get("extras", {}).items():
        path, metrics, title = EXTRAS[name]
        lines += [f"# {title}", "", f"Sweep: `{path.relative_to(REPO)}`; seeds {part['seeds']}.", ""]
        lines += bench.table(part["rows"], part["rows"].get(LOWER), metrics, "method", "supervised-only")
        lines.append("")
    lines += [
        "mean ± sample std over the seeds of the final global model's test metrics; pseudo-label columns: "
        "the last round's counts summed over its clients (precision: right / used pseudo-labels; tail: "
        "classes with fewer than `evaluation.few_shot` labels in all; used: unlabeled samples given a "
        "pseudo-label / seen). MB / round: array payload down and up. Time per round relative to "
        "supervised-only's in the same sweep. Bold: best of the column. Notes: `notes.md` beside this file.",
        "",
    ]
    path = OUT / "summary.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--datasets", nargs="*", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--extras", nargs="*", default=list(EXTRAS), choices=list(EXTRAS))
    parser.add_argument("--seeds", type=int, nargs="+", help="instead of the sweep files' seeds")
    parser.add_argument("--summarise", action="store_true", help="rewrite summary.md from summary.json")
    args = parser.parse_args()
    previous = json.loads((OUT / "summary.json").read_text()) if (OUT / "summary.json").is_file() else {}
    if args.summarise:
        print(write_summary(previous))
        return
    results = {"datasets": dict(previous.get("datasets", {})), "extras": dict(previous.get("extras", {}))}
    for dataset in args.datasets:
        spec = bench._with_seeds(yaml.safe_load(SPECS[dataset].read_text()), args.seeds)
        sweep_id = f"semisup-{dataset}"
        with tempfile.TemporaryDirectory() as tmp:
            runs = bench._sweep(spec, sweep_id, Path(tmp), args.workers)
        part = {"seeds": spec["seeds"], "distributions": {}}
        for distribution, group in runs.groupby(AXIS, sort=False):
            part["distributions"][str(distribution)] = bench.collect(sweep_id, group, ["variant"], METRICS)
        results["datasets"][dataset] = part
        print(write_summary(results), flush=True)
    for name in args.extras:
        path, metrics, _ = EXTRAS[name]
        spec = bench._with_seeds(yaml.safe_load(path.read_text()), args.seeds)
        sweep_id = f"semisup-{name}"
        with tempfile.TemporaryDirectory() as tmp:
            runs = bench._sweep(spec, sweep_id, Path(tmp), args.workers)
        rows = bench.collect(sweep_id, runs, ["variant"], metrics)
        results["extras"][name] = {"seeds": spec["seeds"], "rows": rows}
        print(write_summary(results), flush=True)


if __name__ == "__main__":
    main()
