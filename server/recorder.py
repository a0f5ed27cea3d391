"""Everything a run writes into ``runs/<run-id>/``, atomically, plus the checkpoint that lets a crashed
run resume after its last completed round to exactly the result it would have had."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord

from fedtail import io
from fedtail.config import ConfigError, FedtailConfig
from fedtail.metrics import (
    average_incremental_accuracy,
    backward_transfer,
    final_average_accuracy,
    forgetting,
)
from fedtail.tasks import TaskSchedule

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)  # 1: one tensor per client state; 2: the states packed into one tensor


_UNUSABLE = "fedtail never writes such a file itself; restore it, or start the run again with --overwrite"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed: unreadable, of another format, or of another experiment."""


def read_checkpoint(run_dir: Path, cfg: FedtailConfig) -> dict | None:
    """The checkpoint of ``run_dir`` if any; refuses one written under a different experiment config."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        first = str(err).split(". ")[0]
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {first}); {_UNUSABLE}") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path} is not a fedtail checkpoint (format {CHECKPOINT_FORMAT}); {_UNUSABLE}")
    if state["config_fingerprint"] != cfg.experiment_fingerprint():
        raise CheckpointError(
            f"{run_dir}: its checkpoint was written with a different config; resume with the run's own "
            "config.yaml (fedtail run --resume RUN_ID) or choose a new output.run_id"
        )
    return state


def _bytes_tensor(blob: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy())


def pack_states(states: dict[int, bytes]) -> dict[str, torch.Tensor]:
    """Every client's serialised state in three tensors (ids, sizes, bytes): saving one tensor per
    client made each round's checkpoint cost grow with the clients that ever trained."""
    pids = sorted(states)
    return {
        "pids": torch.tensor(pids, dtype=torch.int64),
        "sizes": torch.tensor([len(states[p]) for p in pids], dtype=torch.int64),
        "bytes": _bytes_tensor(b"".join(states[p] for p in pids)),
    }


def unpack_states(packed: dict[str, torch.Tensor]) -> dict[int, bytes]:
    blob = packed["bytes"].numpy().tobytes()
    ends = np.cumsum(packed["sizes"].numpy())
    starts = ends - packed["sizes"].numpy()
    pids = packed["pids"].tolist()
    return {pid: blob[a:b] for pid, a, b in zip(pids, starts.tolist(), ends.tolist(), strict=True)}


class RunRecorder:
    """Accumulates per-round rows and the accuracy matrix; resumes from the checkpoint if present.

    The checkpoint is one file written atomically (model, rows, accuracy matrix, clients' info and
    persistent state together): a kill at any instant leaves the previous round's or the new one.
    """

    def __init__(self, run_dir: Path, cfg: FedtailConfig, schedule: TaskSchedule) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.schedule = schedule
        self.rows: list[dict] = []
        t = schedule.num_tasks
        self.acc_matrix = np.full((t, t), np.nan)
        self.tasks_done = 0
        self.arrays: ArrayRecord | None = None
        self.client_info: dict[int, dict] = {}
        self.client_states: dict[int, bytes] = {}
        self.resumed = False
        self._csv_rows = 0  # rows of self.rows that rounds.csv holds, as written by this recorder
        self._load_checkpoint()

    # ---- resume ---------------------------------------------------------------------------------
    def _load_checkpoint(self) -> None:
        state = read_checkpoint(self.run_dir, self.cfg)
        if state is None:
            return
        self.resumed = True
        self.rows = state["rows"]
        self.acc_matrix = np.array(state["acc_matrix"], dtype=float)
        self.tasks_done = int(state["tasks_done"])
        self.arrays = None if state["arrays"] is None else ArrayRecord(state["arrays"])
        self.client_info = dict(state["client_info"])
        states = state["client_states"]
        if "pids" in states:  # format 2
            self.client_states = unpack_states(states)
        else:
            self.client_states = {pid: t.numpy().tobytes() for pid, t in states.items()}

    @property
    def rounds_done(self) -> int:
        return len(self.rows)

    def rounds_done_in_task(self, task: int) -> int:
        return sum(1 for r in self.rows if r["task"] == task)

    # ---- recording ------------------------------------------------------------------------------
    def record_round(self, row: dict, arrays: ArrayRecord) -> None:
        """Append ``row`` and checkpoint; ``client_info`` / ``client_states`` are this recorder's dicts, which
        the strategy fills in place (`server.app` hands them to it), so they are as of this round."""
        self.rows.append(row)
        self.arrays = arrays
        self._checkpoint()
        self._write_rounds()

    def end_task(self, task: int, accuracies: list[float]) -> None:
        self.acc_matrix[task, : len(accuracies)] = accuracies
        self.tasks_done = task + 1
        self._checkpoint()
        self._write_matrix()

    def _checkpoint(self) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "config_fingerprint": self.cfg.experiment_fingerprint(),
            "rows": self.rows,
            "acc_matrix": [[None if math.isnan(v) else v for v in r] for r in self.acc_matrix.tolist()],
            "tasks_done": self.tasks_done,
            "arrays": None if self.arrays is None else self.arrays.to_torch_state_dict(),
            "client_info": self.client_info,
            "client_states": pack_states(self.client_states),
        }
        io.write_with(self.run_dir / CHECKPOINT, lambda fh: torch.save(state, fh))

    def _write_rounds(self) -> None:
        """Append the new rows to ``rounds.csv``; the first write of a recorder (a new run, or a resumed
        one, whose file may hold rows past the checkpoint or a half-written row) replaces the whole file
        atomically with the checkpoint's rows. Rewriting every row every round made long runs quadratic.
        """
        path = self.run_dir / "rounds.csv"
        new = self.rows[self._csv_rows :]
        same_columns = all(list(row) == list(self.rows[0]) for row in new)
        if self._csv_rows == 0 or not same_columns or not path.is_file():
            io.write_text(path, pd.DataFrame(self.rows).to_csv(index=False, float_format="%.6f"))
        else:
            text = pd.DataFrame(new).to_csv(index=False, header=False, float_format="%.6f")
            with open(path, "a") as fh:
                fh.write(text)
        self._csv_rows = len(self.rows)

    def _write_matrix(self) -> None:
        t = self.schedule.num_tasks
        frame = pd.DataFrame(self.acc_matrix, columns=[f"task_{j}" for j in range(t)])
        frame.index.name = "after_task"
        io.write_text(self.run_dir / "accuracy_matrix.csv", frame.to_csv(float_format="%.6f"))

    # ---- final outputs --------------------------------------------------------------------------
    def finish(self, state_dict: dict) -> dict:
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
        rows = [{"partition_id": pid, **info} for pid, info in sorted(self.client_info.items())]
        io.write_text(self.run_dir / "clients.csv", pd.DataFrame(rows).to_csv(index=False))
        self._write_matrix()
        io.write_json(self.run_dir / "metrics.json", metrics)
        return metrics
