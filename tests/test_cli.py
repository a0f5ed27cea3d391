"""The command line: DVC-stage commands end to end, and bad input rejected before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtail.cli import main
from tests.conftest import REPO


def _args(project: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "smoke.yaml"),
        "--root",
        str(project),
        "--set",
        f"output.runs_dir={project / 'cli-runs'}",
        "--set",
        f"output.artifacts_dir={project / 'cli-artifacts'}",
        *extra,
    ]


def test_bad_config_fails_before_any_work(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", *_args(project, "--set", "partition.alpha=-1", "--run-id", "bad")])
    assert code == 2
    err = capsys.readouterr().err
    assert "partition.alpha" in err and "greater than 0" in err
    assert not (project / "cli-runs").exists() and not (project / "cli-artifacts").exists()


def test_stage_commands_chain_like_dvc_repro(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stage", *_args(project)]) == 0
    staged = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (staged / "x_train.npy").is_file()
    assert main(["partition", *_args(project)]) == 0
    parts = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (parts / "assignment.npy").is_file() and (parts / "heatmap.png").is_file()
    assert main(["simulate", *_args(project, "--run-id", "cli", "--overwrite")]) == 0
    out = capsys.readouterr().out
    assert "task 2/2 round 2/2" in out  # per-round progress
    assert main(["report", *_args(project, "--run-id", "cli")]) == 0
    report = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == project / "cli-runs" / "cli" / "report.md" and report.is_file()


@pytest.mark.parametrize(
    ("extra", "hint"),
    [
        (
            ("--set", "train.lr=[1,"),
            "fedtail: override 'train.lr=[1,', value, line 1, column 4: invalid YAML",
        ),
        (("--set", "train.lr=.nan"), "train.lr: Input should be a finite number"),
        (("--set", "partition=3"), "partition: Input should be a valid dictionary"),
        (("--set", "strategy.options={mu: 1}"), "strategy.options: unknown option 'mu'"),
        (("--run-id", "../escape"), "output.run_id: run id '../escape' is not allowed"),
        (("--set", "serve.cron=['61 * * * *']"), "write a list: cron:"),
    ],
)
def test_bad_values_exit_2_without_traceback(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], hint: str
) -> None:
    outputs = [
        "--set",
        f"output.runs_dir={tmp_path / 'r'}",
        "--set",
        f"output.artifacts_dir={tmp_path / 'a'}",
    ]
    assert main(["simulate", *_args(project, *outputs, *extra)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtail: ") and hint in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "a").exists()


def test_bad_config_file_exits_2_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.1\ntrain:\n  epochs: 1\n")
    for command in ("run", "serve", "stage", "partition", "simulate", "report"):
        extra = ["--run-id", "x"] if command == "report" else []
        assert main([command, "--config", str(bad), "--root", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert f"fedtail: config file '{bad}', line 3, column 1: invalid YAML: duplicate key 'train'" in err


def test_output_folder_that_is_a_file_fails_before_work(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "runs").write_text("not a folder")
    (tmp_path / "artifacts").mkdir()
    args = _args(project, "--set", f"output.runs_dir={tmp_path / 'runs'}")
    args += ["--set", f"output.artifacts_dir={tmp_path / 'artifacts'}"]
    assert main(["simulate", *args]) == 2
    err = capsys.readouterr().err
    assert "output.runs_dir=" in err and "exists and is not a folder" in err, err
    assert not any((tmp_path / "artifacts").iterdir())  # nothing staged


@pytest.mark.parametrize("command", ["stage", "run"])
def test_unversioned_dataset_is_refused_naming_the_command(
    project: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Refused before any work: `run` starts no Prefect server or flow (nothing prints but the error)."""
    dvc_file = (project / "data.dvc").read_bytes()
    code = main(
        [command, *_args(project, "--set", "dataset.name=mnist1d", "--set", "dataset.num_samples=100")]
    )
    assert code == 1
    out, err = capsys.readouterr()
    assert err.startswith("fedtail: ") and "Traceback" not in err and "Flow run" not in out + err
    assert "`fedtail data add mnist1d --set dataset.num_samples=100`" in err
    assert (project / "data.dvc").read_bytes() == dvc_file, "running must never change data.dvc"


def test_data_errors_outside_the_config_exit_cleanly(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data folder outside the project, or a folder that is no DVC project: a message, not a traceback."""
    assert main(["stage", *_args(project, "--set", f"output.data_dir={tmp_path / 'x'}")]) == 2
    err = capsys.readouterr().err
    assert "must lie inside the project" in err and "Traceback" not in err
    bare = tmp_path / "bare"
    bare.mkdir()
    assert main(["data", "add", "digits", "--root", str(bare), "--config", str(REPO / "params.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fedtail: ") and "not a DVC project" in err and "Traceback" not in err


def test_data_add_names_the_dvc_file_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedtail.staging import init_dvc
    from tests.conftest import git

    git(tmp_path, "init", "-q")
    git(tmp_path, "commit", "-q", "--allow-empty", "-m", "init")
    init_dvc(tmp_path)
    args = ["data", "add", "digits", "--root", str(tmp_path), "--config", str(REPO / "params.yaml")]
    assert main([*args, "--set", "output.data_dir=store/raw.v1"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "store" / "raw.v1.dvc").is_file()
    assert "git add store/raw.v1.dvc" in out


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedtail report` (or stage, list, a config check) interrupted: no KeyboardInterrupt traceback."""
    import fedtail.cli as cli

    def interrupted() -> int:
        raise KeyboardInterrupt

    exits: list[int] = []
    monkeypatch.setattr(cli, "main", interrupted)
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    cli.entry()
    assert exits == [130]
    err = capsys.readouterr().err
    assert err.strip() == "fedtail: interrupted; files are written whole or not at all: run it again"
