"""Atomic file writes: every output is written to a temp file in the same folder, then renamed.

A crash leaves either the old file or the new one, never half of one. A write the disk, a file-size limit
or a permission stops raises `fedtail.errors.WriteError` naming the file meant (not its temp file).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedtail.errors import WriteError, is_write_error


def under(root: str | os.PathLike[str], sub: str | os.PathLike[str]) -> Path:
    """``sub`` if absolute, else ``root / sub``: how every configured output folder is resolved."""
    path = Path(sub)
    return path if path.is_absolute() else Path(root) / path


@contextlib.contextmanager
def _naming(target: Path) -> Iterator[None]:
    """Re-raise a write error (disk full, ...) as a `WriteError` of ``target``; the writers (torch.save,
    PIL) report it without a file name, or with the temp file's."""
    try:
        yield
    except OSError as err:
        if not is_write_error(err) or isinstance(err, WriteError):
            raise
        raise WriteError(err.errno, err.strerror, str(target)) from err


TEMP_FILE = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")
"""The name `atomic_path` gives its temp file: ``.<target>.<8 random characters>.tmp`` (mkstemp)."""


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files `atomic_path` left under ``folder`` when its process was killed mid-write
    (SIGKILL runs no clean-up). Only for a folder nobody writes now (its run lock held); returns them."""
    stale = [p for p in Path(folder).rglob(".*.tmp") if p.is_file() and TEMP_FILE.fullmatch(p.name)]
    for path in stale:
        path.unlink()
    return stale


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` if the block succeeds."""
    target = Path(path)
    with _naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared like any file
        try:
            yield Path(tmp)
            os.replace(tmp, target)
        except Exception as err:
            interrupt = _interrupt_behind(err)
            if interrupt is None:
                raise
            raise interrupt from None  # Ctrl-C / SIGTERM stopped the write: an interrupt, not a failure
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _interrupt_behind(err: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt a writer turned into another error while it unwound (torch.save's zip
    writer raises ``RuntimeError: unexpected pos`` when Ctrl-C or SIGTERM lands inside it), if any."""
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        if isinstance(node, KeyboardInterrupt):
            return node
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` whole (else it is removed)."""
    target = Path(path)
    with _naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            try:
                yield tmp
            except WriteError as err:  # a file of the temp folder: name it as it would be in ``target``
                if not str(err.filename).startswith(f"{tmp}{os.sep}"):
                    raise
                name = target / Path(err.filename).relative_to(tmp)
                raise WriteError(err.errno, err.strerror, str(name)) from err
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Save one array as ``.npy`` (byte-stable for equal arrays, unlike ``np.savez``'s zip stamps)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
    return Path(path)


def write_with(path: str | os.PathLike[str], writer: Callable[[BinaryIO], None]) -> Path:
    """Atomically write through ``writer(fh)`` (torch.save, matplotlib savefig, ...)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer(fh)
    return Path(path)
