"""DVC-versioned raw data and staged arrays, each test in its own throw-away git + DVC repo."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from fedtail import staging
from fedtail.config import FedtailConfig, build_config
from fedtail.registry import DATASETS


def _git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=root,
        check=True,
        capture_output=True,
    )


def _cfg(name: str = "digits", **dataset) -> FedtailConfig:
    return build_config({"dataset": {"name": name, **dataset}, "federation": {"num_clients": 2}})


SMALL_1D = {"num_samples": 100}  # mnist1d kept tiny


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A git repo with one commit, DVC initialised and the default local remote configured."""
    repo = tmp_path / "proj"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "commit", "-q", "--allow-empty", "-m", "init")
    staging.init_dvc(repo)
    return repo


def _no_materialize(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to re-create raw data fail: restores must come from DVC."""

    def fail(*args, **kwargs):
        raise AssertionError("raw data was materialized instead of restored from DVC")

    monkeypatch.setattr(staging, "_materialize", fail)


def _dvc_repo(root: Path):
    from dvc.repo import Repo

    return Repo(str(root))


# ---- init_dvc -------------------------------------------------------------------------------------
def test_init_dvc_idempotent(root: Path) -> None:
    config = (root / ".dvc" / "config").read_text()
    assert "url = ../.dvcstore" in config and "remote = local" in config
    staging.init_dvc(root)
    assert (root / ".dvc" / "config").read_text() == config
    assert (root / ".gitignore").read_text().splitlines().count("/.dvcstore/") == 1


def test_init_dvc_needs_a_commit(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not a git repository"):
        staging.init_dvc(tmp_path)
    _git(tmp_path, "init", "-q")
    with pytest.raises(RuntimeError, match="no commit yet"):
        staging.init_dvc(tmp_path)


def test_ensure_raw_needs_dvc(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not a DVC project"):
        staging.ensure_raw(_cfg(), tmp_path)


# ---- versioning: explicit `data add`, never a side effect of running ---------------------------------
def _add(root: Path, cfg: FedtailConfig | None = None) -> None:
    staging.add_data(cfg or _cfg(), root)


def test_unversioned_dataset_raises_naming_the_command(root: Path) -> None:
    with pytest.raises(staging.DataIntegrityError, match=r"`fedtail data add digits`"):
        staging.ensure_raw(_cfg(), root)
    assert not (root / "data.dvc").exists() and not (root / "data").exists()


def test_data_add_records_pushes_then_noop(root: Path) -> None:
    assert staging.add_data(_cfg(), root) == (["data/digits/images.npy", "data/digits/labels.npy"], True)
    raw = root / "data" / "digits"
    text = (root / "data.dvc").read_text()
    assert "path: data/digits/images.npy" in text and "path: data/digits/labels.npy" in text
    assert len(staging.data_md5(_cfg(), root)) == 32
    assert "/data" in (root / ".gitignore").read_text().splitlines()
    assert any((root / ".dvcstore").rglob("*")), "a new version is pushed to the default remote"

    stamps = {p: p.stat().st_mtime_ns for p in [root / "data.dvc", *raw.iterdir()]}
    assert staging.add_data(_cfg(), root)[1] is False
    assert staging.ensure_raw(_cfg(), root) == raw
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_running_another_dataset_never_changes_data_dvc(root: Path) -> None:
    _add(root)
    before = (root / "data.dvc").read_bytes()
    digits_md5 = staging.data_md5(_cfg(), root)
    with pytest.raises(
        staging.DataIntegrityError, match=r"fedtail data add mnist1d --set dataset\.num_samples=100"
    ):
        staging.stage(_cfg("mnist1d", **SMALL_1D), root)
    assert (root / "data.dvc").read_bytes() == before

    # Versioning it is explicit; it adds entries and leaves digits' version (and its caches) alone.
    _add(root, _cfg("mnist1d", **SMALL_1D))
    _add(root, _cfg("mnist1d", num_samples=120))
    assert len(list((root / "data" / "mnist1d").iterdir())) == 4
    assert staging.data_md5(_cfg(), root) == digits_md5
    assert staging.data_md5(_cfg("mnist1d", **SMALL_1D), root) != staging.data_md5(
        _cfg("mnist1d", num_samples=120), root
    )
    assert staging.stage(_cfg("mnist1d", **SMALL_1D), root).is_dir()


def test_cli_data_add(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedtail.cli import main

    args = ["data", "add", "mnist1d", "--root", str(root), "--set", "dataset.num_samples=100"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "recorded mnist1d" in out and "git add data.dvc" in out
    assert "path: data/mnist1d/x_n100.npy" in (root / "data.dvc").read_text()
    assert main(args) == 0 and "already versioned" in capsys.readouterr().out


# ---- ensure_raw -----------------------------------------------------------------------------------
def _flip_byte(path: Path, offset: int = 200) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _follow_advice(root: Path, message: str) -> list[str]:
    """Run every command the error message tells the user to run (``run: `...` ``), as a user would."""
    commands = re.findall(r"run: `([^`]+)`", message)
    assert commands, f"no command to run in: {message}"
    bin_dir = Path(sys.executable).parent
    for command in commands:
        argv = shlex.split(command)
        argv[0] = str(bin_dir / "dvc") if argv[0] == "dvc" else argv[0]
        subprocess.run(argv, cwd=root, check=True, capture_output=True)
    return commands


def test_corrupted_byte_raises_and_advice_repairs(root: Path) -> None:
    _add(root)
    raw = root / "data" / "digits"
    _flip_byte(raw / "images.npy")
    with pytest.raises(staging.DataIntegrityError) as err:
        staging.ensure_raw(_cfg(), root)
    message = str(err.value)
    assert "modified: data/digits/images.npy" in message and "fedtail data add digits" in message
    assert (raw / "images.npy").exists(), "a mismatch must never be repaired silently"
    assert _follow_advice(root, message) == ["dvc checkout --force data/digits/images.npy"]
    assert staging.ensure_raw(_cfg(), root) == raw


def test_edited_data_dvc_advice_loses_nothing(root: Path) -> None:
    """data.dvc names a version that is in no cache (a hand edit): DVC's checkout would delete data/."""
    _add(root)
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "data")
    raw = root / "data" / "digits"
    files = {p.name: p.read_bytes() for p in raw.iterdir()}
    dvc_file = root / "data.dvc"
    dvc_file.write_text(
        re.sub(r"md5: [0-9a-f]{32}", "md5: " + "0123456789abcdef" * 2, dvc_file.read_text(), count=1)
    )
    with pytest.raises(staging.DataIntegrityError) as err:
        staging.ensure_raw(_cfg(), root)
    message = str(err.value)
    assert "dvc checkout" not in message and "dvc pull" not in message, "either would delete the files"
    assert _follow_advice(root, message) == ["git checkout data.dvc"]
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == files
    assert staging.ensure_raw(_cfg(), root) == raw


def test_deleted_data_restored_from_cache(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _add(root)
    md5 = staging.data_md5(_cfg(), root)
    shutil.rmtree(root / "data")
    _no_materialize(monkeypatch)
    staging.ensure_raw(_cfg(), root)
    assert staging.data_md5(_cfg(), root) == md5 and (root / "data" / "digits" / "images.npy").is_file()


def test_fresh_clone_regenerates_identical_md5(root: Path) -> None:
    _add(root)
    dvc_file = (root / "data.dvc").read_text()
    for path in ("data", ".dvc/cache", ".dvcstore"):  # what a fresh clone lacks
        shutil.rmtree(root / path)
    staging.ensure_raw(_cfg(), root)
    assert (root / "data.dvc").read_text() == dvc_file
    assert not (root / ".dvcstore").exists(), "an unchanged version is not pushed again"
    # The regenerated files went into the local cache, so `dvc checkout` can repair them later.
    with _dvc_repo(root) as repo:
        assert not any(o.changed_cache() for o in repo.stage.load_one(str(root / "data.dvc")).outs)


def test_push_then_pull_restores(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _add(root)
    images = (root / "data" / "digits" / "images.npy").read_bytes()
    for path in ("data", ".dvc/cache"):
        shutil.rmtree(root / path)
    with _dvc_repo(root) as repo:
        repo.pull(targets=[str(root / "data.dvc")])
    assert (root / "data" / "digits" / "images.npy").read_bytes() == images

    for path in ("data", ".dvc/cache"):
        shutil.rmtree(root / path)
    _no_materialize(monkeypatch)
    staging.ensure_raw(_cfg(), root)  # fetches from the default remote by itself
    assert (root / "data" / "digits" / "images.npy").read_bytes() == images


def test_datasets_are_verified_separately(root: Path) -> None:
    """Another machine's mnist1d bits (here: a different recorded md5) never break a digits run."""
    _add(root)
    _add(root, _cfg("mnist1d", **SMALL_1D))
    for path in ("data", ".dvc/cache", ".dvcstore"):  # a fresh clone elsewhere
        shutil.rmtree(root / path)
    dvc_file = root / "data.dvc"
    text = dvc_file.read_text()
    x_entry = re.search(r"md5: ([0-9a-f]{32})\n(?:.*\n){2}\s*path: data/mnist1d/x_n100\.npy", text)
    assert x_entry is not None
    dvc_file.write_text(text.replace(x_entry.group(1), "f" * 32))

    assert staging.ensure_raw(_cfg(), root) == root / "data" / "digits"
    with pytest.raises(
        staging.DataIntegrityError, match=r"regenerated .* do not match .*`fedtail data add mnist1d"
    ):
        staging.ensure_raw(_cfg("mnist1d", **SMALL_1D), root)
    assert not (root / "data" / "mnist1d").exists(), "a failed regeneration leaves no partial data behind"


def test_concurrent_callers_serialise(root: Path) -> None:
    _add(root)
    shutil.rmtree(root / "data")
    errors: list[BaseException] = []

    def call() -> None:
        try:
            staging.ensure_raw(_cfg(), root)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert (root / "data" / "digits" / "images.npy").is_file()


# ---- stage ----------------------------------------------------------------------------------------
def test_stage_idempotent_and_round_trips(root: Path) -> None:
    cfg = _cfg()
    _add(root)
    staged = staging.stage(cfg, root)
    meta = staging.staged_meta(staged)
    assert staged.parent == root / "artifacts" / "staged" and staged.name == f"digits-{meta['key']}"
    assert meta["data_md5"] == staging.data_md5(cfg, root)
    assert (meta["name"], meta["num_classes"], meta["input_shape"]) == ("digits", 10, [64])
    assert meta["sizes"] == {"train": DATASETS.get("digits").train_size(cfg.dataset), "test": 450}

    stamps = {p.name: p.stat().st_mtime_ns for p in staged.iterdir()}
    assert staging.stage(cfg, root) == staged
    assert {p.name: p.stat().st_mtime_ns for p in staged.iterdir()} == stamps
    assert [p.name for p in staged.parent.iterdir()] == [staged.name], "no temp folder may be left over"

    splits = staging.load_staged(staged)
    assert isinstance(splits.x_train, np.memmap)
    expected = DATASETS.get("digits").load(cfg.dataset, root / "data" / "digits")
    for got, want in zip(
        (splits.x_train, splits.y_train, splits.x_test, splits.y_test),
        (expected.x_train, expected.y_train, expected.x_test, expected.y_test),
        strict=True,
    ):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert not isinstance(staging.load_staged(staged, mmap=False).x_train, np.memmap)

    other = staging.stage(_cfg(test_fraction=0.5), root)
    assert other != staged and staging.staged_meta(other)["sizes"]["test"] == 899


def test_stage_with_absolute_output_dirs(tmp_path: Path, root: Path) -> None:
    cfg = build_config(
        {
            "federation": {"num_clients": 2},
            "output": {"data_dir": str(root / "data"), "artifacts_dir": str(tmp_path / "elsewhere")},
        }
    )
    cwd = os.getcwd()
    staging.add_data(cfg, root)
    staged = staging.stage(cfg, root)
    assert os.getcwd() == cwd and staged.parent == tmp_path / "elsewhere" / "staged"
    assert (root / "data.dvc").is_file()


# ---- staged arrays and partitions are checked before use ------------------------------------------
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_staged_file_refused_then_rebuilt(root: Path, damage: str) -> None:
    cfg = _cfg()
    _add(root)
    staged = staging.stage(cfg, root)
    x_train = staged / "x_train.npy"
    good = x_train.read_bytes()
    staging.load_staged(staged)
    if damage == "flip":
        _flip_byte(x_train, offset=len(good) - 3)  # in the data, past the header: np.load would not notice
    else:
        os.truncate(x_train, len(good) // 2)
    with pytest.raises(staging.DataIntegrityError, match=r"x_train\.npy \(modified or truncated\)"):
        staging.load_staged(staged)
    assert staging.stage(cfg, root) == staged
    assert x_train.read_bytes() == good
    staging.load_staged(staged)


def test_staged_check_hashes_once_per_file_state(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client processes load their data every round: hashing happens once, then only when a file changes."""
    _add(root)
    staged = staging.stage(_cfg(), root)
    calls = []
    real = staging.file_digests
    monkeypatch.setattr(staging, "file_digests", lambda *a: calls.append(a) or real(*a))
    staging._verified.clear()
    for _ in range(3):
        staging.load_staged(staged)
    assert len(calls) == 1
    os.utime(staged / "y_test.npy", ns=(1, 1))
    staging.load_staged(staged)
    assert len(calls) == 2


def test_damaged_partition_refused_then_rewritten(root: Path) -> None:
    from fedtail import pipeline
    from fedtail.partition import load_client

    cfg = _cfg()
    _add(root)
    staged = pipeline.stage(cfg, root)
    parts = pipeline.partition(cfg, staged, root)
    good = (parts / "assignment.npy").read_bytes()
    expected = load_client(parts, 0)
    os.truncate(parts / "assignment.npy", len(good) - 8)
    with pytest.raises(staging.DataIntegrityError, match=r"assignment\.npy \(modified or truncated\)"):
        load_client(parts, 0)
    assert pipeline.partition(cfg, staged, root) == parts
    assert (parts / "assignment.npy").read_bytes() == good
    idx, labeled = load_client(parts, 0)
    assert np.array_equal(idx, expected[0]) and np.array_equal(labeled, expected[1])
