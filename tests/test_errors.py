"""Bad input and a failing machine end in one ``fedtail:`` line, never a traceback: a full disk, a
file-size limit, an invalid data.dvc, a huge config, an unreachable or unwritable Prefect."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedtail.cli import main
from tests.conftest import REPO

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _one_line(err: str) -> str:
    assert err.startswith("fedtail: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_disk_full_while_training_says_how_to_resume(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first checkpoint's write fails as on a full disk: the run folder names the checkpoint and the
    resume command; nothing half-written is left."""
    import torch

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    args = ["--config", SMOKE, "--root", str(project), "--set", f"output.runs_dir={tmp_path / 'runs'}"]
    args += ["--set", f"output.artifacts_dir={tmp_path / 'artifacts'}", "--run-id", "full"]
    assert main(["simulate", *args]) == 1
    err = _one_line(capsys.readouterr().err)
    run_dir = tmp_path / "runs" / "full"
    assert f"cannot write {run_dir / 'checkpoint.pt'}: no space left on the device; free some space" in err
    assert "then resume with: fedtail simulate --run-id full --resume" in err
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_file_size_limit_names_the_file_and_the_limit(tmp_path: Path) -> None:
    """Under ``ulimit -f`` (RLIMIT_FSIZE; Python ignores SIGXFSZ) a write fails with EFBIG."""
    code = (
        "import resource, sys\n"
        "from fedtail import io\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))\n"
        "try:\n"
        f"    io.write_bytes({str(tmp_path / 'big.bin')!r}, bytes(2 * 2**20))\n"
        "except OSError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == (
        f"cannot write {tmp_path / 'big.bin'}: the file would exceed the file-size limit "
        "(ulimit -f: 1.0 MiB); raise the limit (`ulimit -f unlimited`)"
    ), out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == []  # no temp file left


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda t: t.replace("md5: ", "md6: ", 1), "outs entry 1 (data/digits/images.npy) has no md5"),
        (
            lambda t: t.replace("  hash: md5\n", "  hash: md5\n  colour: red\n", 1),
            "outs.0.colour: extra keys",
        ),
        (lambda t: t + "outs: [\n", "invalid YAML"),
        (lambda t: "outs: 3\n", "expected a mapping with a list of outs:"),
        (lambda t: "\udcff", "not UTF-8 text"),
    ],
)
def test_a_hand_edited_data_dvc_is_one_line(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Any, problem: str
) -> None:
    copy = tmp_path / "project"
    shutil.copytree(project, copy)
    dvc_file = copy / "data.dvc"
    dvc_file.write_bytes(edit(dvc_file.read_text()).encode("utf-8", "surrogateescape"))
    for command in ("stage", "data"):
        extra = ["add", "digits"] if command == "data" else []
        assert main([command, *extra, "--config", SMOKE, "--root", str(copy)]) == 1
        err = _one_line(capsys.readouterr().err)
        assert f"{dvc_file} is not a valid DVC file: " in err and problem in err, err
        assert f"git checkout {dvc_file}" in err and "fedtail data add DATASET" in err


def test_a_huge_or_endless_config_or_sweep_file_is_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as fh:
        fh.truncate(300 * 2**20)  # sparse: 300 MiB that cost nothing to make
    assert main(["stage", "--config", str(big), "--root", str(tmp_path)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"config file '{big}' is 300 MiB, over the limit of 1 MiB" in err, err
    assert main(["sweep", str(big), "--root", str(tmp_path)]) == 2
    assert "is 300 MiB, over the limit of 1 MiB" in _one_line(capsys.readouterr().err)
    assert main(["stage", "--config", "/dev/zero", "--root", str(tmp_path)]) == 2
    assert "'/dev/zero' is endless, over the limit of 1 MiB" in _one_line(capsys.readouterr().err)


def test_a_sweep_file_that_is_not_text_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(b"axes:\n\xff\xfe\x00")
    assert main(["sweep", str(garbage), "--root", str(tmp_path)]) == 2
    assert "not UTF-8 text" in _one_line(capsys.readouterr().err)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_prefect_api_url_where_nothing_answers_is_one_line(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = f"http://127.0.0.1:{_free_port()}/api"
    args = ["run", "--config", SMOKE, "--root", str(project), "--run-id", "x"]
    args += [
        "--set",
        f"output.runs_dir={tmp_path / 'runs'}",
        "--set",
        f"output.artifacts_dir={tmp_path / 'a'}",
    ]
    with temporary_settings({PREFECT_API_URL: url}):
        assert main(args) == 1
    err = _one_line(capsys.readouterr().err)
    assert f"PREFECT_API_URL={url}: nothing answers there" in err and "prefect server start" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "a").exists()
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {SMOKE}\nset: {{output.data_dir: {project / 'data'}}}\nseeds: [0]\n")
    for command in (["serve", "--config", SMOKE], ["sweep", str(sweep), "--serve"]):  # deployments too
        with temporary_settings({PREFECT_API_URL: url}):
            assert main([*command, "--root", str(project)]) == 1, command
        assert f"PREFECT_API_URL={url}: nothing answers there" in _one_line(capsys.readouterr().err)


def _run_cli(project: Path, tmp_path: Path, env: dict[str, str], fsize: int | None = None) -> Any:
    """`fedtail run` in a child without PREFECT_API_URL (a temporary server), optionally under ulimit -f."""
    import resource

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    cmd = [sys.executable, "-m", "fedtail.cli", "run", "--config", SMOKE, "--root", str(project)]
    cmd += [
        "--set",
        f"output.runs_dir={tmp_path / 'runs'}",
        "--set",
        f"output.artifacts_dir={tmp_path / 'a'}",
    ]
    return subprocess.run(
        cmd,
        env={**base, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
    )


def test_a_file_size_limit_too_small_for_prefects_database_is_one_line(project: Path, tmp_path: Path) -> None:
    """Under ``ulimit -f 1024`` the temporary server's SQLite database cannot grow: refused at once, not
    after minutes of a failing server and client retries."""
    out = _run_cli(project, tmp_path, {"PREFECT_HOME": str(tmp_path / "home")}, fsize=2**20)
    assert out.returncode == 1, out.stdout + out.stderr
    err = _one_line(out.stderr)
    assert "the file-size limit (ulimit -f) of 1.0 MiB leaves Prefect's database" in err
    assert str(tmp_path / "home" / "prefect.db") in err and "ulimit -f unlimited" in err


def test_an_unwritable_prefect_home_is_one_line(project: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder\n")
    out = _run_cli(project, tmp_path, {"PREFECT_HOME": str(tmp_path / "file" / "home")})
    assert out.returncode == 1, out.stdout + out.stderr
    err = out.stderr.splitlines()[-1] + "\n"  # Prefect itself warns first that it cannot create the folder
    assert "Traceback" not in out.stderr
    assert f"fedtail: Prefect's database folder {tmp_path / 'file' / 'home'} cannot be written" in _one_line(
        err
    )


@pytest.fixture
def diverging_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    """An objective whose loss turns every weight NaN on the first step, on any machine."""
    from clients.objectives.ce import CrossEntropy
    from fedtail.registry import OBJECTIVES

    class Diverging(CrossEntropy):
        def loss(self, logits: Any, y: Any, x: Any) -> Any:
            return super().loss(logits, y, x) * float("nan")

    OBJECTIVES.names()
    monkeypatch.setitem(OBJECTIVES._items, "diverging", Diverging)


def test_a_run_whose_every_client_diverges_fails_with_one_line_naming_the_setting(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], diverging_objective: None
) -> None:
    """Non-finite updates are rejected, and a round with no usable update ends the run with which
    client, which methods and which setting, not a traceback."""
    args = ["--config", SMOKE, "--root", str(project), "--set", f"output.runs_dir={tmp_path / 'runs'}"]
    args += ["--set", f"output.artifacts_dir={tmp_path / 'artifacts'}", "--run-id", "diverged"]
    args += ["--set", "train.objective=diverging", "--set", "continual.method=replay"]
    assert main(["simulate", *args]) == 1
    err = capsys.readouterr().err
    line = _one_line(err[err.index("fedtail: ") :])
    assert "round 1: no usable client update; client 0: array" in line and "contains NaN or Inf" in line
    assert "local training diverged under continual.method='replay', train.objective='diverging'" in line
    assert "lower the local learning rate (train.lr=0.05)" in line and "start again (--overwrite)" in line


def test_the_divergence_hint_names_every_learning_rate_setting() -> None:
    from fedtail.config import build_config
    from strategies.base import divergence_hint

    cfg = build_config({"continual": {"method": "glfc", "options": {"lr_scale": 3.0}}, "train": {"lr": 0.1}})
    assert divergence_hint(cfg).endswith("(train.lr=0.1, continual.options.lr_scale=3.0)")
    unclipped = build_config({"train": {"max_grad_norm": None}})
    assert divergence_hint(unclipped).endswith("(train.lr=0.05); or clip it: train.max_grad_norm=3.0")
