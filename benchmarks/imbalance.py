"""Benchmark: the imbalance toolkit against plain cross-entropy, federated and centralised (issue 8).

For each dataset's sweep file (``benchmarks/sweeps/imbalance-<dataset>.yaml``: long-tailed, Dirichlet
alpha 0.3 over 20 clients, FedAvg, plain FL, 3 seeds, papers' default hyper-parameters):

1. ``fedtail sweep`` the file: every objective, sampler, SMOTE, cRT and adjustment as one variant each;
2. pick the best method by mean balanced accuracy (adjustments scored by their adjusted metrics);
3. ``fedtail sweep`` the centralised references: one client holding all the data, with CE and with that
   method, everything else equal;
4. write ``benchmarks/results/imbalance/summary.{md,json}``: mean ± sample std over the seeds of
   balanced accuracy, tail accuracy, macro-F1, G-mean and ECE per method.

Finished runs are reused (the sweep skips them), so an interrupted benchmark resumes.

    .venv/bin/python benchmarks/imbalance.py [--datasets digits mnist1d] [--workers 2] [--summarise]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "benchmarks" / "sweeps"
OUT = REPO / "benchmarks" / "results" / "imbalance"
METRICS = {  # column -> (label, higher is better)
    "balanced_accuracy": ("balanced acc. ↑", True),
    "tail_accuracy": ("tail acc. ↑", True),
    "macro_f1": ("macro-F1 ↑", True),
    "g_mean": ("G-mean ↑", True),
    "ece": ("ECE ↓", False),
}
ADJUSTMENTS = ("posthoc_la", "tau_norm")  # variants scored by their adjusted_* metrics
BASELINE = "ce"


def run_sweep(path: Path, sweep_id: str, workers: int) -> pd.DataFrame:
    """``fedtail sweep`` (its own Prefect temporary server); the sweep's runs.csv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.setdefault("PREFECT_HOME", str(Path(tempfile.gettempdir()) / "fedtail-bench-prefect"))
    cmd = [
        sys.executable,
        "-m",
        "fedtail.cli",
        "sweep",
        str(path),
        "--sweep-id",
        sweep_id,
        "--workers",
        str(workers),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return pd.read_csv(REPO / "sweeps" / sweep_id / "runs.csv")


def scores(runs: pd.DataFrame) -> dict[str, dict[str, list[float]]]:
    """variant -> metric -> the seeds' values (adjustment variants: their adjusted metrics)."""
    out: dict[str, dict[str, list[float]]] = {}
    for variant, group in runs.groupby("variant", sort=False):
        if (group["status"] == "failed").any():
            raise SystemExit(f"variant {variant!r} has failed runs: {group['error'].dropna().tolist()}")
        prefix = "final_adjusted_" if variant in ADJUSTMENTS else "final_"
        out[str(variant)] = {m: group[prefix + m].astype(float).tolist() for m in METRICS}
    return out


def _cell(values: list[float]) -> str:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return "–"
    mean = statistics.fmean(clean)
    return f"{mean:.3f} ± {statistics.stdev(clean):.3f}" if len(clean) > 1 else f"{mean:.3f}"


def _mean(values: list[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.fmean(clean) if clean else math.nan


def best_method(federated: dict[str, dict[str, list[float]]]) -> str:
    candidates = {v: _mean(s["balanced_accuracy"]) for v, s in federated.items() if v != BASELINE}
    return max(candidates, key=lambda v: candidates[v])


def table(rows: dict[str, dict[str, list[float]]]) -> list[str]:
    """Markdown rows, the best mean of each column in bold."""
    best = {}
    for m, (_, higher) in METRICS.items():
        means = {v: _mean(s[m]) for v, s in rows.items() if not math.isnan(_mean(s[m]))}
        if means:
            best[m] = (max if higher else min)(means, key=lambda v: means[v])
    lines = [
        "| method | " + " | ".join(label for label, _ in METRICS.values()) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for variant, s in rows.items():
        cells = [f"**{_cell(s[m])}**" if best.get(m) == variant else _cell(s[m]) for m in METRICS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


PUBLISHED_ABOVE_CE = ("balanced_softmax", "ldam_drw", "logit_adjusted")
"""The papers' claim checked here: each beats CE on balanced accuracy."""


def ordering(federated: dict[str, dict[str, list[float]]]) -> list[str]:
    """Whether each of `PUBLISHED_ABOVE_CE` beats CE on mean balanced accuracy, by how much, and whether
    the gap exceeds the two sample standard deviations summed (a rough noise bar for 3 seeds)."""
    ce = federated[BASELINE]["balanced_accuracy"]
    lines = []
    for method in PUBLISHED_ABOVE_CE:
        ours = federated[method]["balanced_accuracy"]
        gap = _mean(ours) - _mean(ce)
        noise = statistics.stdev(ours) + statistics.stdev(ce)
        verdict = "holds" if gap > 0 else "does not hold"
        lines.append(
            f"- {method} vs CE: {gap:+.3f} balanced accuracy, {verdict}"
            + (" (gap above the summed std)" if abs(gap) > noise else " (gap within the summed std)")
        )
    return lines


def centralised_file(spec_path: Path, best: str, folder: Path) -> Path:
    """The dataset's sweep with one client holding all the data, variants CE and ``best`` only."""
    spec = yaml.safe_load(spec_path.read_text())
    spec["set"] = {**spec["set"], "federation.num_clients": 1}
    spec["variants"] = {BASELINE: spec["variants"][BASELINE], best: spec["variants"][best]}
    path = folder / f"{spec_path.stem}-centralised.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_summary(results: dict[str, dict]) -> Path:
    """``summary.json`` (every seed's value) and ``summary.md`` (the tables and the published-ordering
    check) from ``results``: dataset -> {federated, centralised, best}."""
    (OUT / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Imbalance toolkit vs cross-entropy (issue 8)", ""]
    for dataset, res in results.items():
        spec = yaml.safe_load((SWEEPS / f"imbalance-{dataset}.yaml").read_text())
        settings = ", ".join(f"`{k}={v}`" for k, v in spec["set"].items())
        lines += [f"## {dataset}", "", f"Federated ({settings}; seeds {spec['seeds']}):", ""]
        lines += table(res["federated"])
        lines += [
            "",
            f"Centralised reference (one client holding all the data; CE and the best federated "
            f"method, `{res['best']}`):",
            "",
        ]
        lines += table({f"{k} (centralised)": v for k, v in res["centralised"].items()})
        lines += ["", "Published ordering (each above CE on balanced accuracy):", ""]
        lines += ordering(res["federated"])
        lines.append("")
    lines += [
        "mean ± sample std over 3 seeds of the final global model's test metrics; tail accuracy over the "
        "few-shot classes of each file's `evaluation.few_shot`; `posthoc_la` and `tau_norm` are the CE "
        "model read through the adjustment. Bold: best of the column. What the numbers say, and why: "
        "`notes.md` beside this file.",
        "",
    ]
    path = OUT / "summary.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--summarise", action="store_true", help="rewrite summary.md from summary.json, running nothing"
    )
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.summarise:
        print(write_summary(json.loads((OUT / "summary.json").read_text())))
        return 0
    previous = OUT / "summary.json"  # datasets not run this time keep their published results
    results: dict[str, dict] = json.loads(previous.read_text()) if previous.is_file() else {}
    for dataset in args.datasets:
        spec_path = SWEEPS / f"imbalance-{dataset}.yaml"
        federated = scores(run_sweep(spec_path, f"imbalance-{dataset}", args.workers))
        best = best_method(federated)
        with tempfile.TemporaryDirectory() as tmp:
            central_path = centralised_file(spec_path, best, Path(tmp))
            central = scores(run_sweep(central_path, f"imbalance-{dataset}-centralised", args.workers))
        results[dataset] = {"federated": federated, "centralised": central, "best": best}
        print(f"{dataset}: best federated method {best}", file=sys.stderr)
    print(write_summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
