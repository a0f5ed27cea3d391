"""DVC-versioned raw data and the normalised arrays staged from it.

``data/`` (``output.data_dir``) holds one folder of raw files per dataset and is tracked as a single DVC
output by ``data.dvc`` beside it. `ensure_raw` keeps the two in step:

* data present and matching ``data.dvc``: return at once (DVC's state database makes the check a few
  stat calls; no file is re-hashed unless its size, mtime or inode changed);
* data differing from ``data.dvc``: `DataIntegrityError` naming the files. Nothing is re-created
  silently: the user restores with ``dvc checkout data.dvc`` (local cache) or ``dvc pull data.dvc``;
* requested dataset missing: restore it from the DVC cache or the default remote if ``data.dvc`` has it,
  else materialize it from its source and record the new version with ``dvc add`` (+ ``dvc push``).

`stage` turns a dataset's raw folder into float32 train/test arrays under
``artifacts/staged/<name>-<key>/``, keyed by the data version and the dataset config.

Every DVC call runs under one file lock (``.dvc/tmp/fedtail-staging.lock``), and DVC's own repo lock is
waited for rather than failed on, so concurrent flows and a user's ``dvc`` commands serialise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from fedtail import io
from fedtail.datasets.base import DatasetSpec, Splits
from fedtail.registry import DATASETS

if TYPE_CHECKING:
    from dvc.output import Output
    from dvc.repo import Repo

    from fedtail.config import FedtailConfig

log = logging.getLogger(__name__)

REMOTE_NAME = "local"
REMOTE_DIR = ".dvcstore"  # <root>/.dvcstore, git-ignored
STAGED_FILES = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy")
_LOCK_FILE = "fedtail-staging.lock"
_MAX_LISTED = 10


class DataIntegrityError(RuntimeError):
    """``data/`` differs from ``data.dvc`` or cannot be brought back to it; never repaired silently."""


# ---- paths -----------------------------------------------------------------------------------------
def _data_dir(cfg: FedtailConfig, root: Path) -> Path:
    data_dir = io.under(root, cfg.output.data_dir)
    try:
        data_dir.resolve().relative_to(root.resolve())
    except ValueError:
        raise ValueError(
            f"output.data_dir={cfg.output.data_dir!r} must lie inside the project {str(root)!r}: "
            "DVC versions it from there"
        ) from None
    return data_dir


def _dvc_file(data_dir: Path) -> Path:
    return data_dir.with_name(data_dir.name + ".dvc")


def _recorded_md5(dvc_file: Path) -> str:
    if not dvc_file.is_file():
        return ""
    doc = yaml.safe_load(dvc_file.read_text()) or {}
    outs = doc.get("outs") or [{}]
    return str(outs[0].get("md5", "")).removesuffix(".dir")


def data_md5(root: Path, data_dir: str = "data") -> str:
    """The md5 of the whole data folder recorded in ``data.dvc`` (without DVC's ``.dir`` suffix).

    A cheap cache key for everything derived from the raw data; ``""`` while the data is not versioned.
    """
    return _recorded_md5(_dvc_file(io.under(Path(root), data_dir)))


# ---- locking and DVC handles -----------------------------------------------------------------------
@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive across processes and threads (each call opens its own file description)."""
    lock_dir = root / ".dvc" / "tmp"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / _LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _require_dvc(root: Path) -> None:
    if not (root / ".dvc").is_dir():
        raise RuntimeError(
            f"{str(root)!r} is not a DVC project (no .dvc/): after the first git commit run `dvc init` "
            "there, or fedtail.staging.init_dvc(root), which also sets up the default remote"
        )


def _open_repo(root: Path) -> Repo:
    from dvc.repo import Repo

    # Wait on DVC's repo lock like `dvc --wait-for-lock` instead of failing after 3 s.
    repo = Repo(str(root), _wait_for_lock=True)
    repo.scm_context.quiet = True  # we log what to commit ourselves; DVC would print to stdout
    return repo


def _tracked(repo: Repo, dvc_file: Path) -> Output:
    """The one output of ``data.dvc``, loaded fresh (an Output caches nothing about the workspace)."""
    (out,) = repo.stage.load_one(str(dvc_file)).outs
    return out


def _matches(out: Output) -> bool:
    """Workspace hash == recorded hash; DVC's state db skips files whose size/mtime/inode are unchanged."""
    return bool(out.exists) and not out.changed_checksum()


def _has_remote(repo: Repo) -> bool:
    return bool(repo.config["core"].get("remote"))


# ---- raw data --------------------------------------------------------------------------------------
def _expected_files(spec: DatasetSpec, cfg: FedtailConfig) -> list[str] | None:
    """A dataset module may define ``raw_files(dataset_cfg)`` when its raw files depend on the config."""
    hook = getattr(sys.modules.get(getattr(spec.materialize, "__module__", "")), "raw_files", None)
    return list(hook(cfg.dataset)) if callable(hook) else None


def _complete(spec: DatasetSpec, cfg: FedtailConfig, raw: Path) -> bool:
    if not raw.is_dir():
        return False
    files = _expected_files(spec, cfg)
    return any(raw.iterdir()) if files is None else all((raw / f).is_file() for f in files)


def _materialize(spec: DatasetSpec, cfg: FedtailConfig, root: Path, raw: Path) -> None:
    """Write into a temp folder first, then move the files in: a crash never leaves a half-written file."""
    log.info("materializing %s from %s into %s", spec.name, spec.source or "its source", raw)
    tmp_parent = root / ".dvc" / "tmp"
    tmp_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"materialize-{spec.name}-", dir=tmp_parent))
    try:
        spec.materialize(cfg.dataset, tmp)
        for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
            dest = raw / src.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(src, dest)  # a rename when .dvc/tmp and data/ share a file system
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _changes(out: Output) -> dict[str, list[str]] | None:
    """Per-file differences data/ vs data.dvc; None when the recorded listing is not in the cache."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.diff import diff

    old = out.get_obj()
    if old is None:
        return None
    new = None
    if out.exists:
        _, _, new = build(out.cache, out.fs_path, out.fs, out.hash_name, ignore=out.dvcignore, dry_run=True)
    result = diff(old, new, out.cache)
    top = Path(out.fs_path).name
    paths: dict[str, list[str]] = {}
    for kind in ("modified", "added", "deleted"):
        keys = ((change.new.key or change.old.key) for change in getattr(result, kind))
        paths[kind] = sorted("/".join((top, *key)) for key in keys if any(key))  # skip the folder itself
    return paths


def _describe(changes: dict[str, list[str]] | None) -> str:
    if changes is None:
        return "  (the file list of the recorded version is not in the local DVC cache)"
    lines = [f"  {kind}: {path}" for kind, paths in changes.items() for path in paths]
    more = len(lines) - _MAX_LISTED
    return "\n".join(lines[:_MAX_LISTED] + ([f"  ... and {more} more"] if more > 0 else []))


def _restore(repo: Repo, dvc_file: Path) -> bool:
    """Check data/ out of the DVC cache, fetching from the default remote first if needed.

    Returns False, touching nothing, when the objects are in neither: DVC 3.67's checkout deletes the
    whole output folder when it fails on missing cache objects, so it only runs once the cache is complete.
    """
    from dvc.exceptions import DvcException

    if _tracked(repo, dvc_file).changed_cache():
        if not _has_remote(repo):
            return False
        try:
            repo.fetch(targets=[str(dvc_file)])
        except DvcException as err:
            log.warning("dvc fetch %s failed: %s", dvc_file.name, err)
        if _tracked(repo, dvc_file).changed_cache():
            return False
    log.info("restoring %s from the DVC cache", dvc_file.name)
    repo.checkout(targets=[str(dvc_file)])
    return True


def _record(repo: Repo, data_dir: Path, dvc_file: Path, why: str) -> None:
    """``dvc add`` the data folder, push it to the default remote, and say that data.dvc must be committed."""
    from dvc.exceptions import DvcException

    repo.add(str(data_dir))
    md5 = _recorded_md5(dvc_file)
    log.warning(
        "%s: recorded a new data version in %s (md5 %s); commit it: git add %s .gitignore && git commit",
        why,
        dvc_file.name,
        md5,
        dvc_file.name,
    )
    if _has_remote(repo):
        try:
            repo.push(targets=[str(dvc_file)])
        except DvcException as err:
            log.warning(
                "dvc push failed (%s): run `dvc push %s` once the remote is reachable", err, dvc_file.name
            )


def _ensure_raw(cfg: FedtailConfig, root: Path) -> Path:
    spec = DATASETS.get(cfg.dataset.name)
    data_dir = _data_dir(cfg, root)
    dvc_file = _dvc_file(data_dir)
    raw = data_dir / spec.name
    rel = os.path.relpath(dvc_file, root)
    with _open_repo(root) as repo:
        if not dvc_file.is_file():
            if not _complete(spec, cfg, raw):
                _materialize(spec, cfg, root, raw)
            _record(repo, data_dir, dvc_file, f"{rel} did not exist")
            return raw

        if not (data_dir.is_dir() and any(data_dir.iterdir())) and not _restore(repo, dvc_file):
            # Fresh clone, nothing in cache or remote: regenerate; only byte-identical data is accepted.
            _materialize(spec, cfg, root, raw)
            if not _matches(_tracked(repo, dvc_file)):
                shutil.rmtree(raw)  # leave data/ as found, so a retry after `dvc pull` starts clean
                with contextlib.suppress(OSError):
                    data_dir.rmdir()
                raise DataIntegrityError(
                    f"{spec.name} was regenerated from its source, but {data_dir.name}/ does not match "
                    f"the version recorded in {rel} (md5 {_recorded_md5(dvc_file)}), which holds data "
                    f"this machine cannot recreate. Run `dvc pull {rel}` to fetch it from the remote."
                )
            repo.commit(str(dvc_file), force=True)  # fill the local cache so `dvc checkout` works later
            return raw

        out = _tracked(repo, dvc_file)
        if _matches(out):
            if not _complete(spec, cfg, raw):
                _materialize(spec, cfg, root, raw)
                _record(repo, data_dir, dvc_file, f"dataset {spec.name!r} was not in {rel}")
            return raw

        changes = _changes(out)
        only_deleted = changes is not None and not changes["modified"] and not changes["added"]
        if only_deleted and not _complete(spec, cfg, raw):
            if _restore(repo, dvc_file) and _matches(_tracked(repo, dvc_file)):
                return raw
            raise DataIntegrityError(
                f"{spec.name} is recorded in {rel} but missing from {data_dir.name}/ and not in the DVC "
                f"cache or remote:\n{_describe(changes)}\nRun `dvc pull {rel}` from the remote that holds it."
            )
        raise DataIntegrityError(
            f"{data_dir.name}/ does not match the version recorded in {rel}:\n{_describe(changes)}\n"
            f"Restore it with `dvc checkout {rel}` (from the local DVC cache) or `dvc pull {rel}` (from the "
            f"remote); if the change is intended, record it with `dvc add {data_dir.name}` and commit "
            f"{rel}. fedtail never re-stages raw data silently."
        )


def ensure_raw(cfg: FedtailConfig, root: Path = Path(".")) -> Path:
    """``root/data/<name>``, checked against ``data.dvc`` and restored or created as needed."""
    root = Path(root)
    _require_dvc(root)
    with _locked(root):
        return _ensure_raw(cfg, root)


# ---- staged arrays ---------------------------------------------------------------------------------
def _stage_key(md5: str, cfg: FedtailConfig) -> str:
    """Data version + the dataset fields that shape the arrays (not where torchvision files live)."""
    section = cfg.dataset.model_dump(mode="json", exclude={"root", "download"})
    blob = json.dumps({"data_md5": md5, "dataset": section}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def stage(cfg: FedtailConfig, root: Path = Path(".")) -> Path:
    """`ensure_raw`, then write normalised splits to ``<artifacts>/staged/<name>-<key>/`` (idempotent)."""
    root = Path(root)
    spec = DATASETS.get(cfg.dataset.name)
    _require_dvc(root)
    with _locked(root):
        raw = _ensure_raw(cfg, root)
        md5 = _recorded_md5(_dvc_file(_data_dir(cfg, root)))
        key = _stage_key(md5, cfg)
        out = io.under(root, cfg.output.artifacts_dir) / "staged" / f"{spec.name}-{key}"
        meta_path = out / "meta.json"
        if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
            return out
        splits = spec.load(cfg.dataset, raw)
        with io.atomic_dir(out) as tmp:
            arrays = (splits.x_train, splits.y_train, splits.x_test, splits.y_test)
            for name, array in zip(STAGED_FILES, arrays, strict=True):
                io.write_npy(tmp / name, array)
            io.write_json(
                tmp / "meta.json",
                {
                    "name": spec.name,
                    "key": key,
                    "num_classes": spec.num_classes,
                    "input_shape": list(spec.input_shape),
                    "sizes": {"train": len(splits.y_train), "test": len(splits.y_test)},
                    "data_md5": md5,
                    "source": spec.source,
                    "dataset": cfg.dataset.model_dump(mode="json"),
                },
            )
    log.info("staged %s into %s", spec.name, out)
    return out


def staged_meta(staged_dir: Path) -> dict[str, Any]:
    return json.loads((Path(staged_dir) / "meta.json").read_text())


def load_staged(staged_dir: Path, mmap: bool = True) -> Splits:
    """The staged splits; memory-mapped read-only by default so client processes share the pages."""
    mode = "r" if mmap else None
    arrays = [np.load(Path(staged_dir) / name, mmap_mode=mode) for name in STAGED_FILES]
    return Splits(*arrays)


# ---- DVC set-up ------------------------------------------------------------------------------------
def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)


def init_dvc(root: Path) -> None:
    """``dvc init`` a git repo (≥ 1 commit) and add the default remote ``local`` at ``<root>/.dvcstore``.

    Idempotent: an existing ``.dvc/``, a remote named ``local`` or another default remote are kept.
    """
    from dvc.config_schema import RelPath
    from dvc.repo import Repo

    root = Path(root).resolve()
    top = _git(root, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise RuntimeError(f"{str(root)!r} is not a git repository: run `git init` and commit once first")
    if _git(root, "rev-parse", "--verify", "-q", "HEAD").returncode != 0:
        raise RuntimeError(f"{str(root)!r} has no commit yet: DVC needs at least one (git commit first)")
    if not (root / ".dvc").is_dir():
        Repo.init(str(root), subdir=Path(top.stdout.strip()).resolve() != root).close()
    with Repo(str(root)) as repo:
        conf = repo.config.read("repo")
        if REMOTE_NAME not in conf.get("remote", {}) or not conf.get("core", {}).get("remote"):
            with repo.config.edit("repo") as edit:
                # RelPath makes DVC store the url relative to .dvc/ ("../.dvcstore"): clones stay portable.
                edit["remote"].setdefault(REMOTE_NAME, {"url": RelPath(str(root / REMOTE_DIR))})
                edit["core"].setdefault("remote", REMOTE_NAME)
    gitignore = root / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
    if not {f"/{REMOTE_DIR}/", f"/{REMOTE_DIR}", f"{REMOTE_DIR}/", REMOTE_DIR} & {s.strip() for s in lines}:
        io.write_text(gitignore, "\n".join([*lines, f"/{REMOTE_DIR}/"]) + "\n")
