"""A fedtail run to be stopped by a real signal, forked from a process that imported everything once.

`run` is a `multiprocessing` target for the ``forkserver`` context with this module preloaded: the
forkserver imports torch, Flower and every plug-in once, and each run is a fork of it that starts in
milliseconds, so a test can SIGTERM or SIGKILL a run of every registered plug-in without paying seconds
of imports per process. Nothing here starts a thread or touches torch's thread pools before the fork.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

import clients.app  # noqa: F401  (the ClientApp the in-process engine loads)
import server.app  # noqa: F401
from fedtail import pipeline, runs
from fedtail.registry import ADJUSTMENTS, CONTINUAL, OBJECTIVES, PARTITIONERS, STRATEGIES

for _registry in (ADJUSTMENTS, CONTINUAL, OBJECTIVES, PARTITIONERS, STRATEGIES):
    _registry.names()  # imports every plug-in module here, before the fork


def run(root: str, overrides: dict[str, Any], mode: str, round_delay: float, threads: int) -> None:
    """Simulate the smoke config with ``overrides`` into ``output.runs_dir``/``output.run_id`` (``mode``:
    new or resume), sleeping ``round_delay`` after each round. SIGTERM stops it as it stops `fedtail
    run` (KeyboardInterrupt, exit 130)."""
    from tests.conftest import smoke_config

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    torch.set_num_threads(threads)  # as in the process that runs the reference
    cfg = smoke_config(Path(root), **overrides)
    staged = pipeline.stage(cfg, Path(root))
    parts = pipeline.partition(cfg, staged, Path(root))
    try:
        pipeline.simulate(
            cfg,
            staged,
            parts,
            pipeline.new_run_dir(cfg, Path(root)),
            on_round=lambda row: time.sleep(round_delay),
            mode=runs.Mode(mode),
        )
    except KeyboardInterrupt:
        sys.exit(130)
