"""Terminal progress of a federation: a live rich bar on a terminal, plain log lines elsewhere.

On a terminal the bar shows task t/T, round r/R, rounds done, elapsed time and ETA, and the latest
balanced accuracy and training loss; the per-round log lines still reach their other handlers (the
Prefect UI's run log, files) but not the terminal, where the bar replaces them. Anywhere else (a pipe,
``dvc exp run``, a CI log) nothing changes: one plain line per round, no escape codes.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any, TextIO

ROUND_RECORD = "fedtail_round"
"""``extra`` flag on a per-round log record: terminal handlers drop it while the bar shows the round."""


def round_description(row: dict[str, Any], num_tasks: int, rounds_per_task: int) -> str:
    """``task t/T round r/R`` (1-based, as the log lines), with ``(cRT)`` for a classifier round."""
    stage = " (cRT)" if row.get("stage") == "crt" else ""
    return f"task {int(row['task']) + 1}/{num_tasks} round {int(row['round'])}/{rounds_per_task}{stage}"


def _metrics_text(row: dict[str, Any]) -> str:
    loss = float(row.get("train_loss", math.nan))
    return f"bal_acc {float(row['balanced_accuracy']):.4f}  loss {loss:.4f}"


class _DropRoundLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, ROUND_RECORD, False)


def _terminal_handlers(stream: TextIO) -> list[logging.Handler]:
    """Every handler that prints to the terminal ``stream`` is on (stdout and stderr: a bar on one and
    lines on the other would interleave on the same screen)."""
    terminals = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__, stream)}
    found = []
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if (
                isinstance(handler, logging.StreamHandler)
                and id(getattr(handler, "stream", None)) in terminals
            ):
                found.append(handler)
    return found


class RoundProgress:
    """``update(row)`` after every round. Use as a context manager; ``enabled=None`` means "on a
    terminal" (``stream.isatty()``)."""

    def __init__(
        self, total_rounds: int, num_tasks: int, rounds_per_task: int, enabled: bool | None = None,
        stream: TextIO | None = None,
    ) -> None:  # fmt: skip
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.num_tasks, self.rounds_per_task = total_rounds, num_tasks, rounds_per_task
        self._progress = None
        self._task = None
        self._filtered: list[logging.Handler] = []
        self._filter = _DropRoundLines()

    def __enter__(self) -> RoundProgress:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("rounds"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=Console(file=self.stream),
        )
        self._progress.start()
        self._task = self._progress.add_task("starting", total=self.total, completed=0, metrics="")
        self._filtered = _terminal_handlers(self.stream)
        for handler in self._filtered:
            handler.addFilter(self._filter)
        return self

    def update(self, row: dict[str, Any]) -> None:
        if self._progress is None:
            return
        self._progress.update(
            self._task,
            completed=min(int(row["global_round"]), self.total),
            description=round_description(row, self.num_tasks, self.rounds_per_task),
            metrics=_metrics_text(row),
        )

    def __exit__(self, *exc: object) -> None:
        for handler in self._filtered:
            handler.removeFilter(self._filter)
        if self._progress is not None:
            self._progress.stop()
