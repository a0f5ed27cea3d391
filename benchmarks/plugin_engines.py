"""Check: every registered strategy (``--kind strategies``) or semi-supervised method (``--kind semisup``)
runs by name on the in-process engine, on Ray's simulation engine and through ``flwr run .`` (Flower's
local SuperLink, one SuperNode per client), with the same result.

Each plug-in runs the smoke config (configs/smoke.yaml: 3 clients, 2 tasks; semi-supervised methods
with half the labels) at its default options on each engine; the final metrics must agree with the
in-process run's within ``TOL`` (each engine runs the same seeded arithmetic, but in other processes,
whose float kernels may differ in the last bits). Writes ``benchmarks/results/<kind>/engines.md``. Tens
of minutes on 2 cores (Ray and the SuperLink start per run).

    .venv/bin/python benchmarks/plugin_engines.py [--kind strategies] [--names fedavg creff]
        [--engines inprocess ray]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedtail import pipeline  # noqa: E402
from fedtail.config import load_config  # noqa: E402
from fedtail.registry import SEMISUP, STRATEGIES  # noqa: E402

SMOKE = REPO / "configs" / "smoke.yaml"
KINDS = {  # kind -> (registry, the field naming the plug-in, what every run of the kind needs besides)
    "strategies": (STRATEGIES, "strategy.name", {}),
    "semisup": (SEMISUP, "semisup.method", {"partition.labeled_fraction": 0.5}),
}
TOL = 1e-6
COMPARED = ("final_balanced_accuracy", "final_accuracy", "average_incremental_accuracy")
BIN = REPO / ".venv" / "bin"


KIND = "strategies"


def _overrides(root: Path, name: str, run_id: str) -> dict[str, str]:
    _, field, extra = KINDS[KIND]
    return {
        field: name,
        **extra,
        "output.data_dir": str(root / "data"),
        "output.artifacts_dir": str(root / "artifacts"),
        "output.runs_dir": str(root / "runs"),
        "output.run_id": run_id,
    }


def run_simulation(root: Path, name: str, engine: str) -> dict:
    """In-process or Ray: the pipeline's own simulate step (what `fedtail run` calls)."""
    cfg = load_config(SMOKE, {**_overrides(root, name, f"{name}-{engine}"), "engine.name": engine})
    staged = pipeline.stage(cfg, root)
    parts = pipeline.partition(cfg, staged, root)
    run_dir = pipeline.simulate(cfg, staged, parts, pipeline.new_run_dir(cfg, root))
    return json.loads((run_dir / "metrics.json").read_text())


def run_flwr(root: Path, name: str, env: dict[str, str]) -> dict:
    """``flwr run .`` with the smoke config, as README's "Flower's runtime" describes."""
    overrides = " ".join(f"{k}={v}" for k, v in _overrides(root, name, f"{name}-flwr").items())
    run_config = f"config-file='{SMOKE}' root='{root}' set='{overrides}'"
    cmd = [str(BIN / "flwr"), "run", ".", "--run-config", run_config, "--stream"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    metrics = root / "runs" / f"{name}-flwr" / "metrics.json"
    if proc.returncode != 0 or not metrics.is_file():
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"flwr run {shlex.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return json.loads(metrics.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=list(KINDS), default="strategies")
    parser.add_argument("--names", nargs="*", help="plug-ins of the kind (default: every registered one)")
    parser.add_argument("--engines", nargs="*", default=["inprocess", "ray", "flwr"])
    args = parser.parse_args(argv)
    global KIND
    KIND = args.kind
    names = args.names or KINDS[KIND][0].names()
    out = REPO / "benchmarks" / "results" / KIND / "engines.md"
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from fedtail.staging import add_data, init_dvc

        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        subprocess.run(
            ["git", "-c", "user.name=f", "-c", "user.email=f@f", "commit", "-q", "--allow-empty", "-m", "i"],
            cwd=root,
            check=True,
        )
        init_dvc(root)
        add_data(load_config(SMOKE, _overrides(root, names[0], "x")), root)
        if "flwr" in args.engines:
            clients = load_config(SMOKE).federation.num_clients
            subprocess.run(
                [str(BIN / "flwr"), "federation", "simulation-config", "--client-resources-num-cpus", "1",
                 "--num-supernodes", str(clients)],
                cwd=REPO, env=env, check=True, capture_output=True,
            )  # fmt: skip
        for name in names:
            results, seconds = {}, {}
            for engine in args.engines:
                start = time.perf_counter()
                try:
                    results[engine] = (
                        run_flwr(root, name, env) if engine == "flwr" else run_simulation(root, name, engine)
                    )
                except Exception as err:  # noqa: BLE001 - reported in the table, the check goes on
                    results[engine] = {"error": str(err).splitlines()[0][:200]}
                seconds[engine] = time.perf_counter() - start
            reference = results.get("inprocess", {})
            cells = []
            for engine in args.engines:
                got = results[engine]
                if "error" in got:
                    cells.append(f"failed: {got['error']}")
                    continue
                diff = max(abs(got[k] - reference[k]) for k in COMPARED if k in reference and k in got)
                mark = "same" if diff <= TOL else f"differs by {diff:.2g}"
                cells.append(f"{got['final_balanced_accuracy']:.4f} ({mark}, {seconds[engine]:.0f} s)")
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    lines = [
        f"# Every {KINDS[KIND][0].kind} on every engine (smoke config, default options)",
        "",
        "Final balanced accuracy per engine; 'same': every compared metric "
        f"({', '.join(COMPARED)}) within {TOL:g} of the in-process run's. "
        f"Written by `benchmarks/plugin_engines.py --kind {KIND}`; seconds include each engine's start-up.",
        "",
        f"| {KINDS[KIND][1]} | " + " | ".join(args.engines) + " |",
        "|---" * (len(args.engines) + 1) + "|",
        *rows,
        "",
    ]
    out.write_text("\n".join(lines))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
