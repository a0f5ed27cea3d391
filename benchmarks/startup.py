"""Benchmark: how soon `fedtail run` shows something, reaches its first round, and ends.

The default run (params.yaml, digits, in-process, Prefect's temporary server), launched on a
pseudo-terminal as a user at a terminal would, in the project's own folder with runs written to a
throw-away folder. Three times per measured tree, alternating: this checkout and, with ``--baseline
REV``, a git worktree of an earlier commit (its code on ``PYTHONPATH``, started as
``python -c 'fedtail.cli.main'`` since an old checkout has no `entry`), so both share the machine's
state. Reported per tree: seconds to the first output, to the first round's line, to the exit.
Writes ``benchmarks/results/startup.{json,md}``.

    .venv/bin/python benchmarks/startup.py --baseline df07c17
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pty
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO  # benchmarks/common.py; puts the project on sys.path

from fedtail import io  # noqa: E402

PYTHON = Path(sys.executable)


def launch(tree: Path, runs: Path, run_id: str, script: bool) -> dict[str, float]:
    """One `fedtail run` on a pseudo-terminal; seconds to the first output, first round, exit."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}
    env.pop("PREFECT_API_URL", None)
    if script:
        argv = [str(PYTHON.parent / "fedtail"), "run"]
    else:
        env["PYTHONPATH"] = str(tree)
        argv = [
            str(PYTHON),
            "-c",
            "import sys; from fedtail.cli import main; sys.exit(main(sys.argv[1:]))",
            "run",
        ]
    argv += ["--set", f"output.runs_dir={runs}", "--run-id", run_id]
    start = time.monotonic()
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal session in the measured tree
        os.chdir(tree)
        os.execve(argv[0], argv, env)
    first = first_round = None
    seen = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 300)
        if not ready:
            break
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        now = time.monotonic() - start
        first = now if first is None else first
        seen += data
        if first_round is None and b"round 1/" in seen:
            first_round = now
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or first_round is None:
        raise RuntimeError(f"`fedtail run` in {tree} failed:\n{seen.decode(errors='replace')[-2000:]}")
    return {"first_output": first, "first_round": first_round, "total": time.monotonic() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="an earlier commit to measure side by side (a git worktree)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "startup"))
    args = parser.parse_args()
    trees = {"current": (REPO, True)}
    with tempfile.TemporaryDirectory(prefix="fedtail-startup-") as tmp:
        if args.baseline:
            base = Path(tmp) / "baseline"
            subprocess.run(
                ["git", "worktree", "add", "-q", "--detach", str(base), args.baseline], cwd=REPO, check=True
            )
            subprocess.run(["cp", "-r", str(REPO / "data"), str(base / "data")], check=True)
            trees = {f"baseline {args.baseline}": (base, False), **trees}
        try:
            times: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for i in range(args.repeats):
                for name, (tree, script) in trees.items():
                    times[name].append(launch(tree, Path(tmp) / "runs", f"{name.split()[0]}-{i}", script))
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    medians = {
        name: {key: statistics.median(t[key] for t in runs) for key in runs[0]}
        for name, runs in times.items()
    }
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "runs": times, "median": medians}
    out = Path(args.out)
    io.write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    md = [
        "# `fedtail run` start-up (default run, on a pseudo-terminal)",
        "",
        f"`benchmarks/startup.py{' --baseline ' + args.baseline if args.baseline else ''}`, "
        f"{args.repeats} alternating launches per tree, median seconds; {os.cpu_count()} CPUs.",
        "",
        "| tree | first output | first round | total |",
        "|---|---|---|---|",
    ]
    md += [
        f"| {n} | {m['first_output']:.1f} | {m['first_round']:.1f} | {m['total']:.1f} |"
        for n, m in medians.items()
    ]
    io.write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
