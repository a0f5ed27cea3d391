"""Benchmark: the server strategies against FedAvg on long-tailed, label-skewed data (issue 19).

1. ``fedtail sweep benchmarks/sweeps/strategies-digits.yaml``: every strategy at its defaults with CE,
   Dirichlet alpha 0.1 and 0.5 over 20 clients (half per round), IF 10, plain FL, equal local work,
   3 seeds;
2. the centralised references: one client holding all the data, with CE and with LDAM-DRW;
3. the best ``--top`` strategies at alpha 0.1 (by mean balanced accuracy), and FedAvg, combined with the best
   objectives of the imbalance benchmark (LDAM-DRW on its cosine head, Balanced Softmax), at alpha 0.1;
4. ``fedtail sweep benchmarks/sweeps/strategies-attacks.yaml``: 20 % sign-flipping or scaling attackers,
   FedAvg against each robust aggregator (alpha 0.5);
5. ``benchmarks/results/strategies/summary.{md,json}``: mean ± sample std of balanced accuracy, tail
   accuracy and the worst 10 % of clients' accuracy; bytes per round (down + up, summed over clients,
   from rounds.csv); time per round relative to FedAvg's in the same sweep (side by side, same machine).

Finished runs are reused (the sweep skips them), so an interrupted benchmark resumes.

    .venv/bin/python benchmarks/strategies.py [--workers 2] [--top 3] [--summarise]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imbalance import run_sweep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "benchmarks" / "sweeps" / "strategies-digits.yaml"
ATTACKS = REPO / "benchmarks" / "sweeps" / "strategies-attacks.yaml"
OUT = REPO / "benchmarks" / "results" / "strategies"
METRICS = {
    "final_balanced_accuracy": "balanced acc. ↑",
    "final_tail_accuracy": "tail acc. ↑",
    "final_client_accuracy_worst10": "worst-10 % clients ↑",
}
OBJECTIVES = {
    "ldam_drw": {"train.objective": "ldam", "model.classifier": "cosine"},
    "balanced_softmax": {"train.objective": "balanced_softmax"},
}
BASELINE = "fedavg"


def per_run_costs(sweep_id: str, runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's mean bytes per round (down + up) and seconds per round, from its own folder."""
    rows = []
    for run_id in runs["run_id"]:
        folder = REPO / "sweeps" / sweep_id / "runs" / str(run_id)
        rounds = pd.read_csv(folder / "rounds.csv")
        seconds = json.loads((folder / "timing.json").read_text())["simulate_seconds"]
        rows.append(
            {
                "run_id": run_id,
                "bytes_per_round": float((rounds["bytes_down"] + rounds["bytes_up"]).mean()),
                "seconds_per_round": seconds / len(rounds),
            }
        )
    return runs.merge(pd.DataFrame(rows), on="run_id")


def collect(sweep_id: str, runs: pd.DataFrame, by: list[str]) -> dict[str, dict[str, list[float]]]:
    """group label -> metric -> the seeds' values (failed runs are an error: the defaults must hold)."""
    failed = runs[runs["status"] == "failed"]
    if len(failed):
        raise SystemExit(f"{sweep_id}: failed runs: {failed[['variant', 'error']].to_dict('records')}")
    runs = per_run_costs(sweep_id, runs)
    out: dict[str, dict[str, list[float]]] = {}
    for key, group in runs.groupby(by, sort=False):
        label = " / ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        out[label] = {
            m: group[m].astype(float).tolist() for m in [*METRICS, "bytes_per_round", "seconds_per_round"]
        }
    return out


def _mean(values: list[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.fmean(clean) if clean else math.nan


def _cell(values: list[float]) -> str:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return "–"
    return (
        f"{statistics.fmean(clean):.3f} ± {statistics.stdev(clean):.3f}"
        if len(clean) > 1
        else f"{clean[0]:.3f}"
    )


def table(rows: dict[str, dict[str, list[float]]], reference: dict[str, list[float]] | None) -> list[str]:
    """Markdown rows; bytes and time relative to ``reference`` (FedAvg's row), the best mean in bold."""
    best = {
        m: max(rows, key=lambda r: _mean(rows[r][m]) if not math.isnan(_mean(rows[r][m])) else -1)
        for m in METRICS
    }
    head = [*METRICS.values(), "MB / round", "time / round vs FedAvg"]
    lines = ["| strategy | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, s in rows.items():
        cells = [f"**{_cell(s[m])}**" if best[m] == label else _cell(s[m]) for m in METRICS]
        cells.append(f"{_mean(s['bytes_per_round']) / 1e6:.2f}")
        ratio = (
            _mean(s["seconds_per_round"]) / _mean(reference["seconds_per_round"]) if reference else math.nan
        )
        cells.append("–" if math.isnan(ratio) else f"{ratio:.2f}×")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def write_summary(results: dict) -> Path:
    (OUT / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    spec = yaml.safe_load(SPEC.read_text())
    settings = ", ".join(f"`{k}={v}`" for k, v in spec["set"].items())
    lines = [
        "# Server strategies vs FedAvg on long-tailed digits (issue 19)",
        "",
        f"Settings: {settings}; CE; seeds {spec['seeds']}.",
        "",
    ]
    for alpha, rows in results["strategies"].items():
        lines += [f"## Dirichlet α = {alpha}", ""]
        lines += table(rows, rows.get(BASELINE))
        lines.append("")
    lines += ["## Centralised references (one client holding all the data)", ""]
    lines += table(results["centralised"], None)
    lines += ["", "## The best strategies at α = 0.1 with the best objectives", ""]
    combos = results["combinations"]
    lines += table(combos, results["strategies"]["0.1"].get(BASELINE))
    lines += ["", "## 20 % attackers: FedAvg against the robust aggregators (α = 0.5)", ""]
    for attack, rows in results["attacks"].items():
        lines += [f"attack `{attack}`:", ""]
        lines += table(rows, rows.get(BASELINE))
        lines.append("")
    lines += [
        "",
        "mean ± sample std over the seeds of the final global model's test metrics; worst-10 % clients: the "
        "mean accuracy of the 10 % of clients the global model serves worst (each client's test accuracy "
        "re-weighted to its own label mix). MB / round: array payload sent down and up, summed over the "
        "round's clients. Time per round: simulate seconds / rounds, relative to FedAvg's in the same "
        "sweep. Bold: best of the column. What the numbers say: `notes.md` beside this file.",
        "",
    ]
    path = OUT / "summary.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--summarise", action="store_true", help="rewrite summary.md from summary.json")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.summarise:
        print(write_summary(json.loads((OUT / "summary.json").read_text())))
        return 0
    runs = run_sweep(SPEC, "strategies-digits", args.workers)
    strategies: dict[str, dict] = {}
    for alpha, group in runs.groupby("partition.alpha", sort=True):
        strategies[str(alpha)] = collect("strategies-digits", group, ["variant"])
    spec = yaml.safe_load(SPEC.read_text())
    at_01 = strategies["0.1"]
    top = sorted(at_01, key=lambda v: _mean(at_01[v]["final_balanced_accuracy"]), reverse=True)[: args.top]
    with tempfile.TemporaryDirectory() as tmp:
        central = {
            **spec,
            "axes": {},
            "set": {**spec["set"], "federation.num_clients": 1, "federation.fraction_train": 1.0},
        }
        central["variants"] = {"ce": {}, **{k: v for k, v in OBJECTIVES.items() if k == "ldam_drw"}}
        path = Path(tmp) / "strategies-digits-centralised.yaml"
        path.write_text(yaml.safe_dump(central, sort_keys=False))
        centralised = collect(
            "strategies-digits-centralised",
            run_sweep(path, "strategies-digits-centralised", args.workers),
            ["variant"],
        )
        combo = {**spec, "axes": {}, "set": {**spec["set"], "partition.alpha": 0.1}}
        combo["variants"] = {
            f"{s}-{o}": {**spec["variants"][s], **overrides}
            for s in [*top, BASELINE]
            for o, overrides in OBJECTIVES.items()
        }
        path = Path(tmp) / "strategies-digits-combined.yaml"
        path.write_text(yaml.safe_dump(combo, sort_keys=False))
        combinations = collect(
            "strategies-digits-combined",
            run_sweep(path, "strategies-digits-combined", args.workers),
            ["variant"],
        )
    attacked = run_sweep(ATTACKS, "strategies-attacks", args.workers)
    attacks = {
        str(name): collect("strategies-attacks", group, ["variant"])
        for name, group in attacked.groupby("attack.name", sort=False)
    }
    results = {
        "strategies": strategies,
        "centralised": centralised,
        "combinations": combinations,
        "attacks": attacks,
        "top": top,
    }
    print(write_summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
