"""Everything a run writes into ``runs/<run-id>/``, atomically, plus the checkpoint that lets a crashed
run resume after its last completed round to exactly the result it would have had."""

from __future__ import annotations

import base64
import csv
import io as io_
import json
import math
import numbers
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedtail import io
from fedtail import protocol as P
from fedtail.config import ConfigError, FedtailConfig
from fedtail.metrics import (
    CLIENT_COLUMNS,
    average_incremental_accuracy,
    backward_transfer,
    final_average_accuracy,
    forgetting,
    task_forgetting,
)
from fedtail.models import to_state_dict
from fedtail.runs import public_rows
from fedtail.tasks import TaskSchedule

#: imbalance metrics of every round's row (rounds.csv), also reported as ``final_<name>`` in metrics.json
IMBALANCE_COLUMNS = (
    "g_mean",
    "head_accuracy",
    "medium_accuracy",
    "tail_accuracy",
    "ece",
    "auroc",
    "auprc",
    *CLIENT_COLUMNS,
)
CONTINUAL_COLUMNS = ("old_class_accuracy", "new_class_accuracy")
PSEUDO_LABEL_COLUMNS = ("pl_precision", "pl_used", "tail_pl_precision", "tail_pl_recall")
OPEN_WORLD_COLUMNS = ("seen_accuracy", "novel_accuracy", "all_accuracy")
"""Open-world runs (``partition.novel_classes``): `fedtail.metrics.open_world_accuracies`."""
"""The last round's pseudo-label summary (semi-supervised runs) that metrics.json repeats."""
"""Every round: accuracy on the earlier tasks' classes and on the current task's (`old_new_accuracies`)."""
TASK_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", *IMBALANCE_COLUMNS[:7], *CONTINUAL_COLUMNS)
"""What tasks.csv records of the end-of-task evaluation (the imbalance metrics per task)."""

TASKS_FILE = "tasks.csv"
CONFUSION_FILE = "confusion_matrix.csv"
ADJUSTED_CONFUSION_FILE = "confusion_matrix_adjusted.csv"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 3
# 1: one tensor per client state; 2: the states packed into one tensor; 3: rows and clients' info as JSON
READABLE_FORMATS = (1, 2, 3)


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
    written = state["config_fingerprint"]
    if written != cfg.experiment_fingerprint() and written not in cfg.legacy_experiment_fingerprints():
        raise CheckpointError(
            f"{run_dir}: its checkpoint was written with a different config; resume with the run's own "
            "config.yaml (fedtail run --resume RUN_ID) or choose a new output.run_id. A run of an older "
            "fedtail whose results this version does not reproduce (a revised dataset, or a default that "
            "changed: docs/architecture.md, 'Fingerprints') cannot resume; start it again"
        )
    return _normalised(state)


def _normalised(state: dict) -> dict:
    """Any readable format as format 3 reads: rows a list, client info and states dicts by client."""
    states = state["client_states"]
    if state["format"] == 3:
        rows = json_from_tensor(state["rows"])
        info = {int(pid): value for pid, value in json_from_tensor(state["client_info"])}
    else:
        rows, info = state["rows"], dict(state["client_info"])
    if "pids" in states:  # formats 2 and 3
        client_states = unpack_states(states)
    else:
        client_states = {pid: t.numpy().tobytes() for pid, t in states.items()}
    return {**state, "rows": rows, "client_info": info, "client_states": client_states}


def _finite_or_none(value: object) -> float | None:
    """A metric for metrics.json: NaN (e.g. no tail class in this split) is ``null``, not invalid JSON."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return {_BYTES_TAG: base64.b64encode(value).decode("ascii")}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def _json_object(obj: dict) -> object:
    return base64.b64decode(obj[_BYTES_TAG]) if set(obj) == {_BYTES_TAG} else obj


_BYTES_TAG = "$fedtail-bytes"


def json_tensor(value: object) -> torch.Tensor:
    """``value`` (numbers, strings, bytes, lists, dicts) as one uint8 tensor of JSON: pickling thousands
    of small Python objects into the checkpoint each round cost a Python callback per object, and floats
    survive JSON exactly (repr), NaN included."""
    return _bytes_tensor(json.dumps(value, default=_json_default).encode())


def json_from_tensor(tensor: torch.Tensor) -> object:
    return json.loads(tensor.numpy().tobytes(), object_hook=_json_object)


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


def _csv_field(value: object, float_format: str = "{:.6f}") -> str:
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return "" if math.isnan(value) else float_format.format(value)
    return str(value)


def csv_text(rows: list[dict], header: bool = True, float_format: str = "{:.6f}") -> str:
    """``pd.DataFrame(rows).to_csv(index=False, header=header, float_format="%.6f")`` for rows whose
    columns each hold one type (as the recorder's do): the same text (tested), at a fraction of the cost
    of building a frame for every round's row."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io_.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_field(row.get(c), float_format) for c in columns])
    return out.getvalue()


def confusion_csv(matrix: np.ndarray, labels: list[int]) -> str:
    """Rows: true class; columns ``pred_<class>``: test samples of the row's class predicted as it."""
    rows = [
        {"true": c, **{f"pred_{p}": int(v) for p, v in zip(labels, row, strict=True)}}
        for c, row in zip(labels, np.asarray(matrix).tolist(), strict=True)
    ]
    return csv_text(rows)


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
        self.task_arrays: ArrayRecord | None = None  # the model at the end of the last finished task
        self.task_head: dict[str, np.ndarray] = {}  # the continual method's head as of that task's end
        self.task_rows: list[dict] = []  # tasks.csv: one row per finished task
        self.client_info: dict[int, dict] = {}
        self.client_states: dict[int, bytes] = {}
        self.strategy_state: dict[str, object] = {}
        """The server strategy's own state as of the last recorded round (`FedtailStrategy.state_dict`)."""
        self.resumed = False
        self._csv_rows = 0  # rows of self.rows that rounds.csv holds, as written by this recorder
        self._fingerprint = cfg.experiment_fingerprint()
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
        task_arrays = state.get("task_arrays")
        self.task_arrays = None if task_arrays is None else ArrayRecord(task_arrays)
        self.task_head = {k: v.numpy() for k, v in state.get("task_head", {}).items()}
        self.task_rows = json_from_tensor(state["task_rows"]) if "task_rows" in state else []
        self.client_info = state["client_info"]
        self.client_states = state["client_states"]
        self.strategy_state = state.get("strategy_state", {})

    @property
    def rounds_done(self) -> int:
        return len(self.rows)

    def rounds_done_in_task(self, task: int, stage: str | None = None) -> int:
        """Rounds recorded for ``task`` (of one ``stage`` only, if given)."""
        return sum(1 for r in self.rows if r["task"] == task and stage in (None, r.get("stage", "fl")))

    # ---- recording ------------------------------------------------------------------------------
    def record_round(
        self, row: dict, arrays: ArrayRecord, strategy_state: dict[str, object] | None = None
    ) -> None:
        """Append ``row`` and checkpoint; ``client_info`` / ``client_states`` are this recorder's dicts, which
        the strategy fills in place (`server.app` hands them to it), so they are as of this round, as is
        ``strategy_state`` (the strategy's `state_dict` after the round's aggregation)."""
        self.rows.append(row)
        self.arrays = arrays
        if strategy_state is not None:
            self.strategy_state = strategy_state
        self._checkpoint()
        self._write_rounds()

    def end_task(
        self, task: int, result: dict, arrays: ArrayRecord, head: dict[str, np.ndarray] | None = None
    ) -> None:
        """Record the end-of-task evaluation ``result`` (`Evaluator.evaluate` over the tasks so far), the
        model ``arrays`` the task ended with (the next task's `task_arrays`) and the continual method's
        ``head`` (`task_head`)."""
        accuracies = result["task_accuracies"]
        self.acc_matrix[task, : len(accuracies)] = accuracies
        self.tasks_done = task + 1
        self.arrays = self.task_arrays = arrays  # what the next task starts from (after any server step)
        self.task_head = dict(head or {})
        info = [i for i in self.client_info.values() if P.MEMORY_SAMPLES in i]
        self.task_rows.append(
            {
                "task": task,
                "classes": " ".join(str(c) for c in self.schedule.tasks[task]),
                **{k: result.get(k, math.nan) for k in TASK_METRICS},
                "memory_samples": sum(int(i[P.MEMORY_SAMPLES]) for i in info),
                "memory_bytes": sum(int(i[P.MEMORY_BYTES]) for i in info),
                "max_client_memory_bytes": max((int(i[P.MEMORY_BYTES]) for i in info), default=0),
            }
        )
        self._checkpoint()
        self._write_matrix()
        self._write_tasks()

    def _checkpoint(self) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "config_fingerprint": self._fingerprint,
            "rows": json_tensor(self.rows),
            "acc_matrix": [[None if math.isnan(v) else v for v in r] for r in self.acc_matrix.tolist()],
            "tasks_done": self.tasks_done,
            "arrays": None if self.arrays is None else to_state_dict(self.arrays),
            "task_arrays": None if self.task_arrays is None else to_state_dict(self.task_arrays),
            "task_head": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.task_head.items()},
            "task_rows": json_tensor(self.task_rows),
            "client_info": json_tensor(sorted(self.client_info.items())),
            "client_states": pack_states(self.client_states),
            "strategy_state": self.strategy_state,
        }
        io.write_with(self.run_dir / CHECKPOINT, lambda fh: torch.save(state, fh))

    def _write_rounds(self) -> None:
        """Append the new rows to ``rounds.csv``; the first write of a recorder (a new run, or a resumed
        one, whose file may hold rows past the checkpoint or a half-written row) replaces the whole file
        atomically with the checkpoint's rows. Rewriting every row every round made long runs quadratic.
        """
        path = self.run_dir / "rounds.csv"
        new = self.rows[self._csv_rows :]
        columns = list(self.rows[0])
        if self._csv_rows == 0 or any(list(row) != columns for row in new) or not path.is_file():
            io.write_text(path, csv_text(public_rows(self.rows)))
        else:
            with open(path, "a") as fh:
                fh.write(csv_text(public_rows(new), header=False))
        self._csv_rows = len(self.rows)

    def _write_matrix(self) -> None:
        t = self.schedule.num_tasks
        rows = [
            {"after_task": i + 1, **{f"task_{j + 1}": float(v) for j, v in enumerate(row)}}
            for i, row in enumerate(self.acc_matrix.tolist())
        ]
        io.write_text(self.run_dir / "accuracy_matrix.csv", csv_text(rows) if t else "after_task\n")

    def _write_tasks(self) -> None:
        """tasks.csv: per finished task, its classes, the end-of-task metrics (imbalance ones included,
        over the classes seen by then), the clients' memory then, the task's accuracy now and its
        forgetting so far (best earlier accuracy minus now; empty for the newest task)."""
        now = self.acc_matrix[self.tasks_done - 1] if self.tasks_done else []
        forgot = task_forgetting(self.acc_matrix)
        rows = [
            {**row, "accuracy_now": float(now[row["task"]]), "forgetting": forgot[row["task"]]}
            for row in self.task_rows
        ]
        io.write_text(self.run_dir / TASKS_FILE, csv_text(public_rows(rows)))

    # ---- final outputs --------------------------------------------------------------------------
    def finish(self, state_dict: dict, final: dict | None = None) -> dict:
        """Write the final outputs; ``final`` is the evaluator's result for the final model over every
        seen class (its confusion matrices and per-client accuracies are written beside the metrics)."""
        last = self.rows[-1]
        if final is not None:  # the final model's own scores: a server step after the last round counts
            last = {**last, **{k: v for k, v in final.items() if isinstance(v, float)}}
        a = self.acc_matrix
        metrics = {
            "final_accuracy": last["accuracy"],
            "final_balanced_accuracy": last["balanced_accuracy"],
            "final_macro_f1": last["macro_f1"],
            **{f"final_{k}": _finite_or_none(last.get(k)) for k in (*IMBALANCE_COLUMNS, *CONTINUAL_COLUMNS)},
            **{f"final_{k}": _finite_or_none(v) for k, v in last.items() if k.startswith("adjusted_")},
            **{
                f"final_{k}": _finite_or_none(last[k])
                for k in (*PSEUDO_LABEL_COLUMNS, *OPEN_WORLD_COLUMNS)
                if k in last
            },
            "average_incremental_accuracy": average_incremental_accuracy(a),
            "final_average_accuracy": final_average_accuracy(a),
            "forgetting": forgetting(a),
            "backward_transfer": backward_transfer(a),
            "max_client_memory_bytes": max((r["max_client_memory_bytes"] for r in self.task_rows), default=0),
            "num_tasks": self.schedule.num_tasks,
        }  # numbers only: the settings are in config.yaml (and DVC's params), not among the metrics
        metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
        if self._csv_rows != len(self.rows):  # resumed after the last round's checkpoint: not written yet
            self._write_rounds()
        self._write_tasks()  # a kill after the last task's checkpoint left the previous tasks.csv
        io.write_with(self.run_dir / "model.pt", lambda fh: torch.save(state_dict, fh))
        per_client = (final or {}).get("client_accuracies")
        pids = sorted(self.client_info) if per_client is None else range(len(per_client))
        rows = [
            {
                "partition_id": pid,
                **({} if per_client is None else {"accuracy": float(per_client[pid])}),
                **{k: v for k, v in self.client_info.get(pid, {}).items() if k != P.PARTITION_ID},
            }
            for pid in pids
        ]
        io.write_text(self.run_dir / "clients.csv", csv_text(rows, float_format="{}"))
        seen = self.schedule.seen_classes(self.schedule.num_tasks - 1)
        for key, name in (("confusion", CONFUSION_FILE), ("adjusted_confusion", ADJUSTED_CONFUSION_FILE)):
            if final is not None and key in final:
                io.write_text(self.run_dir / name, confusion_csv(final[key], seen))
        self._write_matrix()
        io.write_json(self.run_dir / "metrics.json", metrics)
        return metrics
