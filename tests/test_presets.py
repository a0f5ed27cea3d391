"""Every preset in configs/ says what it demonstrates and runs: one round of each task, in-process.

(What each learns with its own rounds is measured in its comment; one round is too early to ask.)"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fedtail.config import load_config
from tests.conftest import REPO

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def test_every_preset_says_what_it_demonstrates() -> None:
    assert PRESETS
    for path in PRESETS:
        assert path.read_text().startswith("# "), f"{path.name}: start with a comment saying what it shows"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_each_preset_runs_one_round_per_task(project: Path, preset: Path) -> None:
    from fedtail import pipeline
    from fedtail.staging import add_data

    overrides = {
        "output.data_dir": str(project / "data"),
        "output.artifacts_dir": str(project / "artifacts"),
        "output.runs_dir": str(project / "runs"),
        "output.run_id": f"preset-{preset.stem}",
        "federation.rounds_per_task": 1,
    }
    cfg = load_config(preset, overrides)
    add_data(cfg, project)  # versions the preset's dataset in the test project if it is not yet
    staged = pipeline.stage(cfg, project)
    parts = pipeline.partition(cfg, staged, project)
    run_dir = pipeline.simulate(cfg, staged, parts, pipeline.new_run_dir(cfg, project))
    rows = list(csv.DictReader((run_dir / "rounds.csv").open()))
    assert len(rows) == cfg.num_tasks and all(0 <= float(r["balanced_accuracy"]) <= 1 for r in rows)
    assert (run_dir / "metrics.json").is_file()
