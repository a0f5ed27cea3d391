"""Per-client arrival: clients that join at a later task or miss tasks train only in the tasks they take
part in, and never keep data of a task they missed."""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import numpy as np
import pytest

from clients.continual.memory import update_memory
from clients.local import ClientData
from fedtail.config import ConfigError, build_config
from fedtail.models import build_model
from fedtail.tasks import client_participation
from strategies.base import sample_partitions
from tests.conftest import local_context, smoke_config, smoke_run


def test_everyone_takes_part_by_default() -> None:
    assert client_participation(6, 4, 0.0, 0.0, seed=0).all()


def test_late_joiners_miss_the_tasks_before_theirs_and_skips_come_after_joining() -> None:
    p = client_participation(200, 5, late_join_fraction=0.5, skip_fraction=0.3, seed=1)
    first = p.argmax(axis=1)
    assert 0.35 < (first > 0).mean() < 0.65  # about half join late
    for k in range(200):
        assert not p[k, : first[k]].any()  # nothing before joining
        assert p[k, first[k]]
    after = [p[k, t] for k in range(200) for t in range(first[k] + 1, 5)]
    assert 0.6 < np.mean(after) < 0.8  # each later task missed with probability 0.3
    assert (p == client_participation(200, 5, 0.5, 0.3, seed=1)).all()  # seeded
    assert not (p == client_participation(200, 5, 0.5, 0.3, seed=2)).all()


def test_no_task_is_left_without_clients() -> None:
    p = client_participation(2, 6, late_join_fraction=1.0, skip_fraction=0.9, seed=3)
    assert p.any(axis=0).all()


def test_sampling_draws_among_the_present_clients_only() -> None:
    present = [1, 4, 6, 9]
    pids = sample_partitions(10, 0.5, 1, seed=0, global_round=3, present=present)
    assert len(pids) == 2 and set(pids) <= set(present)
    assert sample_partitions(10, 0.5, 1, 0, 3) == sample_partitions(10, 0.5, 1, 0, 3, None)


@pytest.mark.parametrize("field", ["late_join_fraction", "skip_fraction"])
def test_fractions_are_checked(field: str) -> None:
    with pytest.raises(ConfigError, match=f"tasks.{field}"):
        build_config({"tasks": {field: 1.5}})
    with pytest.raises(ConfigError, match="tasks.skip_fraction"):
        build_config({"tasks": {"skip_fraction": 1.0}})  # a client must take part somewhere


def test_memory_never_holds_a_task_the_client_missed() -> None:
    y = np.repeat(np.arange(6), 10)
    data = ClientData(np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32), y, np.zeros((0, 4)))
    cfg = build_config({"continual": {"method": "replay", "options": {"memory_size": 20}}})
    ctx = local_context(
        cfg,
        build_model("mlp", (4,), 10, 8, 0),
        data=data,
        task=2,
        task_classes=[4, 5],
        seen_classes=[0, 1, 2, 3, 4, 5],
        held_classes=[0, 1, 4, 5],  # missed the task of classes 2, 3
        previous_model_fn=lambda: build_model("mlp", (4,), 10, 8, 1),
    )
    memory, added = update_memory(ctx, 20, "random")
    assert added == [0, 1] and set(memory.labels.tolist()) == {0, 1}


def test_clients_train_only_in_the_tasks_they_take_part_in(project: Path) -> None:
    options = {
        "federation.num_clients": 6,
        "tasks.classes_per_task": 2,
        "tasks.late_join_fraction": 0.5,
        "tasks.skip_fraction": 0.3,
        "continual.method": "replay",
    }
    run_dir, _ = smoke_run(project, "arrival", **options)
    present = smoke_config(project, **options).participation()
    assert not present.all()
    with open(run_dir / "clients.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and any(row["tasks-seen"] for row in rows)
    for row in rows:
        seen = ast.literal_eval(row["tasks-seen"]) if row["tasks-seen"] else []
        assert all(present[int(row["partition_id"]), t] for t in seen), row


def test_a_blurry_run_trains_the_next_tasks_leaked_samples(project: Path) -> None:
    """With replay's objective on the seen classes, a leaked sample of the next task's class still
    counts (its logit is not hidden), so training stays finite and differs from the crisp run."""
    options = {"tasks.classes_per_task": 2, "continual.method": "replay"}
    crisp_dir, crisp = smoke_run(project, "crisp", **options)
    blurry_dir, blurry = smoke_run(project, "blurry", **options, **{"tasks.blurry": 0.4})
    with open(blurry_dir / "rounds.csv", newline="") as fh:
        losses = [float(r["train_loss"]) for r in csv.DictReader(fh)]
    assert all(np.isfinite(losses)) and max(losses) < 100
    assert blurry["final_accuracy"] != crisp["final_accuracy"] or blurry["forgetting"] != crisp["forgetting"]
