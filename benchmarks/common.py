"""What the benchmark scripts share: the plain-FL workload they time, the config of a run inside a
throw-away project, and that project (git + DVC, with the data versions a benchmark needs recorded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedtail.config import FedtailConfig, load_config  # noqa: E402
from fedtail.staging import add_data, init_dvc  # noqa: E402

# Plain FL (one task with every class), FedAvg, CE, 2 epochs, SGD, batch 32; IID client split without a
# long tail so that even 1,000 digits clients each get data.
BASE = {
    "tasks.classes_per_task": None,
    "train.epochs": 2,
    "partition.method": "iid",
    "partition.imbalance_factor": 1.0,
    "engine.device": "cpu",
}


def config(root: Path, overrides: dict) -> FedtailConfig:
    """params.yaml with ``overrides``, every output inside ``root``."""
    return load_config(
        REPO / "params.yaml",
        {
            **overrides,
            "output.data_dir": str(root / "data"),
            "output.artifacts_dir": str(root / "artifacts"),
            "output.runs_dir": str(root / "runs"),
        },
    )


def make_project(tmp: Path, *datasets: dict) -> Path:
    """A throw-away git+DVC project at ``tmp`` with digits and each of ``datasets`` (dataset overrides,
    e.g. mnist1d with 70,000 samples) recorded as data versions."""

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp, check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "--allow-empty", "-m", "init")
    init_dvc(tmp)
    for overrides in ({}, *datasets):
        add_data(config(tmp, overrides), tmp)
    return tmp
