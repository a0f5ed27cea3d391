"""A ClientApp whose updates depend on its persistent state, for resume tests, and a runner for it.

Each client sends ``start + step`` with ``step = (trained - start) + 0.5 * previous step`` (client-side
momentum, kept in ``context.state``). A resumed run whose clients lost their state sends different
updates, so only a run that restores every client's state reproduces an uninterrupted one.

``python -m tests.apps.stateful_client ROOT RUNS_DIR ARTIFACTS_DIR RUN_ID ENGINE MODE`` runs the smoke
federation with this client (``FEDTAIL_TEST_CLIENT_DELAY`` seconds of sleep per train message slow it
down so that a test can kill it mid-run).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from clients import app as base
from clients.state import persist_state
from fedtail import protocol as P

MOMENTUM = 0.5
KEY = "test-momentum"
REF = "tests.apps.stateful_client:app"
ROUNDS_PER_TASK = 6  # 2 tasks x 6 rounds with configs/smoke.yaml

app = ClientApp(mods=[persist_state])


@app.query()
def query(msg: Message, context: Context) -> Message:
    return base.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    time.sleep(float(os.environ.get("FEDTAIL_TEST_CLIENT_DELAY", "0")))
    reply = base.train(msg, context)
    start, trained = msg.content[P.ARRAYS], reply.content[P.ARRAYS]
    previous = context.state.get(KEY)
    step = {}
    for key in trained:
        delta = trained[key].numpy() - start[key].numpy()
        step[key] = delta + MOMENTUM * previous[key].numpy() if previous is not None else delta
    context.state[KEY] = ArrayRecord({k: Array(v) for k, v in step.items()})
    reply.content[P.ARRAYS] = ArrayRecord({k: Array(start[k].numpy() + v) for k, v in step.items()})
    return reply


def config(root: Path, runs_dir: Path, artifacts_dir: Path, run_id: str, engine: str):
    from tests.conftest import smoke_config

    return smoke_config(
        root,
        **{
            "output.runs_dir": str(runs_dir),
            "output.artifacts_dir": str(artifacts_dir),
            "output.run_id": run_id,
            "engine.name": engine,
            "federation.rounds_per_task": ROUNDS_PER_TASK,
        },
    )


def main(argv: list[str]) -> None:
    from fedtail import pipeline, runs

    root, runs_dir, artifacts_dir, run_id, engine, mode = argv
    cfg = config(Path(root), Path(runs_dir), Path(artifacts_dir), run_id, engine)
    staged = pipeline.stage(cfg, Path(root))
    parts = pipeline.partition(cfg, staged, Path(root))
    run_dir = pipeline.new_run_dir(cfg, Path(root))
    pipeline.simulate(cfg, staged, parts, run_dir, mode=runs.Mode(mode), client_app=REF)


if __name__ == "__main__":
    main(sys.argv[1:])
