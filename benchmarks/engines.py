"""Benchmark: the same federations on the in-process engine and on Ray, side by side, plus the wall
time of the default main job (``fedtail run`` on params.yaml, Prefect included).

Two workloads: ``tiny`` (configs/smoke.yaml, 5 clients x 6 rounds: dominated by Ray's start-up) and
``default`` (params.yaml, 10 clients x 25 rounds: adds Ray's per-message cost).

Writes ``benchmarks/results/engines.json``. Ratios, not absolute times, are the result: both engines run
in this one invocation on the same machine.

    .venv/bin/python benchmarks/engines.py [--repeats 2] [--skip-main-job]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import REPO, make_project  # benchmarks/common.py; puts the project on sys.path

from fedtail import io, pipeline  # noqa: E402
from fedtail.config import load_config  # noqa: E402

WORKLOADS = {
    "tiny": (REPO / "configs" / "smoke.yaml", {"federation.num_clients": 5, "federation.rounds_per_task": 3}),
    "default": (REPO / "params.yaml", {}),
}


def time_engine(root: Path, config: Path, engine: str, run_id: str, overrides: dict) -> tuple[float, dict]:
    cfg = load_config(
        config,
        {
            **overrides,
            "engine.name": engine,
            "output.run_id": run_id,
            "output.data_dir": str(root / "data"),
            "output.artifacts_dir": str(root / "artifacts"),
            "output.runs_dir": str(root / "runs"),
        },
    )
    staged = pipeline.stage(cfg, root)
    parts = pipeline.partition(cfg, staged, root)
    start = time.perf_counter()
    run_dir = pipeline.simulate(cfg, staged, parts, pipeline.new_run_dir(cfg, root))
    return time.perf_counter() - start, json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-main-job", action="store_true")
    args = parser.parse_args()
    result: dict = {"machine": platform.platform(), "python": platform.python_version(), "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_project(Path(tmp))
        for name, (config, overrides) in WORKLOADS.items():
            times: dict[str, list[float]] = {"inprocess": [], "ray": []}
            metrics = {}
            for rep in range(args.repeats):
                for engine in times:
                    seconds, metrics[engine] = time_engine(
                        root, config, engine, f"{name}-{engine}-{rep}", overrides
                    )
                    times[engine].append(seconds)
                    print(f"{name:8s} {engine:9s} repeat {rep}: {seconds:.2f} s", flush=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            result["workloads"][name] = {
                "config": str(config.relative_to(REPO)),
                "overrides": overrides,
                "seconds": times,
                "median_seconds": med,
                "ray_over_inprocess": med["ray"] / med["inprocess"],
                "identical_metrics": metrics["ray"] == metrics["inprocess"],
            }
            print(f"{name}: ray / inprocess wall-time ratio (median) {med['ray'] / med['inprocess']:.1f}x")
    if not args.skip_main_job:
        start = time.perf_counter()
        subprocess.run([str(REPO / ".venv" / "bin" / "fedtail"), "run"], cwd=REPO, check=True)
        result["main_job_seconds"] = time.perf_counter() - start
        print(f"default main job (fedtail run): {result['main_job_seconds']:.1f} s")
    out = REPO / "benchmarks" / "results" / "engines.json"
    io.write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
