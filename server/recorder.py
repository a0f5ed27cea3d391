"""Everything a run writes into ``runs/<run-id>/``, atomically, plus the checkpoint that lets a crashed
run resume after its last completed round."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord

from fedtail import io
from fedtail.config import FedtailConfig
from fedtail.metrics import (
    average_incremental_accuracy,
    backward_transfer,
    final_average_accuracy,
    forgetting,
)
from fedtail.tasks import TaskSchedule

CHECKPOINT = "checkpoint"


def read_checkpoint_state(run_dir: Path, cfg: FedtailConfig) -> dict | None:
    """The checkpoint of ``run_dir`` if any; refuses one written under a different config."""
    state_file = Path(run_dir) / CHECKPOINT / "state.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    if state["config_fingerprint"] != cfg.experiment_fingerprint():
        raise ValueError(
            f"{run_dir}: its checkpoint was written with a different config; resume with the run's own "
            "config.yaml (fedtail run --resume RUN_ID) or choose a new output.run_id"
        )
    return state


class RunRecorder:
    """Accumulates per-round rows and the accuracy matrix; resumes from ``checkpoint/`` if present."""

    def __init__(self, run_dir: Path, cfg: FedtailConfig, schedule: TaskSchedule) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.schedule = schedule
        self.rows: list[dict] = []
        t = schedule.num_tasks
        self.acc_matrix = np.full((t, t), np.nan)
        self.tasks_done = 0
        self.arrays: ArrayRecord | None = None
        self._load_checkpoint()

    # ---- resume ---------------------------------------------------------------------------------
    def _load_checkpoint(self) -> None:
        state = read_checkpoint_state(self.run_dir, self.cfg)
        if state is None:
            return
        self.rows = state["rows"]
        self.acc_matrix = np.array(state["acc_matrix"], dtype=float)
        self.tasks_done = int(state["tasks_done"])
        weights = torch.load(self.run_dir / CHECKPOINT / "arrays.pt", weights_only=True)
        self.arrays = ArrayRecord(weights)

    @property
    def rounds_done(self) -> int:
        return len(self.rows)

    def rounds_done_in_task(self, task: int) -> int:
        return sum(1 for r in self.rows if r["task"] == task)

    # ---- recording ------------------------------------------------------------------------------
    def record_round(self, row: dict, arrays: ArrayRecord) -> None:
        self.rows.append(row)
        self.arrays = arrays
        self._write_rounds()
        self._checkpoint()

    def end_task(self, task: int, accuracies: list[float]) -> None:
        self.acc_matrix[task, : len(accuracies)] = accuracies
        self.tasks_done = task + 1
        self._checkpoint()
        self._write_matrix()

    def _checkpoint(self) -> None:
        ck = self.run_dir / CHECKPOINT
        if self.arrays is not None:
            state_dict = self.arrays.to_torch_state_dict()
            io.write_with(ck / "arrays.pt", lambda fh: torch.save(state_dict, fh))
        io.write_json(
            ck / "state.json",
            {
                "config_fingerprint": self.cfg.experiment_fingerprint(),
                "rows": self.rows,
                "acc_matrix": [[None if math.isnan(v) else v for v in r] for r in self.acc_matrix.tolist()],
                "tasks_done": self.tasks_done,
            },
        )

    def _write_rounds(self) -> None:
        frame = pd.DataFrame(self.rows)
        io.write_text(self.run_dir / "rounds.csv", frame.to_csv(index=False, float_format="%.6f"))

    def _write_matrix(self) -> None:
        t = self.schedule.num_tasks
        frame = pd.DataFrame(self.acc_matrix, columns=[f"task_{j}" for j in range(t)])
        frame.index.name = "after_task"
        io.write_text(self.run_dir / "accuracy_matrix.csv", frame.to_csv(float_format="%.6f"))

    # ---- final outputs --------------------------------------------------------------------------
    def finish(self, state_dict: dict, client_info: dict[int, dict]) -> dict:
        last = self.rows[-1]
        a = self.acc_matrix
        metrics = {
            "final_accuracy": last["accuracy"],
            "final_balanced_accuracy": last["balanced_accuracy"],
            "final_macro_f1": last["macro_f1"],
            "average_incremental_accuracy": average_incremental_accuracy(a),
            "final_average_accuracy": final_average_accuracy(a),
            "forgetting": forgetting(a),
            "backward_transfer": backward_transfer(a),
            "num_tasks": self.schedule.num_tasks,
            "rounds_per_task": self.cfg.federation.rounds_per_task,
            "num_clients": self.cfg.federation.num_clients,
            "dataset": self.cfg.dataset.name,
            "strategy": self.cfg.strategy.name,
            "objective": self.cfg.train.objective,
            "continual_method": self.cfg.continual.method,
        }
        metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
        io.write_with(self.run_dir / "model.pt", lambda fh: torch.save(state_dict, fh))
        rows = [{"partition_id": pid, **info} for pid, info in sorted(client_info.items())]
        io.write_text(self.run_dir / "clients.csv", pd.DataFrame(rows).to_csv(index=False))
        self._write_matrix()
        io.write_json(self.run_dir / "metrics.json", metrics)
        return metrics
