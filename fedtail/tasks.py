"""Class-incremental task schedule: which classes each task introduces.

The schedule is data, not code: it is written next to the partition (``schedule.json``) so that the
server, the clients and the evaluation all read the same class order.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig


@dataclass(frozen=True)
class TaskSchedule:
    """Classes in presentation order, cut into consecutive, equally sized tasks.

    ``tasks`` concatenated equals ``class_order``, and ``class_order`` is a permutation of
    ``0..C-1``; both are checked on construction so a hand-edited ``schedule.json`` cannot
    silently drop or repeat a class.
    """

    class_order: tuple[int, ...]
    tasks: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        order = tuple(int(c) for c in self.class_order)
        tasks = tuple(tuple(int(c) for c in task) for task in self.tasks)
        object.__setattr__(self, "class_order", order)
        object.__setattr__(self, "tasks", tasks)
        if not order:
            raise ValueError("a task schedule needs at least one class")
        if sorted(order) != list(range(len(order))):
            raise ValueError(f"class_order must be a permutation of 0..{len(order) - 1}; got {list(order)}")
        if not tasks or any(not task for task in tasks):
            raise ValueError(f"every task needs at least one class; got {[list(t) for t in tasks]}")
        flat = tuple(c for task in tasks for c in task)
        if flat != order:
            raise ValueError(
                f"tasks {[list(t) for t in tasks]} must be consecutive chunks of class_order {list(order)}"
            )

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    def _check_task(self, t: int) -> None:
        if not 0 <= t < self.num_tasks:
            raise IndexError(f"task {t} out of range; the schedule has tasks 0..{self.num_tasks - 1}")

    def seen_classes(self, t: int) -> list[int]:
        """Sorted classes introduced by tasks ``0..t``: the label space evaluated after task ``t``."""
        self._check_task(t)
        return sorted(c for task in self.tasks[: t + 1] for c in task)

    def task_of(self, class_id: int) -> int:
        """Index of the task that introduces ``class_id``."""
        for t, task in enumerate(self.tasks):
            if class_id in task:
                return t
        raise KeyError(f"class {class_id} is not in the schedule (classes 0..{self.num_classes - 1})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists of ints) for ``schedule.json``."""
        return {"class_order": list(self.class_order), "tasks": [list(task) for task in self.tasks]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSchedule:
        """Inverse of `to_dict`; validates like the constructor."""
        try:
            order, tasks = data["class_order"], data["tasks"]
        except KeyError as err:
            raise ValueError(f"task schedule is missing the key {err.args[0]!r}") from None
        return cls(tuple(order), tuple(tuple(task) for task in tasks))


def task_sizes(
    num_classes: int,
    classes_per_task: int | None,
    first_task_classes: int | None = None,
    sizes: Sequence[int] | None = None,
) -> list[int]:
    """How many classes each task introduces, from the three ways to say it (PyCIL's ``init_cls`` /
    ``increment``): ``sizes`` explicitly (uneven tasks); else a first task of ``first_task_classes``
    (B-half: half the classes) followed by tasks of ``classes_per_task``; else equal tasks of
    ``classes_per_task`` (B0; ``None``: one task). Raises ValueError naming the field and what it allows."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    if sizes is not None:
        if first_task_classes is not None:
            raise ValueError("tasks.sizes and tasks.first_task_classes both set; allowed: one of them")
        if not sizes or min(sizes) < 1 or sum(sizes) != num_classes:
            raise ValueError(
                f"tasks.sizes={list(sizes)} must be positive class counts summing to the {num_classes} "
                "classes; allowed: e.g. " + str([num_classes // 2, num_classes - num_classes // 2])
            )
        return [int(s) for s in sizes]
    first = 0 if first_task_classes is None else first_task_classes
    if not 0 <= first <= num_classes:
        raise ValueError(f"tasks.first_task_classes={first_task_classes}; allowed: 1..{num_classes} or null")
    rest = num_classes - first
    if classes_per_task is None:
        return [first, rest] if first and rest else [num_classes]
    if classes_per_task < 1 or rest % classes_per_task or (not rest and not first):
        divisors = [d for d in range(1, rest + 1) if rest % d == 0]
        what = f"the {num_classes} classes" if not first else f"the {rest} classes after the first task"
        raise ValueError(
            f"tasks.classes_per_task={classes_per_task} must divide {what}; allowed: {divisors} or null"
            + (" (one task)" if not first else " (one task after the first)")
        )
    return ([first] if first else []) + [classes_per_task] * (rest // classes_per_task)


def make_schedule(
    num_classes: int,
    classes_per_task: int | None,
    shuffle: bool,
    seed: int,
    first_task_classes: int | None = None,
    sizes: Sequence[int] | None = None,
) -> TaskSchedule:
    """Seeded class order cut into consecutive tasks of `task_sizes`."""
    cuts = np.cumsum([0, *task_sizes(num_classes, classes_per_task, first_task_classes, sizes)])
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_classes) if shuffle else np.arange(num_classes)
    classes = tuple(int(c) for c in order)
    tasks = tuple(classes[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True))
    return TaskSchedule(classes, tasks)


def client_participation(
    num_clients: int, num_tasks: int, late_join_fraction: float, skip_fraction: float, seed: int
) -> np.ndarray:
    """Which client takes part in which task (clients x tasks, bool), seeded: a ``late_join_fraction`` of
    the clients joins at a task drawn uniformly from 1..T-1 instead of task 0, and after joining each
    client misses each later task with probability ``skip_fraction``. A client that is absent from a task
    neither trains in it nor receives that task's data. Every task keeps at least one client (if a draw
    leaves one empty, its lowest-drawn client is put back)."""
    rng = np.random.default_rng([seed, 0xA7, num_clients, num_tasks])
    first = np.zeros(num_clients, dtype=np.int64)
    if num_tasks > 1:
        late = rng.random(num_clients) < late_join_fraction
        first[late] = rng.integers(1, num_tasks, size=int(late.sum()))
    tasks = np.arange(num_tasks)
    present = tasks[None, :] >= first[:, None]
    skipped = rng.random((num_clients, num_tasks)) < skip_fraction
    present &= ~(skipped & (tasks[None, :] > first[:, None]))
    order = rng.permutation(num_clients)
    for t in np.flatnonzero(~present.any(axis=0)):
        present[order[0], t] = True
    return present


@functools.lru_cache(maxsize=4)
def _uniform_draws(seed: int, size: int) -> np.ndarray:
    """One U(0, 1) draw per training sample, fixed by the seed (computed once per process)."""
    return np.random.default_rng([seed, 0xB1, size]).random(size)


def sample_tasks(
    labels: np.ndarray,
    schedule: TaskSchedule,
    blurry: float,
    seed: int,
    index: np.ndarray | None = None,
    size: int | None = None,
) -> np.ndarray:
    """The task in which each training sample is presented: its class's task, except that a ``blurry``
    share of every later task's samples comes one task early (blurry task boundaries, as in the
    "Blurry" class-incremental setting of Aljundi et al. 2019 and Koh et al. 2022). Seeded per sample:
    ``index`` (positions in the staged training set) makes the draw the same whichever client holds the
    sample; ``labels`` are the samples' labels, ``size`` the training set's (default: ``len(labels)``)."""
    class_task = np.zeros(schedule.num_classes, dtype=np.int64)
    for t, classes in enumerate(schedule.tasks):
        class_task[list(classes)] = t
    task = class_task[np.asarray(labels, dtype=np.int64)]
    if blurry <= 0:
        return task
    index = np.arange(len(task)) if index is None else np.asarray(index, dtype=np.int64)
    u = _uniform_draws(seed, len(task) if size is None else size)[index]
    return np.where((task > 0) & (u < blurry), task - 1, task)


def schedule_from_config(cfg: FedtailConfig) -> TaskSchedule:
    """The schedule a config describes: dataset class count, ``tasks.*`` and the run seed."""
    t = cfg.tasks
    return make_schedule(
        cfg.num_classes, t.classes_per_task, t.shuffle_classes, cfg.seed, t.first_task_classes, t.sizes
    )
