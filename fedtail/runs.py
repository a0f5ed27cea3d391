"""Run folders: ``<runs_dir>/<run-id>/``, claimed by one process at a time, deleted only if fedtail made them.

A run id is a plain name (never a path). A folder becomes a fedtail run when fedtail creates it and writes
the marker file ``.fedtail-run`` into it; ``--overwrite`` removes nothing without that marker. Writers hold
an exclusive lock on ``<runs_dir>/.locks/<run-id>.lock`` (``flock``: the kernel drops it when the process
dies, even on ``kill -9``, so a crash never leaves a stale lock), so two processes never write one run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from fedtail import config, io
from fedtail.config import ConfigError, FedtailConfig

MARKER = ".fedtail-run"
LOCKS = ".locks"


class Mode(StrEnum):
    """What to do with an existing run folder: refuse it, continue it, or replace it."""

    NEW = "new"
    RESUME = "resume"
    OVERWRITE = "overwrite"

    @classmethod
    def from_flags(cls, resume: bool, overwrite: bool) -> Mode:
        """``--resume`` / ``--overwrite`` (or the flow's parameters of the same names) as a mode."""
        if resume and overwrite:
            raise RunFolderError("resume and overwrite exclude each other: choose one")
        return cls.RESUME if resume else cls.OVERWRITE if overwrite else cls.NEW


class RunFolderError(ConfigError):
    """A run id or run folder that cannot be used as asked; the message says what to do instead."""


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is a plain folder name (`fedtail.config.check_run_id`'s rule), else RunFolderError."""
    try:
        return config.check_run_id(run_id)
    except ValueError as err:
        raise RunFolderError(f"{err} (it names a folder inside output.runs_dir, never a path)") from None


def new_run_id(cfg: FedtailConfig) -> str:
    """UTC time + config hash + 48 random bits: sortable, and distinct for runs started in the same second
    (24 bits collided for 1 in 30 sets of 1,000 ids)."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{cfg.fingerprint()[:8]}-{secrets.token_hex(6)}"


def run_path(runs_dir: Path, run_id: str) -> Path:
    """``runs_dir / run_id``, refusing ids that are paths and run folders that are symbolic links."""
    path = Path(runs_dir) / check_run_id(run_id)
    if path.is_symlink():
        raise RunFolderError(f"{path} is a symbolic link; fedtail writes runs only into real folders")
    return path


def is_run(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def finished(run_dir: Path) -> bool:
    """A run whose federation ended: ``metrics.json`` is the recorder's last write."""
    return is_run(run_dir) and (run_dir / "metrics.json").is_file()


def check_target(run_dir: Path, mode: Mode) -> None:
    """Refuse, before any work, what `claim` would refuse for lack of a marker or an existing folder."""
    run_dir = run_path(run_dir.parent, run_dir.name)
    exists = run_dir.exists() or run_dir.is_symlink()
    hint = f"--resume {run_dir.name} continues it, --overwrite replaces it, or choose another --run-id"
    if mode is Mode.NEW and exists:
        raise RunFolderError(f"run folder {run_dir} already exists: {hint}")
    if mode is Mode.RESUME and not is_run(run_dir):
        what = "does not exist" if not exists else f"is not a fedtail run (no {MARKER} marker)"
        raise RunFolderError(f"cannot resume {run_dir.name!r}: {run_dir} {what}")
    if mode is Mode.OVERWRITE and exists and not is_run(run_dir):
        raise RunFolderError(
            f"refusing to overwrite {run_dir}: it is not a folder fedtail created (no {MARKER} marker); "
            "fedtail only ever deletes its own run folders"
        )


@contextlib.contextmanager
def lock_run(run_dir: Path) -> Iterator[None]:
    """Exclusive, non-blocking: a second writer of the same run gets a clear error at once."""
    lock_file = run_dir.parent / LOCKS / f"{run_dir.name}.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunFolderError(
                f"run {run_dir.name!r} is being written by {holder}; wait for it or choose another --run-id"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()}\n")
        fh.flush()
        if is_run(run_dir):  # the sole writer now: a temp file of a killed writer is stale
            io.remove_stale_temps(run_dir)
        try:
            yield
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def claim(run_dir: Path, mode: Mode) -> Iterator[Path]:
    """Lock the run, then create it (new), empty it (overwrite) or keep it (resume); yields the folder.

    The checks of `check_target` are repeated under the lock, so a race between two starts is decided by
    the lock and the exclusive ``mkdir``, never by timing.
    """
    run_dir = run_path(Path(run_dir).parent, Path(run_dir).name)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with lock_run(run_dir):
        check_target(run_dir, mode)
        if mode is Mode.OVERWRITE and run_dir.exists():
            shutil.rmtree(run_dir)
        if mode is not Mode.RESUME:
            try:
                run_dir.mkdir()
            except FileExistsError:
                raise RunFolderError(f"{run_dir} appeared meanwhile; choose another --run-id") from None
            io.write_text(run_dir / MARKER, f"fedtail run {run_dir.name}\n")
        yield run_dir


def public_rows(rows: list[dict]) -> list[dict]:
    """Rows as the run's files and the UI show them: tasks numbered from 1, as the log and the report do
    (the code counts from 0; rounds are numbered from 1 already)."""
    return [{**row, "task": int(row["task"]) + 1} if "task" in row else row for row in rows]
