"""Class-incremental task schedule: which classes each task introduces.

The schedule is data, not code: it is written next to the partition (``schedule.json``) so that the
server, the clients and the evaluation all read the same class order.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def make_schedule(num_classes: int, classes_per_task: int | None, shuffle: bool, seed: int) -> TaskSchedule:
    """Seeded class order cut into tasks of ``classes_per_task`` (``None``: one task with every class)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    cpt = num_classes if classes_per_task is None else classes_per_task
    if cpt < 1 or cpt > num_classes or num_classes % cpt:
        divisors = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
        raise ValueError(
            f"tasks.classes_per_task={classes_per_task} must divide the {num_classes} classes; "
            f"allowed: {divisors} or null (one task)"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_classes) if shuffle else np.arange(num_classes)
    classes = tuple(int(c) for c in order)
    tasks = tuple(classes[i : i + cpt] for i in range(0, num_classes, cpt))
    return TaskSchedule(classes, tasks)


def schedule_from_config(cfg: FedtailConfig) -> TaskSchedule:
    """The schedule a config describes: dataset class count, ``tasks.*`` and the run seed."""
    return make_schedule(cfg.num_classes, cfg.tasks.classes_per_task, cfg.tasks.shuffle_classes, cfg.seed)
