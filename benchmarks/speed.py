"""Benchmark: fedtail's in-process engine against a hand-written single-process PyTorch loop doing the
same work (issue 6's table), side by side in one invocation.

The plain loop below is the reference: the same staged arrays and partition, the same model and seeded
initial weights, the same seeded client sampling and batch order, the same epochs and optimizer, FedAvg's
weighted mean in partition order, and a server evaluation of the global model every round. It reaches
the same final accuracy as fedtail (checked: both are recorded). Only what fedtail adds on top (Flower
messages, config, run folder, checkpoints, metrics, client state) makes the difference.

Every measurement runs in a fresh Python process (``--one``), so per-process caches and peak memory
are measured per run, not carried over; imports and torch's lazy first-step set-up happen before the
clock starts, on both sides. Writes ``benchmarks/results/speed.json`` and ``speed.md``.

    .venv/bin/python benchmarks/speed.py            # every workload (tens of minutes on 2 cores)
    .venv/bin/python benchmarks/speed.py --quick    # the small workloads only (a few minutes)
    .venv/bin/python benchmarks/speed.py --only 100x10 --repeats 1
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import BASE, REPO, config, make_project  # benchmarks/common.py; puts the project on sys.path
from torch.nn import functional as F  # noqa: E402

from fedtail import io, pipeline  # noqa: E402
from fedtail.config import FedtailConfig  # noqa: E402

MNIST1D_70K = {"dataset.name": "mnist1d", "dataset.num_samples": 70000}


def _fl(clients: int, rounds: int, share: float, **extra) -> dict:
    return {
        **BASE,
        "federation.num_clients": clients,
        "federation.rounds_per_task": rounds,
        "federation.fraction_train": share,
        **extra,
    }


# name -> (overrides, repeats cap, part of --quick)
WORKLOADS: dict[str, tuple[dict, int, bool]] = {
    "20x10": (_fl(20, 10, 0.5), 3, True),
    "100x10": (_fl(100, 10, 0.1), 3, True),
    "1000x5": (_fl(1000, 5, 0.1), 3, True),
    "10000x10-mnist1d": (_fl(10000, 10, 0.1, **MNIST1D_70K), 1, False),
    "1000x100-mnist1d": (_fl(1000, 100, 0.1, **MNIST1D_70K), 1, False),
}
# engine.workers 1 vs 2 on a workload where client training dominates
WORKERS_WORKLOAD = ("100x10-mnist1d-all", _fl(100, 10, 1.0, **MNIST1D_70K))


def _rss_mb() -> float:
    """Current resident memory of this process (MB)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 1e6


def _peak_mb() -> dict[str, float]:
    """Peak resident memory (MB) of this process and of its largest child process (worker processes)."""
    return {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e3,
    }


# ---- the hand-written loop ------------------------------------------------------------------------
def plain_loop(cfg: FedtailConfig, staged: Path, parts: Path) -> dict:
    """The federation as one would write it by hand: one model, numpy arrays, no framework."""
    from clients.local import step_seed
    from fedtail.models import model_for
    from strategies.base import sample_partitions

    torch.set_num_threads(cfg.engine.threads_per_client)  # as fedtail's clients do
    start = time.perf_counter()
    x_train = np.load(staged / "x_train.npy")
    y_train = np.load(staged / "y_train.npy")
    x_test = torch.from_numpy(np.load(staged / "x_test.npy").astype(np.float32))
    y_test = np.load(staged / "y_test.npy").astype(np.int64)
    assignment = np.load(parts / "assignment.npy")
    labeled = np.load(parts / "labeled.npy")
    n_clients, t = cfg.federation.num_clients, cfg.train
    order = np.argsort(assignment, kind="stable")  # training-set indices grouped by client, sorted within
    bounds = np.searchsorted(assignment[order], np.arange(n_clients + 1))

    def client_data(pid: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = order[bounds[pid] : bounds[pid + 1]]
        idx = idx[labeled[idx]]
        return (
            torch.from_numpy(np.asarray(x_train[idx], dtype=np.float32)),
            torch.from_numpy(np.asarray(y_train[idx], dtype=np.int64)),
        )

    meta = json.loads((staged / "meta.json").read_text())
    model = model_for(cfg, meta["input_shape"])
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    accuracy, rss, ends = [], [], []
    for rnd in range(1, cfg.federation.rounds_per_task + 1):
        pids = sample_partitions(
            n_clients, cfg.federation.fraction_train, cfg.federation.min_train_clients, cfg.seed, rnd
        )
        updates, weights = [], []
        for pid in pids:
            x, y = client_data(pid)
            n = len(y)
            if n == 0:
                continue
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(
                model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
            )
            gen = torch.Generator().manual_seed(step_seed(cfg.seed, 0, rnd, pid))
            model.train()
            for _ in range(t.epochs):
                perm = torch.randperm(n, generator=gen)
                for b in range(0, n, t.batch_size):
                    batch = perm[b : b + t.batch_size]
                    loss = F.cross_entropy(model(x[batch]), y[batch])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            updates.append({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
            weights.append(float(n))
        if updates:  # FedAvg: weighted mean in partition order (float32, as Flower computes it)
            total = sum(weights)
            avg = {k: v * (weights[0] / total) for k, v in updates[0].items()}
            for upd, w in zip(updates[1:], weights[1:], strict=True):
                for k, v in upd.items():
                    avg[k] += v * (w / total)
            global_state = {k: torch.from_numpy(v) for k, v in avg.items()}
        model.load_state_dict(global_state)
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(x_test[i : i + 2048]).argmax(1) for i in range(0, len(x_test), 2048)])
        accuracy.append(float((pred.numpy() == y_test).mean()))
        rss.append(_rss_mb())
        ends.append(time.perf_counter() - start)
    return {
        "seconds": time.perf_counter() - start,
        "final_accuracy": round(accuracy[-1], 6),
        "rss_mb_per_round": rss,
        "round_end_seconds": ends,
    }


# ---- fedtail ----------------------------------------------------------------------------------------
def fedtail_run(cfg: FedtailConfig, staged: Path, parts: Path, root: Path) -> dict:
    rss: list[float] = []
    ends: list[float] = []
    start = time.perf_counter()

    def on_round(_: dict) -> None:
        rss.append(_rss_mb())
        ends.append(time.perf_counter() - start)

    run_dir = pipeline.simulate(cfg, staged, parts, pipeline.new_run_dir(cfg, root), on_round=on_round)
    seconds = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "seconds": seconds,
        "final_accuracy": metrics["final_accuracy"],
        "rss_mb_per_round": rss,
        "round_end_seconds": ends,
    }


def _warm_torch() -> None:
    """One SGD step on a throw-away model: torch imports much of itself lazily on the first backward
    and optimizer step (about a second here), a cost of the process that both sides would pay."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(torch.zeros(2, 4)), torch.tensor([0, 1])).backward()
    opt.step()


def one(args: argparse.Namespace) -> None:
    """Child process: one measurement, printed as a JSON line."""
    root = Path(args.root)
    cfg = config(root, json.loads(args.overrides))
    staged = pipeline.stage(cfg, root)
    parts = pipeline.partition(cfg, staged, root)
    start = time.perf_counter()
    import clients.app  # noqa: F401  - imports are not the engine's per-run cost: done before the clock
    import server.app  # noqa: F401

    _warm_torch()
    imports = time.perf_counter() - start
    run = plain_loop if args.one == "plain" else functools.partial(fedtail_run, root=root)
    out = run(cfg, staged, parts)
    out["peak_rss_mb"] = _peak_mb()
    out["import_seconds"] = imports
    print("RESULT " + json.dumps(out), flush=True)


def measure(root: Path, who: str, overrides: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", who, "--root", str(root), "--overrides", json.dumps(overrides)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"did_not_finish_within_s": timeout}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{who} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _prepare(root: Path, overrides: dict) -> None:
    cfg = config(root, overrides)
    pipeline.partition(cfg, pipeline.stage(cfg, root), root)


def _summary(runs: list[dict]) -> dict:
    done = [r for r in runs if "seconds" in r]
    if not done:
        return {"runs": runs}
    per_round = [
        statistics.median(b - a for a, b in itertools.pairwise(r["round_end_seconds"]))
        for r in done
        if len(r.get("round_end_seconds", [])) > 1
    ]
    return {
        "runs": runs,
        "median_seconds": statistics.median(r["seconds"] for r in done),
        "median_round_seconds": statistics.median(per_round) if per_round else None,
        "first_round_end_seconds": statistics.median(r.get("round_end_seconds", [0.0])[0] for r in done),
        "final_accuracy": done[0]["final_accuracy"],
        "peak_rss_mb": max(r["peak_rss_mb"]["self"] for r in done),
    }


def _growth(rss: list[float]) -> float | None:
    """RSS growth (MB) from the end of the first tenth of the rounds to the last round."""
    if len(rss) < 10:
        return None
    return rss[-1] - rss[len(rss) // 10]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the small digits workloads")
    parser.add_argument("--only", nargs="*", help=f"workload names among {list(WORKLOADS)} and 'workers'")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the cheap workloads (median)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds before one run is abandoned")
    parser.add_argument("--label", default="", help="recorded with the results (e.g. 'before', 'after')")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "speed"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    names = [n for n, (_, _, quick) in WORKLOADS.items() if quick or not args.quick] + ["workers"]
    if args.only:
        names = [n for n in names if n in args.only] or list(args.only)
    result: dict = {
        "label": args.label,
        "machine": platform.platform(),
        "cpus": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "base_overrides": BASE,
        "workloads": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = make_project(Path(tmp), MNIST1D_70K)
        for name in names:
            if name == "workers":
                wname, overrides = WORKERS_WORKLOAD
                _prepare(root, overrides)
                reps = max(1, min(3, args.repeats))
                all_runs: dict[int, list[dict]] = {1: [], 2: []}
                for _ in range(reps):  # interleaved, so both see the same machine load
                    for w in (1, 2):
                        r = measure(root, "fedtail", {**overrides, "engine.workers": w}, args.timeout)
                        all_runs[w].append(r)
                runs = {
                    w: {**rs[0], "seconds": statistics.median(r["seconds"] for r in rs)}
                    for w, rs in all_runs.items()
                }
                entry = {
                    "overrides": overrides,
                    "workers": {str(w): r for w, r in runs.items()},
                    "seconds": {str(w): [r["seconds"] for r in rs] for w, rs in all_runs.items()},
                }
                if all("seconds" in r for r in runs.values()):
                    entry["speedup_2_over_1"] = runs[1]["seconds"] / runs[2]["seconds"]
                    accuracies = {r["final_accuracy"] for rs in all_runs.values() for r in rs}
                    entry["identical_accuracy"] = len(accuracies) == 1
                    print(
                        f"workers {wname}: 1 -> {runs[1]['seconds']:.1f} s, 2 -> {runs[2]['seconds']:.1f} s, "
                        f"speed-up {entry['speedup_2_over_1']:.2f}x",
                        flush=True,
                    )
                result["workloads"]["workers-" + wname] = entry
                continue
            overrides, cap, _ = WORKLOADS[name]
            _prepare(root, overrides)
            reps = max(1, min(cap, args.repeats))
            runs = {"plain": [], "fedtail": []}
            for rep in range(reps):
                for who in runs:
                    r = measure(root, who, overrides, args.timeout)
                    runs[who].append(r)
                    secs = (
                        f"{r['seconds']:.2f} s" if "seconds" in r else f"did not finish in {args.timeout:g} s"
                    )
                    print(f"{name:18s} {who:8s} repeat {rep}: {secs}", flush=True)
            entry = {"overrides": overrides, **{who: _summary(rs) for who, rs in runs.items()}}
            p, f = entry["plain"], entry["fedtail"]
            if "median_seconds" in p and "median_seconds" in f:
                entry["ratio_fedtail_over_plain"] = f["median_seconds"] / p["median_seconds"]
                entry["same_final_accuracy"] = p["final_accuracy"] == f["final_accuracy"]
                rss = f["runs"][0]["rss_mb_per_round"]
                entry["fedtail_rss_growth_mb"] = _growth(rss)
                print(
                    f"{name}: fedtail / plain = {entry['ratio_fedtail_over_plain']:.2f}x, accuracy "
                    f"{f['final_accuracy']} vs {p['final_accuracy']}",
                    flush=True,
                )
            result["workloads"][name] = entry
    out = Path(args.out)
    io.write_json(out.with_suffix(".json"), result)
    io.write_text(out.with_suffix(".md"), markdown(result))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def markdown(result: dict) -> str:
    lines = [
        f"# In-process engine vs a hand-written loop ({result['label'] or 'latest'}, {result['git']})",
        "",
        f"{result['machine']}, {result['cpus']} CPUs, Python {result['python']}, torch {result['torch']}. "
        "Medians of the repeats; every run in a fresh process.",
        "",
        "| workload (clients x rounds) | share | plain loop s | fedtail s | ratio "
        "| final acc plain / fedtail | s per round plain / fedtail | fedtail peak RSS MB | RSS growth MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in result["workloads"].items():
        if name.startswith("workers-"):
            continue
        p, f = e["plain"], e["fedtail"]
        share = e["overrides"]["federation.fraction_train"]

        def secs(s: dict) -> str:
            if "median_seconds" in s:
                return f"{s['median_seconds']:.2f}"
            return f"did not finish in {s['runs'][0]['did_not_finish_within_s']:g} s"

        ratio = f"{e['ratio_fedtail_over_plain']:.2f}x" if "ratio_fedtail_over_plain" in e else "-"
        acc = f"{p.get('final_accuracy', '-')} / {f.get('final_accuracy', '-')}"
        growth = e.get("fedtail_rss_growth_mb")

        def per_round(s: dict) -> str:
            value = s.get("median_round_seconds")
            return "-" if value is None else f"{value:.3f}"

        lines.append(
            f"| {name} | {share:.0%} | {secs(p)} | {secs(f)} | {ratio} | {acc} | "
            f"{per_round(p)} / {per_round(f)} | "
            f"{f.get('peak_rss_mb', float('nan')):.0f} | {'-' if growth is None else f'{growth:.1f}'} |"
        )
    for name, e in result["workloads"].items():
        if name.startswith("workers-") and "speedup_2_over_1" in e:
            w = e["workers"]
            lines += [
                "",
                f"`engine.workers` on {name.removeprefix('workers-')} (medians): "
                f"1 worker {w['1']['seconds']:.1f} s, "
                f"2 workers {w['2']['seconds']:.1f} s: speed-up {e['speedup_2_over_1']:.2f}x "
                f"(identical accuracy: {e['identical_accuracy']}).",
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
