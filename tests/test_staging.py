"""DVC-versioned raw data and staged arrays, each test in its own throw-away git + DVC repo."""

from __future__ import annotations

import os
import shutil
import subprocess
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


SMALL_1D = {"num_samples": 100}  # mnist1d kept tiny: its raw files are part of every data version


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


# ---- ensure_raw -----------------------------------------------------------------------------------
def test_first_call_records_and_pushes_then_noop(root: Path) -> None:
    raw = staging.ensure_raw(_cfg(), root)
    assert raw == root / "data" / "digits"
    assert {p.name for p in raw.iterdir()} == {"images.npy", "labels.npy"}
    md5 = staging.data_md5(root)
    assert len(md5) == 32 and f"md5: {md5}.dir" in (root / "data.dvc").read_text()
    assert "/data" in (root / ".gitignore").read_text().splitlines()
    assert any((root / ".dvcstore").rglob("*.dir")), "the new version must be pushed to the default remote"

    stamps = {p: p.stat().st_mtime_ns for p in [root / "data.dvc", *raw.iterdir()]}
    assert staging.ensure_raw(_cfg(), root) == raw
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_corrupted_byte_raises_and_checkout_repairs(root: Path) -> None:
    raw = staging.ensure_raw(_cfg(), root)
    images = raw / "images.npy"
    with open(images, "r+b") as fh:
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(staging.DataIntegrityError) as err:
        staging.ensure_raw(_cfg(), root)
    message = str(err.value)
    assert "modified: data/digits/images.npy" in message
    assert "dvc checkout data.dvc" in message and "dvc pull data.dvc" in message
    assert images.exists(), "a mismatch must never be repaired silently"

    with _dvc_repo(root) as repo:
        repo.checkout(targets=[str(root / "data.dvc")], force=True)
    assert staging.ensure_raw(_cfg(), root) == raw


def test_extra_file_raises(root: Path) -> None:
    staging.ensure_raw(_cfg(), root)
    (root / "data" / "notes.txt").write_text("stray\n")
    with pytest.raises(staging.DataIntegrityError, match="added: data/notes.txt"):
        staging.ensure_raw(_cfg(), root)


def test_deleted_data_restored_from_cache(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging.ensure_raw(_cfg(), root)
    md5 = staging.data_md5(root)
    shutil.rmtree(root / "data")
    _no_materialize(monkeypatch)
    staging.ensure_raw(_cfg(), root)
    assert staging.data_md5(root) == md5 and (root / "data" / "digits" / "images.npy").is_file()


def test_fresh_clone_regenerates_identical_md5(root: Path) -> None:
    staging.ensure_raw(_cfg(), root)
    dvc_file = (root / "data.dvc").read_text()
    for path in ("data", ".dvc/cache", ".dvcstore"):  # what a fresh clone lacks
        shutil.rmtree(root / path)
    staging.ensure_raw(_cfg(), root)
    assert (root / "data.dvc").read_text() == dvc_file
    assert not (root / ".dvcstore").exists(), "an unchanged version is not pushed again"
    # The regenerated files went into the local cache, so `dvc checkout` can repair them later.
    with _dvc_repo(root) as repo:
        assert not repo.stage.load_one(str(root / "data.dvc")).outs[0].changed_cache()


def test_push_then_pull_restores(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging.ensure_raw(_cfg(), root)
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


def test_new_dataset_records_new_version_and_missing_one_is_restored(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging.ensure_raw(_cfg(), root)
    digits_md5 = staging.data_md5(root)
    raw = staging.ensure_raw(_cfg("mnist1d", **SMALL_1D), root)
    both_md5 = staging.data_md5(root)
    assert both_md5 != digits_md5
    assert {p.name for p in (root / "data").iterdir()} == {"digits", "mnist1d"}

    # Another sample count is another pair of raw files in the same folder: a new version again.
    staging.ensure_raw(_cfg("mnist1d", num_samples=120), root)
    assert len(list(raw.iterdir())) == 4 and staging.data_md5(root) != both_md5

    shutil.rmtree(raw)
    _no_materialize(monkeypatch)
    assert staging.ensure_raw(_cfg("mnist1d", **SMALL_1D), root) == raw
    assert len(list(raw.iterdir())) == 4


def test_unreproducible_version_needs_pull(root: Path) -> None:
    staging.ensure_raw(_cfg(), root)
    staging.ensure_raw(_cfg("mnist1d", **SMALL_1D), root)
    for path in ("data", ".dvc/cache", ".dvcstore"):
        shutil.rmtree(root / path)
    # data.dvc also holds mnist1d, which a digits-only regeneration cannot reproduce.
    with pytest.raises(staging.DataIntegrityError, match=r"dvc pull data\.dvc"):
        staging.ensure_raw(_cfg(), root)
    assert not (root / "data").exists(), "a failed regeneration must not leave partial data behind"


def test_concurrent_callers_serialise(root: Path) -> None:
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
    assert staging.data_md5(root)


# ---- stage ----------------------------------------------------------------------------------------
def test_stage_idempotent_and_round_trips(root: Path) -> None:
    cfg = _cfg()
    staged = staging.stage(cfg, root)
    meta = staging.staged_meta(staged)
    assert staged.parent == root / "artifacts" / "staged" and staged.name == f"digits-{meta['key']}"
    assert meta["data_md5"] == staging.data_md5(root)
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
    staged = staging.stage(cfg, root)
    assert os.getcwd() == cwd and staged.parent == tmp_path / "elsewhere" / "staged"
    assert (root / "data.dvc").is_file()
