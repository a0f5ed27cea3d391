"""Look at what a user sees in the Prefect UI, in a real headless browser (Debian's ``chromium``).

Starts a private Prefect server (temporary ``PREFECT_HOME``, a free port), runs ``fedtail run`` on the smoke
preset against it, then loads the flow run page, the Artifacts page and the run's report and per-round
table artifacts in headless Chromium: saves a screenshot of each and checks the rendered page (the run's
name, one key per run, the report's plots shown inline, the table's per-class recall). Exits 1 if a check
fails. ``make ui-check``; screenshots land in ``--out`` (default ``ui-check/``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = "ui-check"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s")


def browser() -> str | None:
    """The headless browser to use: Debian's ``chromium`` (or ``chromium-browser``), if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(chromium: str, url: str, screenshot: Path) -> str:
    """Screenshot ``url`` into ``screenshot`` and return its DOM after the page's scripts ran."""
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000"]
    subprocess.run(
        [*common, "--window-size=1600,1400", f"--screenshot={screenshot}", url],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    dom = subprocess.run(
        [*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120
    )
    return dom.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="ui-check", help="folder for the screenshots (default: ui-check/)")
    args = parser.parse_args(argv)
    chromium = browser()
    if chromium is None:
        print(
            "ui-check: no chromium found; install Debian's package: apt-get install chromium", file=sys.stderr
        )
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedtail-ui-"))
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
    }
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    failures: list[str] = []
    try:
        _wait(f"{api}/health", 120)
        subprocess.run(
            [str(bin_dir / "fedtail"), "run", "--config", "configs/smoke.yaml", "--run-id", RUN_ID,
             "--set", f"output.runs_dir={work / 'runs'}", "--set", "federation.rounds_per_task=3"],
            cwd=ROOT, env=env, check=True, timeout=600,
        )  # fmt: skip
        os.environ.update({"PREFECT_HOME": env["PREFECT_HOME"], "PREFECT_API_URL": api})
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        with get_client(sync_client=True) as client:
            (flow_run,) = client.read_flow_runs()
            artifacts = {a.key: a for a in client.read_artifacts() if a.key}  # the latest version of each
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])), limit=200)
        # the run page lists these lines; its log view renders lazily, so check them where it reads them
        for line in ("task 1/2 round 1/3", "task 2/2 round 3/3"):
            if not any(line in entry.message for entry in logs):
                failures.append(f"run log: no line {line!r}")
        plots = len(list((work / "runs" / RUN_ID / "plots").glob("*.png")))
        ui = f"http://127.0.0.1:{port}"
        pages = {
            "run": (f"{ui}/runs/flow-run/{flow_run.id}", [flow_run.name]),
            "artifacts": (f"{ui}/artifacts", [f"fedtail-{RUN_ID}-report", f"fedtail-{RUN_ID}-rounds"]),
            "report": (
                f"{ui}/artifacts/artifact/{artifacts[f'fedtail-{RUN_ID}-report'].id}",
                ["Accuracy matrix"],
            ),
            "rounds": (f"{ui}/artifacts/artifact/{artifacts[f'fedtail-{RUN_ID}-rounds'].id}", ["recall_0"]),
            "config": (
                f"{ui}/artifacts/artifact/{artifacts[f'fedtail-{RUN_ID}-config'].id}",
                ["federation:"],
            ),
        }
        for name, (url, needles) in pages.items():
            dom = render(chromium, url, out / f"{name}.png")
            failures += [f"{name}: {needle!r} not on the page" for needle in needles if needle not in dom]
            if name == "report":
                shown = len(re.findall(r'<img[^>]+src="data:image/png;base64,', dom))
                if shown != plots:
                    failures.append(f"report: {shown} plots shown inline, the run has {plots}")
            print(f"{name}: {url} -> {out / (name + '.png')}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    for failure in failures:
        print(f"ui-check: FAILED {failure}", file=sys.stderr)
    print("ui-check: " + ("failed" if failures else f"every check passed; screenshots in {out}"))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
