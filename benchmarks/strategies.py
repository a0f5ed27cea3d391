"""Benchmark: the server strategies against FedAvg on long-tailed, label-skewed data (issue 19).

Per dataset (``--datasets``: digits-LT IF 10 and MNIST-1D-LT IF 50):

1. ``fedtail sweep benchmarks/sweeps/strategies-<dataset>.yaml``: every strategy at its defaults with CE,
   Dirichlet alpha 0.1 and 0.5 over 20 clients (half per round), plain FL, equal local work;
2. the centralised references: one client holding all the data, with CE and with LDAM-DRW;
3. the best ``--top`` strategies at alpha 0.1 (by mean balanced accuracy), and FedAvg, combined with the
   best objectives of the imbalance benchmark (LDAM-DRW on its cosine head, Balanced Softmax), at 0.1.

Then, on digits:

4. the class-incremental setting of the continual benchmark (benchmarks/sweeps/cil-digits-lt.yaml:
   Split-digits-LT, 5 tasks x 2 classes, 10 clients, alpha 0.5): the same strategies with iCaRL and
   GLFC (20 exemplars a client); a combination the config refuses is listed with its reason;
5. ``fedtail sweep benchmarks/sweeps/strategies-attacks.yaml``: 20 % sign-flipping or scaling attackers,
   FedAvg against each robust aggregator (alpha 0.5);
6. ``benchmarks/results/strategies/summary.{md,json}``: mean ± sample std of the metrics; bytes per round
   (down + up, summed over clients, from rounds.csv); time per round relative to FedAvg's in the same
   sweep (side by side, same machine).

``--seeds`` overrides the sweep files' seeds (the table says which ran). Finished runs are reused (the
sweep skips them), so an interrupted benchmark resumes and more seeds add to what ran.

    .venv/bin/python benchmarks/strategies.py [--workers 2] [--top 3] [--datasets digits mnist1d]
        [--seeds 0 1 2] [--summarise]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from imbalance import run_sweep  # noqa: E402

sys.path[0] = str(REPO)  # not benchmarks/: this file's name would shadow the strategies package

SPECS = {
    "digits": REPO / "benchmarks" / "sweeps" / "strategies-digits.yaml",
    "mnist1d": REPO / "benchmarks" / "sweeps" / "strategies-mnist1d.yaml",
}
CONTINUAL = REPO / "benchmarks" / "sweeps" / "cil-digits-lt.yaml"
CONTINUAL_METHODS = {
    "icarl": {"continual.method": "icarl", "continual.options": {"memory_size": 20}},
    "glfc": {"continual.method": "glfc", "continual.options": {"memory_size": 20}},
}
CONTINUAL_METRICS = {
    "average_incremental_accuracy": "avg. incremental acc. ↑",
    "final_average_accuracy": "final avg. acc. ↑",
    "forgetting": "forgetting ↓",
    "final_balanced_accuracy": "final balanced acc. ↑",
}
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


def collect(
    sweep_id: str, runs: pd.DataFrame, by: list[str], metrics: dict[str, str] = METRICS
) -> dict[str, dict[str, list[float]]]:
    """group label -> metric -> the seeds' values (failed runs are an error: the defaults must hold)."""
    failed = runs[runs["status"] == "failed"]
    if len(failed):
        raise SystemExit(f"{sweep_id}: failed runs: {failed[['variant', 'error']].to_dict('records')}")
    runs = per_run_costs(sweep_id, runs)
    out: dict[str, dict[str, list[float]]] = {}
    for key, group in runs.groupby(by, sort=False):
        label = " / ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        out[label] = {
            m: group[m].astype(float).tolist() for m in [*metrics, "bytes_per_round", "seconds_per_round"]
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


def table(
    rows: dict[str, dict[str, list[float]]],
    reference: dict[str, list[float]] | None,
    metrics: dict[str, str] = METRICS,
    first: str = "strategy",
    baseline: str = "FedAvg",
) -> list[str]:
    """Markdown rows; bytes and time relative to ``reference`` (the ``baseline`` row), the best mean in
    bold (the lowest for a metric marked ↓)."""

    def score(label: str, m: str) -> float:
        mean = _mean(rows[label][m])
        return -math.inf if math.isnan(mean) else (-mean if metrics[m].endswith("↓") else mean)

    best = {m: max(rows, key=lambda r, m=m: score(r, m)) for m in metrics}
    head = [*metrics.values(), "MB / round", f"time / round vs {baseline}"]
    lines = [f"| {first} | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, s in rows.items():
        cells = [f"**{_cell(s[m])}**" if best[m] == label else _cell(s[m]) for m in metrics]
        cells.append(f"{_mean(s['bytes_per_round']) / 1e6:.2f}")
        ratio = (
            _mean(s["seconds_per_round"]) / _mean(reference["seconds_per_round"]) if reference else math.nan
        )
        cells.append("–" if math.isnan(ratio) else f"{ratio:.2f}×")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def dataset_header(dataset: str, sweep_file: Path, seeds: list[int]) -> list[str]:
    """A summary's section head: the dataset and the sweep file's fixed settings."""
    spec = yaml.safe_load(sweep_file.read_text())
    settings = ", ".join(f"`{k}={v}`" for k, v in spec["set"].items())
    return [f"# {dataset}", "", f"Settings: {settings}; CE; seeds {seeds}.", ""]


def write_summary(results: dict) -> Path:
    (OUT / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Server strategies vs FedAvg on long-tailed data (issue 19)", ""]
    for dataset, part in results["datasets"].items():
        lines += dataset_header(dataset, SPECS[dataset], part["seeds"])
        for alpha, rows in part["strategies"].items():
            lines += [f"## {dataset}: Dirichlet α = {alpha}", ""]
            lines += table(rows, rows.get(BASELINE))
            lines.append("")
        lines += [f"## {dataset}: centralised references (one client holding all the data)", ""]
        lines += table(part["centralised"], None)
        lines += ["", f"## {dataset}: the best strategies at α = 0.1 with the best objectives", ""]
        lines += table(part["combinations"], part["strategies"]["0.1"].get(BASELINE))
        for label, reason in part.get("refused", {}).items():
            lines.append(f"- {label}: refused by the config: {reason}")
        lines.append("")
    if "continual" in results:
        part = results["continual"]
        lines += [
            "# Class-incremental: strategies with iCaRL and GLFC (Split-digits-LT, 5 tasks × 2 classes)",
            "",
            f"Settings: benchmarks/sweeps/cil-digits-lt.yaml (10 clients, α 0.5, IF 10, 10 rounds a task); "
            f"CE; seeds {part['seeds']}.",
            "",
        ]
        lines += table(part["rows"], part["rows"].get(f"{BASELINE}-icarl"), CONTINUAL_METRICS)
        for label, reason in part["refused"].items():
            lines.append(f"- {label}: refused by the config: {reason}")
        lines.append("")
    if "attacks" in results:
        lines += ["# 20 % attackers: FedAvg against the robust aggregators (digits, α = 0.5)", ""]
        for attack, rows in results["attacks"].items():
            lines += [f"attack `{attack}`:", ""]
            lines += table(rows, rows.get(BASELINE))
            lines.append("")
    lines += [
        "",
        "mean ± sample std over the seeds of the final global model's test metrics (CReFF: its "
        "re-trained classifier on the FedAvg features; OCFL: the mean over all clients' updates); "
        "worst-10 % clients: the mean accuracy of the 10 % of clients served worst (each client's test "
        "accuracy re-weighted to its own label mix; OCFL scores each client with its cluster's model). "
        "MB / round: array payload sent down and up, summed over the round's clients. Time per round: "
        "simulate seconds / rounds, relative to FedAvg's in the same sweep. Bold: best of the column. "
        "What the numbers say: `notes.md` beside this file.",
        "",
    ]
    path = OUT / "summary.md"
    path.write_text("\n".join(lines))
    return path


def _with_seeds(spec: dict, seeds: list[int] | None) -> dict:
    return spec if seeds is None else {**spec, "seeds": seeds}


def _sweep(spec: dict, sweep_id: str, tmp: Path, workers: int) -> pd.DataFrame:
    path = tmp / f"{sweep_id}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return run_sweep(path, sweep_id, workers)


def benchmark_dataset(dataset: str, tmp: Path, args: argparse.Namespace) -> dict:
    spec = _with_seeds(yaml.safe_load(SPECS[dataset].read_text()), args.seeds)
    sweep_id = f"strategies-{dataset}"
    runs = _sweep(spec, sweep_id, tmp, args.workers)
    strategies = {
        str(alpha): collect(sweep_id, group, ["variant"])
        for alpha, group in runs.groupby("partition.alpha", sort=True)
    }
    at_01 = strategies["0.1"]
    top = sorted(at_01, key=lambda v: _mean(at_01[v]["final_balanced_accuracy"]), reverse=True)[: args.top]
    central = {
        **spec,
        "axes": {},
        "set": {**spec["set"], "federation.num_clients": 1, "federation.fraction_train": 1.0},
        "variants": {"ce": {}, "ldam_drw": OBJECTIVES["ldam_drw"]},
    }
    centralised = collect(
        f"{sweep_id}-centralised", _sweep(central, f"{sweep_id}-centralised", tmp, args.workers), ["variant"]
    )
    combo = {**spec, "axes": {}, "set": {**spec["set"], "partition.alpha": 0.1}}
    combo["variants"], refused = {}, {}
    for s in dict.fromkeys([*top, BASELINE]):
        for o, overrides in OBJECTIVES.items():
            both = {**spec["variants"][s], **overrides}
            reason = refusal(combo, both)
            if reason is None:
                combo["variants"][f"{s}-{o}"] = both
            else:
                refused[f"{s}-{o}"] = reason
    combinations = collect(
        f"{sweep_id}-combined", _sweep(combo, f"{sweep_id}-combined", tmp, args.workers), ["variant"]
    )
    return {
        "strategies": strategies,
        "centralised": centralised,
        "combinations": combinations,
        "refused": refused,
        "top": top,
        "seeds": spec["seeds"],
    }


def refusal(base: dict, overrides: dict) -> str | None:
    """Why the config refuses ``overrides`` on the sweep file's settings, or None."""
    from fedtail.config import ConfigError, apply_overrides, build_config, read_config_file

    raw = apply_overrides(read_config_file(REPO / base["base"]), {**base["set"], **overrides})
    try:
        build_config(raw, schedule=False)
    except ConfigError as err:
        return str(err).splitlines()[-1].strip()
    return None


def benchmark_continual(strategies: list[str], tmp: Path, args: argparse.Namespace) -> dict:
    spec = _with_seeds(yaml.safe_load(CONTINUAL.read_text()), args.seeds)
    spec = {k: v for k, v in spec.items() if k != "axes"}
    named = yaml.safe_load(SPECS["digits"].read_text())["variants"]
    variants, refused = {}, {}
    for s in strategies:
        for m, overrides in CONTINUAL_METHODS.items():
            both = copy.deepcopy({**named[s], **overrides})  # no shared objects: YAML aliases are refused
            reason = refusal(spec, both)
            if reason is None:
                variants[f"{s}-{m}"] = both
            else:
                refused[f"{s}-{m}"] = reason
    spec["variants"] = variants
    spec["metrics"] = list(CONTINUAL_METRICS)
    sweep_id = "strategies-continual"
    rows = collect(sweep_id, _sweep(spec, sweep_id, tmp, args.workers), ["variant"], CONTINUAL_METRICS)
    return {"rows": rows, "refused": refused, "seeds": spec["seeds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--datasets", nargs="*", default=list(SPECS), choices=list(SPECS))
    parser.add_argument(
        "--seeds", nargs="*", type=int, default=None, help="instead of the sweep files' seeds"
    )
    parser.add_argument("--summarise", action="store_true", help="rewrite summary.md from summary.json")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.summarise:
        print(write_summary(json.loads((OUT / "summary.json").read_text())))
        return 0
    previous = json.loads((OUT / "summary.json").read_text()) if (OUT / "summary.json").is_file() else {}
    results: dict = {"datasets": dict(previous.get("datasets", {}))}
    for key in ("continual", "attacks"):
        if key in previous:
            results[key] = previous[key]
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            results["datasets"][dataset] = benchmark_dataset(dataset, Path(tmp), args)
            print(write_summary(results), flush=True)
        if "digits" in args.datasets:
            top = results["datasets"]["digits"]["top"]
            results["continual"] = benchmark_continual(list(dict.fromkeys([*top, BASELINE])), Path(tmp), args)
            attacked = _sweep(
                _with_seeds(yaml.safe_load(ATTACKS.read_text()), args.seeds),
                "strategies-attacks",
                Path(tmp),
                args.workers,
            )
            results["attacks"] = {
                str(name): collect("strategies-attacks", group, ["variant"])
                for name, group in attacked.groupby("attack.name", sort=False)
            }
    print(write_summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
