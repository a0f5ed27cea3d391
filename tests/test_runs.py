"""Run folders: ids are names, fedtail deletes only its own runs, one writer per run, ids never collide."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from fedtail import runs
from fedtail.cli import main
from fedtail.config import load_config
from tests.conftest import REPO

SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "../x", "/tmp/x", "a/b", "a\\b", "-rf", ".hidden", "a b", "x\n", "é", "x" * 101]
)
def test_run_ids_are_plain_names(bad: str) -> None:
    with pytest.raises(runs.RunFolderError, match="is not allowed"):
        runs.check_run_id(bad)


@pytest.mark.parametrize("good", ["dvc", "r", "20261123-053000-abcd1234-0f0f0f", "exp_1.2-b", "x" * 100])
def test_plain_run_ids_pass(good: str) -> None:
    assert runs.check_run_id(good) == good


def test_generated_ids_differ_within_one_second() -> None:
    cfg = load_config(SMOKE)
    ids = {runs.new_run_id(cfg) for _ in range(1000)}
    assert len(ids) == 1000 and all(runs.check_run_id(i) for i in ids)


def test_new_run_refuses_an_existing_folder(tmp_path: Path) -> None:
    with runs.claim(tmp_path / "r", runs.Mode.NEW) as run_dir:
        (run_dir / "rounds.csv").write_text("precious\n")
    with pytest.raises(runs.RunFolderError, match="already exists: --resume r continues it, --overwrite"):
        runs.check_target(tmp_path / "r", runs.Mode.NEW)
    with (
        pytest.raises(runs.RunFolderError, match="already exists"),
        runs.claim(tmp_path / "r", runs.Mode.NEW),
    ):
        pass
    assert (tmp_path / "r" / "rounds.csv").read_text() == "precious\n"


def test_overwrite_removes_only_fedtail_runs(tmp_path: Path) -> None:
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    with (
        pytest.raises(runs.RunFolderError, match="not a folder fedtail created"),
        runs.claim(mine, runs.Mode.OVERWRITE),
    ):
        pass
    assert (mine / "thesis.tex").read_text() == "years of work\n"

    with runs.claim(tmp_path / "r", runs.Mode.NEW) as run_dir:
        (run_dir / "old.csv").write_text("old\n")
    with runs.claim(tmp_path / "r", runs.Mode.OVERWRITE) as run_dir:
        assert sorted(p.name for p in run_dir.iterdir()) == [runs.MARKER]


def test_overwrite_refuses_a_symlinked_run(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    with runs.claim(target, runs.Mode.NEW):
        (target / "data.npy").write_text("keep\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").symlink_to(target)
    with pytest.raises(runs.RunFolderError, match="symbolic link"):
        runs.check_target(tmp_path / "runs" / "r", runs.Mode.OVERWRITE)
    assert (target / "data.npy").is_file()


def test_resume_needs_a_fedtail_run(tmp_path: Path) -> None:
    with pytest.raises(runs.RunFolderError, match="does not exist"):
        runs.check_target(tmp_path / "nope", runs.Mode.RESUME)
    (tmp_path / "plain").mkdir()
    with pytest.raises(runs.RunFolderError, match="not a fedtail run"):
        runs.check_target(tmp_path / "plain", runs.Mode.RESUME)


def test_a_run_has_one_writer_at_a_time(tmp_path: Path) -> None:
    with (
        runs.claim(tmp_path / "r", runs.Mode.NEW),
        pytest.raises(runs.RunFolderError, match=r"being written by process \d+"),
        runs.claim(tmp_path / "r", runs.Mode.RESUME),
    ):
        pass
    with runs.claim(tmp_path / "r", runs.Mode.RESUME):  # released on exit
        pass


def test_racing_starts_of_one_run_id_give_one_winner(tmp_path: Path) -> None:
    barrier = threading.Barrier(8)
    results: list[str] = []

    def start() -> None:
        barrier.wait()
        try:
            with runs.claim(tmp_path / "r", runs.Mode.NEW):
                results.append("won")
                barrier_done.wait()
        except runs.RunFolderError:
            results.append("refused")

    barrier_done = threading.Event()
    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    while len(results) < 8 and any(t.is_alive() for t in threads) and results.count("refused") < 7:
        threading.Event().wait(0.01)
    barrier_done.set()
    for t in threads:
        t.join(timeout=10)
    assert sorted(results) == ["refused"] * 7 + ["won"]


# ---- through the CLI, before any work --------------------------------------------------------------
def _cli(project: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(SMOKE),
        "--root",
        str(project),
        "--set",
        f"output.runs_dir={tmp_path / 'runs'}",
        "--set",
        f"output.artifacts_dir={tmp_path / 'artifacts'}",
        *extra,
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--run-id", "..", "--overwrite"],
        ["simulate", "--run-id", ".", "--overwrite"],
        ["simulate", "--run-id", "/tmp", "--overwrite"],
        ["simulate", "--run-id", "../../x", "--overwrite"],
        ["run", "--resume", ".."],
        ["run", "--resume", "/etc"],
        ["report", "--run-id", ".."],
    ],
)
def test_cli_refuses_paths_as_run_ids(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    before = sorted(p.name for p in project.iterdir())
    assert main([argv[0], *_cli(project, tmp_path, *argv[1:])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtail: ") and "Traceback" not in err
    assert "is not allowed" in err
    assert sorted(p.name for p in project.iterdir()) == before
    assert not (tmp_path / "runs").exists() and not (tmp_path / "artifacts").exists()


def test_cli_refuses_an_existing_run_without_resume_or_overwrite(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", *_cli(project, tmp_path, "--run-id", "a")]) == 0
    metrics = (tmp_path / "runs" / "a" / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(["simulate", *_cli(project, tmp_path, "--run-id", "a")]) == 2
    assert "already exists: --resume a continues it, --overwrite replaces it" in capsys.readouterr().err
    assert (tmp_path / "runs" / "a" / "metrics.json").read_bytes() == metrics
    assert main(["simulate", *_cli(project, tmp_path, "--run-id", "a", "--overwrite")]) == 0
    assert main(["run", *_cli(project, tmp_path, "--resume", "missing")]) == 2
    assert "cannot resume 'missing'" in capsys.readouterr().err
    user = tmp_path / "runs" / "mine"
    user.mkdir()
    assert main(["simulate", *_cli(project, tmp_path, "--run-id", "mine", "--overwrite")]) == 2
    assert "not a folder fedtail created" in capsys.readouterr().err and user.is_dir()


def test_cli_refuses_an_unusable_checkpoint_before_any_work(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A damaged checkpoint or an edited config.yaml stops `--resume` at once, with advice, no traceback."""
    from tests.conftest import crashed_run, smoke_config

    cfg = smoke_config(project, **{"output.runs_dir": str(tmp_path / "runs"), "output.run_id": "c"})
    run_dir = crashed_run(cfg, project, crash_at=2)
    good = (run_dir / "checkpoint.pt").read_bytes()
    args = ["run", "--config", str(SMOKE), "--root", str(project), "--resume", "c"]
    args += [
        "--set",
        f"output.runs_dir={tmp_path / 'runs'}",
        "--set",
        f"output.artifacts_dir={tmp_path / 'a'}",
    ]

    (run_dir / "checkpoint.pt").write_bytes(good[:1000])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt cannot be read" in err and "--overwrite" in err and "Traceback" not in err

    (run_dir / "checkpoint.pt").write_bytes(good)
    config = run_dir / "config.yaml"
    edited = re.sub(r"\bepochs: \d+", "epochs: 7", config.read_text())
    assert edited != config.read_text()
    config.write_text(edited)
    assert main(args) == 2
    assert "written with a different config" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # nothing staged or partitioned for a run that cannot resume


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_says_so_and_changes_nothing(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--resume` on a run that ended (its options left out, as the issue's replay run) exits 0 and
    touches no file; one whose report went missing gets that report and nothing else."""
    method = ["--set", "continual.method=replay"]
    assert main(["simulate", *_cli(project, tmp_path, "--run-id", "f", *method)]) == 0
    run_dir = tmp_path / "runs" / "f"
    assert main(["report", *_cli(project, tmp_path, "--run-id", "f")]) == 0
    before = _files(run_dir)
    capsys.readouterr()
    resume = ["run", "--root", str(project), "--set", f"output.runs_dir={tmp_path / 'runs'}", "--resume", "f"]
    assert main(resume) == 0
    out, err = capsys.readouterr()
    assert "run f finished already; nothing to resume" in out and not err
    assert _files(run_dir) == before
    assert main(["simulate", *_cli(project, tmp_path, "--run-id", "f", "--resume", *method)]) == 0
    assert "finished already" in capsys.readouterr().out
    assert _files(run_dir) == before

    (run_dir / "report.md").unlink()
    assert main(resume) == 0
    assert "writing its missing report" in capsys.readouterr().out
    assert _files(run_dir).keys() == before.keys()
    assert {k: v for k, v in _files(run_dir).items() if not k.startswith(("plots", "report"))} == {
        k: v for k, v in before.items() if not k.startswith(("plots", "report"))
    }


def test_taking_a_run_removes_the_temp_files_of_a_killed_writer_and_nothing_else(tmp_path: Path) -> None:
    """SIGKILL in the middle of an atomic write leaves its temp file; the next writer of the run (resume,
    report) deletes it: fedtail made it, and no other process writes the run while the lock is held."""
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "plots").mkdir(parents=True)
    (run_dir / runs.MARKER).write_text("fedtail run r\n")
    stale = [run_dir / ".checkpoint.pt.k3_x9ab2.tmp", run_dir / "plots" / ".rounds.png.a1b2c3d4.tmp"]
    kept = [run_dir / "notes.tmp", run_dir / ".hidden.tmp", run_dir / ".a.toolong123.tmp", run_dir / "x.csv"]
    for path in stale + kept:
        path.write_text("x")
    with runs.lock_run(run_dir):
        assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)
    elsewhere = tmp_path / "not-a-run"
    elsewhere.mkdir()
    (elsewhere / ".checkpoint.pt.k3_x9ab2.tmp").write_text("x")
    with runs.lock_run(elsewhere):
        assert (elsewhere / ".checkpoint.pt.k3_x9ab2.tmp").exists()  # no marker: not fedtail's folder


def test_an_interrupt_inside_a_writer_stays_an_interrupt(tmp_path: Path) -> None:
    """SIGTERM inside torch.save made its zip writer raise RuntimeError('unexpected pos ...') while
    unwinding: the run then ended with exit 1 and a traceback instead of exit 130 and the resume hint."""
    from fedtail import io

    def torn(fh: object) -> None:
        try:
            raise KeyboardInterrupt("signal 15")
        except KeyboardInterrupt:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 1728 vs 1622"
            ) from None

    target = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        io.write_with(target, torn)
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temp file

    def broken(fh: object) -> None:
        raise RuntimeError("a real failure")

    with pytest.raises(RuntimeError, match="a real failure"):
        io.write_with(target, broken)
