"""Errors of the machine fedtail runs on, as opposed to errors in its input (`fedtail.config.ConfigError`)
or its data (`fedtail.staging.DataIntegrityError`): a full disk, a file-size limit, a read-only folder, a
Prefect API that does not answer. The CLI prints each as one ``fedtail:`` line and exits 1."""

from __future__ import annotations

import errno
import os
import resource

WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "the file would exceed the file-size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
"""Why a write fails that no retry fixes: the user has to free space or change a limit or a permission."""


class EnvironmentProblem(RuntimeError):
    """The machine or a service fedtail needs fails it; the message says what to change."""


class RunError(RuntimeError):
    """A run that cannot go on because of what happened in it (every client update of a round failed or
    diverged); the message says which clients, why, and the setting to change."""


class WriteError(OSError):
    """Writing one of fedtail's own files failed (``filename``: the file meant, not its temp file)."""

    def __str__(self) -> str:
        return describe_write_error(self)


def is_write_error(err: BaseException) -> bool:
    """An OSError that says the disk, a limit or a permission stops a write (`WRITE_ERRNOS`)."""
    return isinstance(err, OSError) and err.errno in WRITE_ERRNOS


def _file_size_limit() -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft / 2**20:.1f} MiB"


def describe_write_error(err: OSError) -> str:
    """``cannot write <file>: <why>; <what to do>`` for an error of `WRITE_ERRNOS`."""
    where = f"cannot write {err.filename}" if err.filename else "a write failed"
    why = WRITE_ERRNOS.get(err.errno or 0, err.strerror or "error")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space"
    elif err.errno == errno.EFBIG:
        why += f" (ulimit -f: {_file_size_limit()})"
        fix = "raise the limit (`ulimit -f unlimited`)"
    else:
        fix = f"make {os.path.dirname(str(err.filename)) or 'the folder'} writable or choose another folder"
    return f"{where}: {why}; {fix}"
