"""`dvc repro` on a fresh copy of the project (no data/, no artifacts, no DVC cache) reproduces the
committed runs/dvc/metrics.json byte for byte."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, git

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


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


def test_dvc_repro_reproduces_committed_metrics(tmp_path: Path) -> None:
    expected = REPO / "runs" / "dvc" / "metrics.json"
    assert expected.is_file(), "runs/dvc/metrics.json must be committed (run `dvc repro` and commit it)"
    clone = _fresh_copy(tmp_path / "clone")
    assert not (clone / "data").exists() and not (clone / ".dvc" / "cache").exists()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "repro"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (clone / "runs/dvc/metrics.json").read_bytes() == expected.read_bytes()
    assert (clone / "runs/dvc/rounds.csv").read_bytes() == (REPO / "runs/dvc/rounds.csv").read_bytes()
    metrics = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "metrics", "show", "--json"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "final_balanced_accuracy" in metrics.stdout
    # the raw data was regenerated from its embedded source and verified against data.dvc, unchanged
    assert git(clone, "status", "--porcelain", "data.dvc") == ""
    # every stage's outputs (staged arrays, partitions, model, metrics) hash as recorded in dvc.lock
    # (code the stages depend on changed? run `dvc repro` and commit dvc.lock with it)
    assert git(clone, "status", "--porcelain", "dvc.lock") == "", git(clone, "diff", "dvc.lock")
