"""`dvc repro` on a fresh copy of the project (no data/, no artifacts, no DVC cache) reproduces the
committed results, as promised in docs/architecture.md ("Reproducibility contract"):

* data (data.dvc) and the data stages' outputs (staged arrays, partitions) hash exactly as recorded, on
  any machine: they are integer and exactly rounded IEEE work;
* the simulation's results (metrics.json, rounds.csv, accuracy_matrix.csv) agree with the committed ones
  within `TOLERANCE` on any machine (CPUs differ in the last bits of float sums), and byte for byte when
  the same machine runs the stage twice.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, git

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

TOLERANCE = 1e-4
"""Absolute, on every number of the float results. Last-bit drift between CPUs stays near 1e-7 here; a
real change of code or data moves them by far more (one test sample is 2e-3 of digits' accuracy)."""
FLOAT_RESULTS = ("metrics.json", "rounds.csv", "accuracy_matrix.csv")
RUN_HEADER = ("config.yaml", "schedule.json", "partition_stats.csv")
"""Copies of the config and the partition in runs/dvc/: exact on any machine, hashed in dvc.lock."""
DATA_STAGES = ("stage", "partition")
RUN = "runs/dvc/"


def _fresh_copy(dst: Path) -> Path:
    """What a clone would hold: tracked files plus untracked ones git does not ignore."""
    files = git(REPO, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    git(dst, "init", "-q")
    git(dst, "add", "-A")
    git(dst, "commit", "-q", "-m", "fresh clone")
    return dst


def _dvc(clone: Path, *args: str) -> str:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([str(bin_dir / "dvc"), *args], cwd=clone, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _values(path: Path) -> list[tuple[str, object]]:
    """Every field of a results file as (where, value); numbers as float, anything else as text."""
    if path.suffix == ".json":
        items = sorted(json.loads(path.read_text()).items())
    else:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        items = [(f"{rows[0][j]}@{i}", v) for i, row in enumerate(rows) for j, v in enumerate(row)]

    def parse(v: object) -> object:
        try:
            return float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return v

    return [(k, parse(v)) for k, v in items]


def assert_close(got: Path, want: Path) -> None:
    a, b = _values(got), _values(want)
    assert [k for k, _ in a] == [k for k, _ in b], f"{got.name}: fields or rows differ"
    for (key, x), (_, y) in zip(a, b, strict=True):
        if isinstance(x, float) and isinstance(y, float):
            assert math.isclose(x, y, rel_tol=0, abs_tol=TOLERANCE), f"{got.name} {key}: {x} vs {y}"
        else:
            assert x == y, f"{got.name} {key}: {x!r} vs {y!r}"


def _lock_without_float_hashes(path: Path) -> dict:
    """dvc.lock minus the hashes of the float results and what is drawn from them (report, plots)."""
    lock = yaml.safe_load(path.read_text())
    for entry in lock["stages"].values():
        for item in [*entry.get("deps", []), *entry.get("outs", [])]:
            if item["path"].startswith(RUN) and item["path"].removeprefix(RUN) not in RUN_HEADER:
                for key in ("md5", "size", "nfiles"):
                    item.pop(key, None)
    return lock


def test_lock_promises_only_what_is_checked() -> None:
    """Every hash in dvc.lock is one the repro test checks exactly (code, params, data stages) or a file
    derived from the float results it compares with `TOLERANCE`. A model file's bytes are no promise."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    run_outs = {o["path"] for entry in lock["stages"].values() for o in entry.get("outs", [])}
    run_outs = {p.removeprefix(RUN) for p in run_outs if p.startswith(RUN)}
    assert run_outs <= {*FLOAT_RESULTS, *RUN_HEADER, "report.md", "plots"}, sorted(run_outs)


def test_dvc_repro_reproduces_committed_results(tmp_path: Path) -> None:
    for name in FLOAT_RESULTS:
        assert (REPO / RUN / name).is_file(), f"{RUN}{name} must be committed (run `dvc repro` and commit it)"
    clone = _fresh_copy(tmp_path / "clone")
    assert not (clone / "data").exists() and not (clone / ".dvc" / "cache").exists()
    _dvc(clone, "repro")  # as a user would; the run header is not committed, so the simulation runs
    assert (clone / RUN / "model.pt").is_file(), "dvc repro on a fresh clone must run the simulation"

    # Data: regenerated from its embedded source, verified against data.dvc, which is left unchanged.
    assert git(clone, "status", "--porcelain", "data.dvc") == ""
    committed, fresh = (
        yaml.safe_load(p.read_text())["stages"] for p in (REPO / "dvc.lock", clone / "dvc.lock")
    )
    for stage in DATA_STAGES:  # exact on every machine: staged arrays and partitions hash as recorded
        assert fresh[stage] == committed[stage], f"dvc.lock stage {stage!r} differs: {git(clone, 'diff')}"
    # Code, params and the run header as recorded (else: run `dvc repro`, commit dvc.lock and runs/dvc/).
    assert _lock_without_float_hashes(clone / "dvc.lock") == _lock_without_float_hashes(REPO / "dvc.lock"), (
        git(clone, "diff", "dvc.lock")
    )
    # Float results: within TOLERANCE of the committed ones on any machine.
    for name in FLOAT_RESULTS:
        assert_close(clone / RUN / name, REPO / RUN / name)
    assert "final_balanced_accuracy" in _dvc(clone, "metrics", "show", "--json")

    # Same machine, same inputs: byte for byte, model included.
    first = {name: (clone / RUN / name).read_bytes() for name in (*FLOAT_RESULTS, "model.pt")}
    _dvc(clone, "repro", "--force", "--single-item", "simulate")
    assert {name: (clone / RUN / name).read_bytes() for name in first} == first


def test_assert_close_tolerates_last_digits_only(tmp_path: Path) -> None:
    want = REPO / RUN / "metrics.json"
    metrics = json.loads(want.read_text())
    for delta, ok in ((TOLERANCE / 10, True), (TOLERANCE * 10, False)):
        got = tmp_path / "metrics.json"
        got.write_text(json.dumps({**metrics, "final_accuracy": metrics["final_accuracy"] + delta}))
        if ok:
            assert_close(got, want)
        else:
            with pytest.raises(AssertionError, match="final_accuracy"):
                assert_close(got, want)
