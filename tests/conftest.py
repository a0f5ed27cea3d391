"""Shared fixtures: a throw-away project root (git + DVC) with the digits data staged once."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import fedtail  # noqa: F401  (applies the offline env defaults before Prefect/DVC/Flower import)
from fedtail.config import FedtailConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def git(root: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    out = subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True, text=True)
    return out.stdout


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repo with DVC initialised and a local remote, as a fresh clone would have."""
    from fedtail.staging import init_dvc

    root = tmp_path_factory.mktemp("project")
    git(root, "init", "-q")
    (root / "README.md").write_text("test project\n")
    git(root, "add", "README.md")
    git(root, "commit", "-q", "-m", "init")
    init_dvc(root)
    return root


def smoke_config(root: Path, **overrides) -> FedtailConfig:
    """configs/smoke.yaml with every output under ``root``."""
    base = {
        "output.data_dir": str(root / "data"),
        "output.artifacts_dir": str(root / "artifacts"),
        "output.runs_dir": str(root / "runs"),
    }
    return load_config(REPO / "configs" / "smoke.yaml", {**base, **overrides})
