"""DVC-versioned raw data and the normalised arrays staged from it.

``data/`` (``output.data_dir``) holds one folder of raw files per dataset. ``data.dvc`` beside it records
one DVC output per raw file of every *versioned dataset variant* (e.g. ``data/digits/images.npy``,
``data/mnist1d/x_n6000.npy``), so each dataset is checked on its own: a run on digits never depends on
the bytes of mnist1d. Versions change only through `add_data` (``fedtail data add``); running
never rewrites ``data.dvc``. `ensure_raw` keeps the configured dataset's files in step with it:

* files present and matching ``data.dvc``: return at once (DVC's state database makes the check a few
  stat calls; no file is re-hashed unless its size, mtime or inode changed);
* files differing from ``data.dvc``: `DataIntegrityError` naming them and a fix that loses nothing for
  the situation at hand (recorded version in the DVC cache, in the remote, or nowhere); never repaired
  silently;
* files missing: checked out of the DVC cache (fetched from the default remote first if needed), else
  regenerated from the dataset's embedded source and accepted only if every file matches its md5;
* dataset (variant) not in ``data.dvc``: `DataIntegrityError` naming the ``fedtail data add`` command.

`stage` turns a dataset's raw files into float32 train/test arrays under
``artifacts/staged/<name>-<key>/``, keyed by the dataset's data version and config, with the sha256 of
each array in ``meta.json``: a staged folder whose files no longer match is rebuilt by `stage` and
refused by `load_staged` (checked once per process and file state, not per call).

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
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from fedtail import io
from fedtail.config import ConfigError, with_data_revision
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
DIGESTS_KEY = "sha256"  # meta.json / DONE field: {file name: sha256 of its bytes}
_LOCK_FILE = "fedtail-staging.lock"


class DataIntegrityError(RuntimeError):
    """Data differs from its recorded version, is not versioned, or cannot be restored; never repaired
    silently."""


# ---- file digests, verified once per file state ----------------------------------------------------
_verified: dict[str, tuple] = {}


def file_digests(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """``{name: sha256}`` of files in ``folder``: the manifest written beside staged arrays and partitions."""
    digests = {}
    for name in names:
        with open(Path(folder) / name, "rb") as fh:
            digests[name] = hashlib.file_digest(fh, "sha256").hexdigest()
    return digests


def _stat_signature(folder: Path, names: Iterable[str]) -> tuple:
    stats = [(Path(folder) / n).stat() for n in names]
    return tuple((n, s.st_size, s.st_mtime_ns, s.st_ino) for n, s in zip(names, stats, strict=True))


def manifest_problems(folder: Path, recorded: dict[str, str]) -> list[str]:
    """Files of ``recorded`` that are missing or whose sha256 differs, e.g. ``['x_train.npy (modified)']``.

    Hot paths (every client process loads its data each round) pay for hashing once: a folder that passed
    is remembered with the size, mtime and inode of its files and not hashed again until one changes.
    """
    folder = Path(folder).resolve()
    names = sorted(recorded)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        return [f"{n} (missing)" for n in missing]
    key = str(folder)
    signature = _stat_signature(folder, names)
    if _verified.get(key) == signature:
        return []
    actual = file_digests(folder, names)
    bad = [f"{n} (modified or truncated)" for n in names if actual[n] != recorded[n]]
    if not bad:
        _verified[key] = signature
    return bad


# ---- paths -----------------------------------------------------------------------------------------
def _data_dir(cfg: FedtailConfig, root: Path) -> Path:
    data_dir = io.under(root, cfg.output.data_dir)
    try:
        data_dir.resolve().relative_to(root.resolve())
    except ValueError:
        raise ConfigError(
            f"output.data_dir={cfg.output.data_dir!r} must lie inside the project {str(root)!r}: "
            "DVC versions it from there"
        ) from None
    return data_dir


def _dvc_file(data_dir: Path) -> Path:
    return data_dir.with_name(data_dir.name + ".dvc")


def dvc_file_of(cfg: FedtailConfig, root: Path = Path(".")) -> Path:
    """The ``.dvc`` file that versions ``output.data_dir`` (``data.dvc`` by default)."""
    return _dvc_file(_data_dir(cfg, Path(root)))


def _raw_names(spec: DatasetSpec, cfg: FedtailConfig) -> list[str]:
    """The raw files of this dataset variant, from the dataset module's ``raw_files(dataset_cfg)``."""
    hook = getattr(sys.modules.get(getattr(spec.materialize, "__module__", "")), "raw_files", None)
    if not callable(hook):
        raise TypeError(f"dataset plug-in {spec.name!r} must define raw_files(dataset_cfg) in its module")
    return list(hook(cfg.dataset))


def _variant_files(cfg: FedtailConfig, root: Path) -> tuple[Path, dict[str, Path]]:
    """``data.dvc`` and ``{output path as written in data.dvc: file}`` for the configured dataset."""
    spec = DATASETS.get(cfg.dataset.name)
    data_dir = _data_dir(cfg, root)
    dvc_file = _dvc_file(data_dir)
    raw = data_dir / spec.name
    files = {
        Path(os.path.relpath(raw / n, dvc_file.parent)).as_posix(): raw / n for n in _raw_names(spec, cfg)
    }
    return dvc_file, files


def _invalid_dvc_file(dvc_file: Path, problem: str) -> DataIntegrityError:
    """A ``data.dvc`` that neither fedtail nor DVC can read, with the two ways back."""
    return DataIntegrityError(
        f"{dvc_file} is not a valid DVC file: {problem}. If it was edited by hand, restore the committed "
        f"version with `git checkout {dvc_file}`, or delete it and record each dataset again with "
        "`fedtail data add DATASET`"
    )


def _recorded(dvc_file: Path) -> dict[str, str]:
    """``{output path: md5}`` of every output recorded in ``data.dvc`` (read as YAML: no DVC import);
    a file of another shape is refused here, before any work, instead of in DVC's tracebacks."""
    if not dvc_file.is_file():
        return {}
    try:
        doc = yaml.safe_load(dvc_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise _invalid_dvc_file(dvc_file, "not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise _invalid_dvc_file(
            dvc_file, f"{where}invalid YAML ({getattr(err, 'problem', None) or err})"
        ) from None
    outs = (doc or {}).get("outs") if isinstance(doc, dict) or doc is None else doc
    if not isinstance(doc, dict | None) or not isinstance(outs, list | None):
        raise _invalid_dvc_file(dvc_file, "expected a mapping with a list of outs:")
    recorded = {}
    for i, out in enumerate(outs or []):
        if not isinstance(out, dict) or not isinstance(out.get("path"), str):
            raise _invalid_dvc_file(dvc_file, f"outs entry {i + 1} has no path")
        if out.get("md5") in (None, ""):
            raise _invalid_dvc_file(dvc_file, f"outs entry {i + 1} ({out['path']}) has no md5")
        recorded[out["path"]] = str(out["md5"])
    return recorded


def data_md5(cfg: FedtailConfig, root: Path = Path(".")) -> str:
    """The configured dataset's version as recorded in ``data.dvc``: an md5 over its files' md5s.

    A cheap cache key for everything derived from the dataset; ``""`` while it is not (fully) versioned.
    Other datasets' versions do not enter it, so recording a new mnist1d leaves digits' caches valid.
    """
    dvc_file, files = _variant_files(cfg, Path(root))
    recorded = _recorded(dvc_file)
    if not all(recorded.get(path) for path in files):
        return ""
    blob = json.dumps({path: recorded[path] for path in files}, sort_keys=True)
    return hashlib.md5(blob.encode()).hexdigest()


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
        raise DataIntegrityError(
            f"{str(root)!r} is not a DVC project (no .dvc/): after the first git commit run `dvc init` "
            "there, or fedtail.staging.init_dvc(root), which also sets up the default remote"
        )


def _open_repo(root: Path) -> Repo:
    from dvc.repo import Repo

    # Wait on DVC's repo lock like `dvc --wait-for-lock` instead of failing after 3 s.
    repo = Repo(str(root), _wait_for_lock=True)
    repo.scm_context.quiet = True  # we log what to commit ourselves; DVC would print to stdout
    return repo


def _load_stage(repo: Repo, dvc_file: Path) -> Any:
    """DVC's stage of ``data.dvc``; what `_recorded` lets through (e.g. a key DVC does not know) as one
    `DataIntegrityError` instead of DVC's chained tracebacks."""
    from dvc.exceptions import DvcException

    try:
        return repo.stage.load_one(str(dvc_file))
    except DvcException as err:
        cause = err.__cause__
        errors = getattr(cause, "errors", [cause] if cause else [])
        details = "; ".join(
            f"{'.'.join(map(str, getattr(e, 'path', [])))}: {getattr(e, 'msg', e)}" for e in errors
        )
        raise _invalid_dvc_file(dvc_file, details or str(err)) from None


def _outs(repo: Repo, dvc_file: Path, paths: Iterable[str]) -> list[Output]:
    """The outputs of ``data.dvc`` for ``paths``, loaded fresh (an Output caches nothing about the
    workspace)."""
    wanted = set(paths)
    return [o for o in _load_stage(repo, dvc_file).outs if o.def_path in wanted]


def _has_remote(repo: Repo) -> bool:
    return bool(repo.config["core"].get("remote"))


def _fetch(repo: Repo, outs: list[Output]) -> None:
    """Bring missing objects from the default remote into the cache; harmless, touches no workspace file."""
    from dvc.exceptions import DvcException

    need = [o for o in outs if o.changed_cache()]
    if not need or not _has_remote(repo):
        return
    # A miss is expected (a fresh clone's remote is empty) and handled by the caller, who regenerates and
    # verifies or says what to do; DVC's own warning listing the missing md5s would only alarm.
    fetch_log = logging.getLogger("dvc_data.index.fetch")
    level = fetch_log.level
    fetch_log.setLevel(logging.ERROR)
    try:
        repo.fetch(targets=[o.fs_path for o in need])
    except DvcException as err:
        log.warning("dvc fetch failed: %s", err)
    finally:
        fetch_log.setLevel(level)


# ---- raw data --------------------------------------------------------------------------------------
def _data_add_command(cfg: FedtailConfig) -> str:
    """``fedtail data add <name> --set ...``: the command that versions this dataset variant."""
    defaults = type(cfg.dataset)(name=cfg.dataset.name).model_dump(mode="json")
    sets = [
        f"--set dataset.{k}={shlex.quote(str(v))}"
        for k, v in cfg.dataset.model_dump(mode="json").items()
        if k not in ("name", "download") and v != defaults.get(k)
    ]
    return " ".join(["fedtail data add", cfg.dataset.name, *sets])


def _materialize(
    spec: DatasetSpec, cfg: FedtailConfig, root: Path, raw: Path, names: list[str]
) -> list[Path]:
    """Generate the dataset in a temp folder, then move in those of ``names`` that are absent.

    Returns the files moved in. A crash never leaves a half-written file, and no existing file is touched.
    """
    log.info("materializing %s from %s into %s", spec.name, spec.source or "its source", raw)
    tmp_parent = root / ".dvc" / "tmp"
    tmp_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"materialize-{spec.name}-", dir=tmp_parent))
    moved = []
    try:
        spec.materialize(cfg.dataset, tmp)
        raw.mkdir(parents=True, exist_ok=True)
        for name in names:
            if not (raw / name).exists():
                shutil.move(tmp / name, raw / name)  # a rename when .dvc/tmp and data/ share a file system
                moved.append(raw / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return moved


def _dvc_file_edited(root: Path, dvc_file: Path) -> bool:
    """True when ``data.dvc`` differs from the last git commit (a hand edit or an uncommitted add)."""
    out = _git(root, "diff", "--quiet", "HEAD", "--", os.path.relpath(dvc_file, root))
    return out.returncode == 1


def _mismatch(repo: Repo, cfg: FedtailConfig, root: Path, dvc_file: Path, bad: list[Output]) -> str:
    """The error for files that differ from data.dvc, with a fix that works in this situation.

    DVC 3.67's ``checkout``/``pull`` *delete* an output whose recorded objects are missing from the cache,
    so they are advised only once the objects are there (fetched from the remote first if possible).
    """
    rel = os.path.relpath(dvc_file, root)
    paths = " ".join(o.def_path for o in bad)
    spec = DATASETS.get(cfg.dataset.name)
    lines = [f"{cfg.dataset.name} in {cfg.output.data_dir}/ does not match the version recorded in {rel}:"]
    lines += [f"  modified: {o.def_path}" for o in bad]
    _fetch(repo, bad)
    if not any(o.changed_cache() for o in bad):
        lines.append(
            f"The recorded version is in the DVC cache. To discard the change and restore it, run: "
            f"`dvc checkout --force {paths}`"
        )
    else:
        lines.append("The recorded version is in neither the local DVC cache nor the remote.")
        if _dvc_file_edited(root, dvc_file):
            lines.append(
                f"{rel} differs from your last commit (see `git diff {rel}`). To return to the committed "
                f"version, run: `git checkout {rel}`"
            )
        raw = Path(cfg.output.data_dir) / spec.name
        lines.append(
            f"To get the recorded version back from {spec.source or 'its source'}, move the files aside "
            f"(`mv {raw} {raw}.bak`) and run again: fedtail regenerates them and accepts them only if "
            f"they match {rel}."
        )
    lines.append(
        f"If the files in {cfg.output.data_dir}/ are the version you want, record them with "
        f"`{_data_add_command(cfg)}` and commit {rel}. fedtail never replaces raw data silently."
    )
    return "\n".join(lines)


def unversioned(cfg: FedtailConfig, root: Path = Path(".")) -> list[str]:
    """The configured dataset variant's raw files that ``data.dvc`` does not record (a YAML read, no DVC)."""
    dvc_file, files = _variant_files(cfg, Path(root))
    recorded = _recorded(dvc_file)
    return [p for p in files if p not in recorded]


def raw_present(cfg: FedtailConfig, root: Path = Path(".")) -> bool:
    """Whether every raw file of the configured dataset variant is in the data folder."""
    return all(path.is_file() for path in _variant_files(cfg, Path(root))[1].values())


def check_versioned(cfg: FedtailConfig, root: Path = Path(".")) -> None:
    """Refuse, before any work, a dataset variant that ``data.dvc`` does not record."""
    missing = unversioned(cfg, root)
    if missing:
        rel = os.path.relpath(dvc_file_of(cfg, root), root)
        raise DataIntegrityError(
            f"dataset {cfg.dataset.name!r} with this config is not versioned in {rel} (no entry for "
            f"{', '.join(missing)}). Running never changes the recorded data; to version it, run "
            f"`{_data_add_command(cfg)}` and commit {rel}."
        )


def _ensure_raw(cfg: FedtailConfig, root: Path) -> Path:
    spec = DATASETS.get(cfg.dataset.name)
    dvc_file, files = _variant_files(cfg, root)
    raw = _data_dir(cfg, root) / spec.name
    rel = os.path.relpath(dvc_file, root)
    check_versioned(cfg, root)
    with _open_repo(root) as repo:
        outs = _outs(repo, dvc_file, files)
        bad = [o for o in outs if o.exists and o.changed_checksum()]
        if bad:
            raise DataIntegrityError(_mismatch(repo, cfg, root, dvc_file, bad))
        missing = [o for o in outs if not o.exists]
        if not missing:
            return raw
        _fetch(repo, missing)
        ready = [o.fs_path for o in missing if not o.changed_cache()]
        if ready:  # only outputs whose objects are all cached: a failed checkout deletes the output
            log.info("restoring %s from the DVC cache", ", ".join(os.path.relpath(p, root) for p in ready))
            repo.checkout(targets=ready)
        missing = [o for o in _outs(repo, dvc_file, files) if not o.exists]
        if missing:
            _regenerate(repo, spec, cfg, root, raw, missing, rel)
    return raw


def _regenerate(
    repo: Repo, spec: DatasetSpec, cfg: FedtailConfig, root: Path, raw: Path, missing: list[Output], rel: str
) -> None:
    """Fresh clone, nothing in cache or remote: regenerate; only byte-identical files are accepted."""
    names = [Path(o.fs_path).name for o in missing]
    moved = _materialize(spec, cfg, root, raw, names)
    differ = [o for o in missing if o.changed_checksum()]
    if differ:
        for path in moved:  # leave data/ as found, so a retry after `dvc pull` starts clean
            path.unlink()
        with contextlib.suppress(OSError):
            raw.rmdir()
        raise DataIntegrityError(
            f"{spec.name} was regenerated from {spec.source or 'its source'} on this machine, but "
            f"{', '.join(o.def_path for o in differ)} do not match the version recorded in {rel}. Either "
            f"{rel} records data this machine's generator does not reproduce (generators that use "
            f"floating-point math may differ between CPUs and library versions; see docs/architecture.md), "
            f"or it was recorded from other data. Fetch the recorded files with "
            f"`dvc pull {' '.join(o.def_path for o in missing)}` from a "
            f"remote that holds them, or record this machine's version with `{_data_add_command(cfg)}` "
            f"(changes {rel}: commit it)."
        )
    for out in missing:
        out.commit()  # fill the local cache so `dvc checkout` can repair these files later


def ensure_raw(cfg: FedtailConfig, root: Path = Path(".")) -> Path:
    """``root/data/<name>``, the configured dataset's files checked against ``data.dvc`` and restored or
    regenerated as needed; never changes ``data.dvc``."""
    root = Path(root)
    _require_dvc(root)
    with _locked(root):
        return _ensure_raw(cfg, root)


def add_data(cfg: FedtailConfig, root: Path = Path(".")) -> tuple[list[str], bool]:
    """Version the configured dataset variant: materialize its absent raw files, record every one of them
    as an output of ``data.dvc`` (other datasets' entries untouched), cache and push them.

    The explicit way to make a data version (``fedtail data add``). Files already in ``data/`` are recorded
    as they are. Returns the recorded output paths and whether ``data.dvc`` changed.
    """
    from dvc.exceptions import DvcException
    from dvc.output import loads_from

    root = Path(root)
    _require_dvc(root)
    spec = DATASETS.get(cfg.dataset.name)
    dvc_file, files = _variant_files(cfg, root)
    raw = _data_dir(cfg, root) / spec.name
    with _locked(root), _open_repo(root) as repo:
        absent = [path.name for path in files.values() if not path.exists()]
        if absent:
            _materialize(spec, cfg, root, raw, absent)
        if dvc_file.is_file():
            _recorded(dvc_file)  # an invalid file refused as `check_versioned` refuses it
            stage = _load_stage(repo, dvc_file)
        else:
            stage = repo.stage.create(
                single_stage=True, validate=False, fname=str(dvc_file), wdir=str(dvc_file.parent), outs=[]
            )
        before = {o.def_path: o.hash_info for o in stage.outs}
        new = loads_from(stage, list(files))
        for out in new:
            out.save()
            if before.get(out.def_path) != out.hash_info or out.changed_cache():
                out.commit()  # into the local cache (a commit re-links the file: only when needed)
        changed = any(before.get(o.def_path) != o.hash_info for o in new)
        if changed:
            kept = [o for o in stage.outs if o.def_path not in files]
            stage.outs = sorted([*kept, *new], key=lambda o: o.def_path)
            stage.dump()
            repo.scm_context.ignore(str(_data_dir(cfg, root).resolve()))  # the data folder stays out of git
            if _has_remote(repo):
                try:
                    repo.push(targets=[o.fs_path for o in new])
                except DvcException as err:
                    log.warning(
                        "dvc push failed (%s): run `dvc push %s` once the remote is reachable",
                        err,
                        os.path.relpath(dvc_file, root),
                    )
    return list(files), changed


# ---- staged arrays ---------------------------------------------------------------------------------
def _stage_key(md5: str, cfg: FedtailConfig) -> str:
    """Data version + the dataset fields that shape the arrays (not where torchvision files live)."""
    section = with_data_revision(cfg.dataset.model_dump(mode="json", exclude={"root", "download"}))
    blob = json.dumps({"data_md5": md5, "dataset": section}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def staged_problems(staged_dir: Path) -> list[str]:
    """What is wrong with a staged folder (missing meta.json, a file missing or not matching its sha256);
    ``[]`` when it can be used."""
    meta_path = Path(staged_dir) / "meta.json"
    if not meta_path.is_file():
        return ["meta.json (missing)"]
    try:
        recorded = json.loads(meta_path.read_text())[DIGESTS_KEY]
    except (ValueError, KeyError, TypeError):
        return [f"meta.json (unreadable or without a {DIGESTS_KEY} manifest)"]
    if sorted(recorded) != sorted(STAGED_FILES):
        return [f"meta.json ({DIGESTS_KEY} lists {sorted(recorded)})"]
    return manifest_problems(staged_dir, recorded)


def select_classes(splits: Splits, classes: list[int] | None) -> Splits:
    """The samples of ``classes`` only, labelled by their position in ``classes`` (None: unchanged)."""
    if classes is None:
        return splits
    table = np.full(
        max(int(splits.y_train.max()), int(splits.y_test.max()), *classes) + 1, -1, dtype=np.int64
    )
    table[np.asarray(classes)] = np.arange(len(classes))
    out = []
    for x, y in ((splits.x_train, splits.y_train), (splits.x_test, splits.y_test)):
        new = table[np.asarray(y, dtype=np.int64)]
        keep = new >= 0
        out += [np.ascontiguousarray(x[keep]), new[keep]]
    return Splits(*out)


def stage(cfg: FedtailConfig, root: Path = Path(".")) -> Path:
    """`ensure_raw`, then write normalised splits to ``<artifacts>/staged/<name>-<key>/`` (idempotent).

    An existing folder is reused only if its files still match the sha256s in its ``meta.json``; else it
    is rebuilt from the versioned raw data (nothing in it is lost: it is derived data).
    """
    root = Path(root)
    spec = DATASETS.get(cfg.dataset.name)
    _require_dvc(root)
    with _locked(root):
        raw = _ensure_raw(cfg, root)
        md5 = data_md5(cfg, root)
        key = _stage_key(md5, cfg)
        out = io.under(root, cfg.output.artifacts_dir) / "staged" / f"{spec.name}-{key}"
        if out.is_dir():
            problems = staged_problems(out)  # the key is in the folder name; the files must match meta.json
            if not problems:
                return out
            log.warning("staged arrays in %s fail their check (%s): staging again", out, ", ".join(problems))
        splits = select_classes(spec.load(cfg.dataset, raw), cfg.dataset.classes)
        with io.atomic_dir(out) as tmp:
            arrays = (splits.x_train, splits.y_train, splits.x_test, splits.y_test)
            for name, array in zip(STAGED_FILES, arrays, strict=True):
                io.write_npy(tmp / name, array)
            io.write_json(
                tmp / "meta.json",
                {
                    "name": spec.name,
                    "key": key,
                    "num_classes": cfg.num_classes,
                    "input_shape": list(spec.input_shape),
                    "sizes": {"train": len(splits.y_train), "test": len(splits.y_test)},
                    "data_md5": md5,
                    "source": spec.source,
                    "dataset": cfg.dataset.model_dump(mode="json"),
                    DIGESTS_KEY: file_digests(tmp, STAGED_FILES),
                },
            )
    log.info("staged %s into %s", spec.name, out)
    return out


def staged_meta(staged_dir: Path) -> dict[str, Any]:
    return json.loads((Path(staged_dir) / "meta.json").read_text())


_opened: dict[str, tuple[tuple, Splits]] = {}


def _staged_signature(folder: str) -> tuple | None:
    try:
        stats = [os.stat(os.path.join(folder, n)) for n in ("meta.json", *STAGED_FILES)]
    except FileNotFoundError:
        return None
    return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in stats)


def load_staged(staged_dir: Path, mmap: bool = True) -> Splits:
    """The staged splits, checked against the sha256s in ``meta.json`` (once per process and file state);
    memory-mapped read-only by default so client processes share the pages. The read-only maps are opened
    once per process and file state too: clients load their data every round."""
    key = os.path.abspath(staged_dir)
    signature = _staged_signature(key) if mmap else None
    hit = _opened.get(key)
    if signature is not None and hit is not None and hit[0] == signature:
        return hit[1]
    problems = staged_problems(staged_dir)
    if problems:
        raise DataIntegrityError(
            f"staged arrays in {staged_dir} do not match their meta.json: {', '.join(problems)}. They were "
            "changed after staging; re-run the pipeline (`fedtail run`, or `fedtail stage` with the same "
            "config), which stages them again from the versioned raw data."
        )
    mode = "r" if mmap else None
    splits = Splits(*[np.load(Path(staged_dir) / name, mmap_mode=mode) for name in STAGED_FILES])
    if signature is not None:
        _opened[key] = (signature, splits)
    return splits


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
