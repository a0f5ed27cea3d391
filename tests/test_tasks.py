"""Task schedule: a seeded partition of the classes into equal consecutive tasks."""

from __future__ import annotations

import numpy as np
import pytest

from fedtail.config import build_config
from fedtail.tasks import TaskSchedule, make_schedule, schedule_from_config


@pytest.mark.parametrize("cpt", [1, 2, 5, 10])
def test_tasks_partition_the_classes(cpt: int) -> None:
    s = make_schedule(10, cpt, shuffle=True, seed=3)
    assert s.num_tasks == 10 // cpt
    assert all(len(task) == cpt for task in s.tasks)
    assert sorted(c for task in s.tasks for c in task) == list(range(10))
    assert tuple(c for task in s.tasks for c in task) == s.class_order


def test_order_is_seeded() -> None:
    a = make_schedule(10, 2, shuffle=True, seed=7)
    assert a == make_schedule(10, 2, shuffle=True, seed=7)
    assert a.class_order != make_schedule(10, 2, shuffle=True, seed=8).class_order
    assert make_schedule(10, 2, shuffle=False, seed=7).class_order == tuple(range(10))


def test_single_task_when_none() -> None:
    s = make_schedule(6, None, shuffle=False, seed=0)
    assert s.num_tasks == 1
    assert s.tasks == ((0, 1, 2, 3, 4, 5),)
    assert s.seen_classes(0) == list(range(6))
    assert all(s.task_of(c) == 0 for c in range(6))


def test_seen_classes_and_task_of() -> None:
    s = TaskSchedule((3, 1, 0, 2), ((3, 1), (0, 2)))
    assert s.seen_classes(0) == [1, 3]
    assert s.seen_classes(1) == [0, 1, 2, 3]
    assert [s.task_of(c) for c in range(4)] == [1, 0, 1, 0]
    with pytest.raises(IndexError):
        s.seen_classes(2)
    with pytest.raises(KeyError):
        s.task_of(4)


@pytest.mark.parametrize("cpt", [3, 4, 11, 0])
def test_non_divisor_names_the_field(cpt: int) -> None:
    with pytest.raises(ValueError, match=r"tasks\.classes_per_task.*allowed: \[1, 2, 5, 10\]"):
        make_schedule(10, cpt, shuffle=True, seed=0)


def test_dict_round_trip_and_validation() -> None:
    s = make_schedule(10, 5, shuffle=True, seed=1)
    assert TaskSchedule.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="permutation"):
        TaskSchedule((0, 0, 1), ((0, 0), (1,)))
    with pytest.raises(ValueError, match="consecutive"):
        TaskSchedule((0, 1, 2, 3), ((0, 2), (1, 3)))
    with pytest.raises(ValueError, match="missing"):
        TaskSchedule.from_dict({"tasks": [[0]]})


def test_schedule_from_config() -> None:
    cfg = build_config({"seed": 5, "tasks": {"classes_per_task": 5, "shuffle_classes": True}})
    assert schedule_from_config(cfg) == make_schedule(cfg.num_classes, 5, shuffle=True, seed=5)
    assert schedule_from_config(cfg).num_tasks == cfg.num_tasks


def test_b_half_and_uneven_schedules() -> None:
    from fedtail.tasks import task_sizes

    assert task_sizes(10, 2) == [2, 2, 2, 2, 2]  # B0
    assert task_sizes(10, 1, first_task_classes=5) == [5, 1, 1, 1, 1, 1]  # B-half (B5 Inc1)
    assert task_sizes(10, None, first_task_classes=4) == [4, 6]
    assert task_sizes(10, 2, sizes=[3, 1, 6]) == [3, 1, 6]
    schedule = make_schedule(10, 1, shuffle=True, seed=3, first_task_classes=5)
    assert [len(t) for t in schedule.tasks] == [5, 1, 1, 1, 1, 1]
    assert sorted(schedule.class_order) == list(range(10))
    assert make_schedule(10, 2, True, 3).class_order == schedule.class_order  # same seeded order


@pytest.mark.parametrize(
    ("cpt", "first", "sizes", "message"),
    [
        (3, None, None, r"tasks.classes_per_task=3 must divide the 10 classes; allowed: \[1, 2, 5, 10\]"),
        (2, 5, None, r"must divide the 5 classes after the first task; allowed: \[1, 5\]"),
        (2, 11, None, r"tasks.first_task_classes=11; allowed: 1..10"),
        (2, None, [5, 4], r"tasks.sizes=\[5, 4\] must be positive class counts summing to the 10"),
        (2, 5, [5, 5], "tasks.sizes and tasks.first_task_classes both set"),
    ],
)
def test_bad_schedules_name_the_field(cpt, first, sizes, message: str) -> None:
    from fedtail.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=message):
        build_config({"tasks": {"classes_per_task": cpt, "first_task_classes": first, "sizes": sizes}})


def test_blurry_boundaries_bring_a_share_of_each_task_one_task_early() -> None:
    from fedtail.tasks import sample_tasks

    schedule = make_schedule(10, 2, shuffle=False, seed=0)  # tasks (0,1) (2,3) ... (8,9)
    labels = np.repeat(np.arange(10), 1000)
    assert (sample_tasks(labels, schedule, 0.0, seed=0) == labels // 2).all()
    which = sample_tasks(labels, schedule, 0.3, seed=0)
    own = labels // 2
    assert ((which == own) | (which == own - 1)).all()  # early by one task at most
    assert (which[own == 0] == 0).all()  # nothing comes before task 0
    for t in range(1, 5):
        assert abs((which[own == t] == t - 1).mean() - 0.3) < 0.03
    # per sample, whoever holds it: a client's subset draws exactly what the whole set draws
    subset = np.arange(3, 10_000, 7)
    got = sample_tasks(labels[subset], schedule, 0.3, seed=0, index=subset, size=labels.size)
    assert (got == which[subset]).all()
    assert not (sample_tasks(labels, schedule, 0.3, seed=1) == which).all()
