"""fedtail's own errors inside a Prefect flow: one line for the user, not Prefect's tracebacks.

Errors fedtail raises on purpose (bad config or run folder, data not as recorded, a full disk) carry a
message that says what to do. Raised inside a task, Prefect logged each one at ERROR with a traceback,
twice (the task, then the flow), before the CLI printed the message. Here the flow body returns a Failed
state whose message is that line (the UI shows it as the run's state), the CLI prints it once, and
`QuietExpected` drops Prefect's records about the task that raised it. Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from prefect.states import Failed

from fedtail.config import ConfigError
from fedtail.errors import EnvironmentProblem, RunError, describe_write_error, is_write_error
from fedtail.staging import DataIntegrityError

EXPECTED: tuple[type[BaseException], ...] = (ConfigError, DataIntegrityError, EnvironmentProblem, RunError)
"""fedtail's own error classes (RunFolderError, CheckpointError, ... subclass ConfigError)."""

F = TypeVar("F", bound=Callable[..., Any])


def is_expected(err: BaseException) -> bool:
    """One of `EXPECTED`, or a write the disk, a limit or a permission stopped."""
    return isinstance(err, EXPECTED) or is_write_error(err)


def message_of(err: BaseException) -> str:
    return describe_write_error(err) if isinstance(err, OSError) else str(err)


class QuietExpected(logging.Filter):
    """Drops Prefect's ERROR records about a task run that raised an expected error: the record with the
    traceback, then that run's ``Finished in state Failed(...)``. The task's state keeps the message."""

    def __init__(self) -> None:
        super().__init__()
        self.quiet: deque[object] = deque(maxlen=64)  # task run ids whose expected error was dropped

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        run_id = getattr(record, "task_run_id", None)
        err = record.exc_info[1] if record.exc_info else None
        if err is not None and is_expected(err):
            self.quiet.append(run_id)
            return False
        return not (run_id is not None and run_id in self.quiet)


_FILTER = QuietExpected()


def fails_cleanly(fn: F) -> F:
    """For a flow's function: an expected error ends the run as ``Failed(message=<its line>)``; calling
    the flow still raises it (Prefect raises a Failed state's exception), so the CLI prints that line."""
    task_runs = logging.getLogger("prefect.task_runs")
    if _FILTER not in task_runs.filters:
        task_runs.addFilter(_FILTER)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if not is_expected(err):
                raise
            return Failed(message=message_of(err), data=err)

    return run  # type: ignore[return-value]
