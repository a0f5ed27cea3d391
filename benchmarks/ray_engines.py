"""Benchmark: the same federations on the in-process engine, Flower's Ray simulation engine (``ray``)
and the ray-actors engine, side by side in one invocation, with the per-client-message overhead of each
Ray engine over the in-process engine.

Workloads as in benchmarks/speed.py (digits MLP, plain FL, FedAvg, CE, 2 epochs, server evaluation
every round): 20 clients x 10 rounds with 50 % sampled per round, and 100 clients x 10 rounds with 10 %.
ray-actors runs twice: with its default actor count (the machine's CPUs) and with one actor (the
overhead alone, no parallel clients). First, the engines' own cost without any client work: rounds of
no-op ClientApp calls on the in-process and the ray-actors Grid, and Ray's start and stop times.

Each measurement runs in a fresh Python process. Per run it records the wall time of the federation
(Ray's start and stop included), the time to the end of round 1 (start-up and client discovery) and
the median time of rounds 2.. ("steady round"). Per-message overhead of an engine =
(its steady round - the in-process engine's steady round) / clients sampled per round. Writes
``benchmarks/results/ray_engines.json``; ratios, not absolute times, are the result.

    .venv/bin/python benchmarks/ray_engines.py [--repeats 1] [--only 20x10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BASE, REPO, config, make_project  # benchmarks/common.py; puts the project on sys.path

from fedtail import io, pipeline  # noqa: E402

WORKLOADS = {  # name -> (clients, rounds, share sampled per round)
    "20x10": (20, 10, 0.5),
    "100x10": (100, 10, 0.1),
}
ENGINES = {  # label -> overrides
    "inprocess": {"engine.name": "inprocess"},
    "ray": {"engine.name": "ray"},
    "ray-actors": {"engine.name": "ray-actors"},
    "ray-actors-1": {"engine.name": "ray-actors", "engine.actors": 1},
}


def _overrides(workload: str, engine: str) -> dict:
    clients, rounds, share = WORKLOADS[workload]
    return {
        **BASE,
        "federation.num_clients": clients,
        "federation.rounds_per_task": rounds,
        "federation.fraction_train": share,
        **ENGINES[engine],
    }


def one(root: Path, workload: str, engine: str, run_id: str) -> dict:
    """One federation in this process: wall time, round end times, metrics."""
    cfg = config(root, {**_overrides(workload, engine), "output.run_id": run_id})
    staged = pipeline.stage(cfg, root)
    parts = pipeline.partition(cfg, staged, root)
    ends: list[float] = []
    start = time.perf_counter()
    run_dir = pipeline.simulate(
        cfg,
        staged,
        parts,
        pipeline.new_run_dir(cfg, root),
        on_round=lambda _: ends.append(time.perf_counter()),
    )
    seconds = time.perf_counter() - start
    rounds = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {
        "seconds": seconds,
        "first_round_seconds": ends[0] - start,
        "steady_round_seconds": statistics.median(rounds),
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
    }


def noop(calls: int = 10, rounds: int = 20) -> dict:
    """The engines' own cost: rounds of ``calls`` no-op ClientApp calls (tests/engine_apps.py) on the
    in-process Grid and on the ray-actors Grid with one actor; how long Ray and the actor take to start."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedtail.engines.inprocess import InProcessGrid, set_server_identity
    from fedtail.engines.ray_actors import RayActorGrid, ray_session

    app = "tests.engine_apps:app"
    result: dict = {"calls_per_round": calls}
    start = time.perf_counter()
    with ray_session(None):
        result["ray_init_seconds"] = time.perf_counter() - start
        set_server_identity()
        start = time.perf_counter()
        actors = RayActorGrid(app, calls, actors=1, timeout=60.0)
        result["actor_start_seconds"] = time.perf_counter() - start
        for name, grid in (("ray-actors-1", actors), ("inprocess", InProcessGrid(app, calls))):
            times = []
            for _ in range(rounds):
                messages = [
                    Message(
                        RecordDict({"cfg": ConfigRecord({"action": "ok"})}),
                        dst_node_id=n,
                        message_type="train",
                    )
                    for n in grid.node_ids
                ]
                start = time.perf_counter()
                list(grid.send_and_receive(messages))
                times.append(time.perf_counter() - start)
            grid.close()
            result[f"{name}_round_ms"] = 1000 * statistics.median(times[2:])
        start = time.perf_counter()
    result["ray_shutdown_seconds"] = time.perf_counter() - start
    result["ray-actors-1_overhead_ms_per_call"] = (
        result["ray-actors-1_round_ms"] - result["inprocess_round_ms"]
    ) / calls
    return result


def _measure(root: Path, workload: str, engine: str, run_id: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, __file__, "--one", str(root), workload, engine, run_id]
    out = subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=sorted(WORKLOADS), action="append")
    parser.add_argument("--noop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--one", nargs=4, metavar=("ROOT", "WORKLOAD", "ENGINE", "RUN_ID"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.noop:
        print(json.dumps(noop()))
        return
    if args.one:
        root, workload, engine, run_id = args.one
        print(json.dumps(one(Path(root), workload, engine, run_id)))
        return
    result: dict = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "base_overrides": BASE,
        "workloads": {},
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, __file__, "--noop"], cwd=REPO, env=env, check=True, capture_output=True
    )
    result["noop"] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    print(json.dumps(result["noop"], indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_project(Path(tmp))
        for name in args.only or WORKLOADS:
            clients, rounds, share = WORKLOADS[name]
            sampled = max(1, round(clients * share))
            runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
            for rep in range(args.repeats):
                for engine in ENGINES:
                    run = _measure(root, name, engine, f"{name}-{engine}-{rep}")
                    runs[engine].append(run)
                    first, steady = run["first_round_seconds"], run["steady_round_seconds"]
                    print(
                        f"{name:7s} {engine:13s} repeat {rep}: {run['seconds']:6.2f} s, "
                        f"round 1 {first:6.2f} s, steady round {steady:.3f} s",
                        flush=True,
                    )
            med = {
                engine: {
                    key: statistics.median(r[key] for r in rs)
                    for key in ("seconds", "first_round_seconds", "steady_round_seconds")
                }
                for engine, rs in runs.items()
            }
            base = med["inprocess"]
            reference = runs["inprocess"][0]["metrics"]
            result["workloads"][name] = {
                "clients": clients,
                "rounds": rounds,
                "sampled_per_round": sampled,
                "engines": ENGINES,
                "runs": {
                    e: [{k: v for k, v in r.items() if k != "metrics"} for r in rs] for e, rs in runs.items()
                },
                "median": med,
                "over_inprocess": {e: m["seconds"] / base["seconds"] for e, m in med.items()},
                "steady_round_over_inprocess": {
                    e: m["steady_round_seconds"] / base["steady_round_seconds"] for e, m in med.items()
                },
                "overhead_ms_per_client_message": {
                    e: 1000 * (m["steady_round_seconds"] - base["steady_round_seconds"]) / sampled
                    for e, m in med.items()
                    if e != "inprocess"
                },
                "identical_metrics": {
                    e: all(r["metrics"] == reference for r in rs) for e, rs in runs.items()
                },
            }
            print(json.dumps({k: result["workloads"][name][k] for k in ("over_inprocess",
                  "overhead_ms_per_client_message", "identical_metrics")}, indent=1), flush=True)  # fmt: skip
    out = REPO / "benchmarks" / "results" / "ray_engines.json"
    io.write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
