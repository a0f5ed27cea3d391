"""Resume is a promise for every plug-in as shipped: each registered continual method, objective,
partitioner, strategy and evaluation-time adjustment, at its default options (left out of the config, as
a user leaves them), is stopped by SIGTERM and then by SIGKILL at random rounds, resumed the way
`fedtail run --resume` resumes (from the run's own config.yaml), and must leave the files of the
uninterrupted run, byte for byte (both runs on this machine's CPU kernels).

The cases are read from the registries (tests/plugins.py), so a new plug-in is covered without editing
this file. Runs are forks of a forkserver that imported torch and Flower once (tests/apps/interruptible.py).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedtail import pipeline, runs
from fedtail.config import load_config
from server.recorder import CHECKPOINT
from tests.apps import interruptible
from tests.conftest import smoke_config
from tests.plugins import CASES, Case

TOTAL_ROUNDS = 6  # room for two interrupts: the smoke config's 2 tasks x 3 rounds (one task: 6 rounds)
ROUND_DELAY = 0.05  # seconds each round sleeps after its checkpoint, so the signals land mid-run
UNCOMPARED = ("timing.json", "config.yaml")  # wall time; config.yaml names its runs_dir (compared below)

_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload([interruptible.__name__])


def _unique(cases: list[Case]) -> list[Case]:
    """Plug-ins that are the smoke config's own defaults (ce, finetune, fedavg, ...) give one config."""
    seen, out = set(), []
    for case in cases:
        key = smoke_config(Path("/p"), **case.overrides).experiment_fingerprint()
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


def _rounds_done(run_dir: Path) -> int:
    path = run_dir / "rounds.csv"
    return max(len(path.read_text().splitlines()) - 1, 0) if path.is_file() else 0


def _files(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name not in UNCOMPARED
    }


def _first_difference(name: str, ours: bytes, theirs: bytes) -> str:
    """Where a file differs from the reference: its first differing line, for a text file."""
    if not name.endswith((".csv", ".json", ".md")):
        return f"{name} differs"
    pairs = zip(ours.decode().splitlines(), theirs.decode().splitlines(), strict=False)
    line, (a, b) = next(((i, p) for i, p in enumerate(pairs, 1) if p[0] != p[1]), (0, ("", "")))
    return f"{name} line {line}: resumed {a[:300]!r} vs uninterrupted {b[:300]!r}"


def _interrupt(
    project: Path, overrides: dict, mode: str, run_dir: Path, at: int, sig: int, rng: random.Random
) -> int:
    """Start a run, wait for round ``at`` to be recorded, send ``sig`` a random instant later (inside the
    round delay or the next round); returns the exit code."""
    proc = _CONTEXT.Process(
        target=interruptible.run,
        args=(str(project), overrides, mode, ROUND_DELAY, torch.get_num_threads()),
    )
    proc.start()
    deadline = time.monotonic() + 120
    while _rounds_done(run_dir) < at and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.is_alive(), f"the run ended (exit {proc.exitcode}) before round {at} was interrupted"
    time.sleep(rng.uniform(0.0, 2 * ROUND_DELAY))  # at least two rounds (and their delays) are left
    os.kill(proc.pid, sig)
    proc.join(60)
    assert proc.exitcode is not None, "the run did not stop"
    return proc.exitcode


SETTINGS_WITH_STATE = [Case("train", "keep_optimizer_state", {"train.keep_optimizer_state": True})]
"""Settings that are no plug-in but keep client state across rounds, resumed like the plug-ins."""


@pytest.mark.parametrize("case", _unique(CASES) + SETTINGS_WITH_STATE, ids=lambda c: c.id)
def test_every_plugin_resumes_after_sigterm_and_sigkill_byte_for_byte(
    project: Path, tmp_path: Path, case: Case
) -> None:
    seed = int(os.environ.get("FEDTAIL_TEST_SEED") or random.randrange(2**32))  # rerun a failure exactly
    rng = random.Random(seed)
    print(f"{case.id}: random interrupts from seed {seed}")
    tasks = smoke_config(project, **case.overrides).num_tasks
    rounds = -(-TOTAL_ROUNDS // tasks)
    base = {"federation.rounds_per_task": rounds, "output.run_id": "r", **case.overrides}
    reference_cfg = smoke_config(project, **base, **{"output.runs_dir": str(tmp_path / "reference")})
    total = reference_cfg.num_tasks * reference_cfg.task_rounds
    staged = pipeline.stage(reference_cfg, project)
    parts = pipeline.partition(reference_cfg, staged, project)
    reference = pipeline.simulate(reference_cfg, staged, parts, pipeline.new_run_dir(reference_cfg, project))

    overrides = {**base, "output.runs_dir": str(tmp_path / "runs")}
    run_dir = tmp_path / "runs" / "r"
    first = rng.randint(1, total // 2 - 1)
    code = _interrupt(project, overrides, "new", run_dir, first, signal.SIGTERM, rng)
    assert code == 130, f"SIGTERM should stop the run as Ctrl-C does (exit 130), got {code}"
    assert (run_dir / CHECKPOINT).is_file() and not (run_dir / "metrics.json").exists()
    second = rng.randint(min(max(first, _rounds_done(run_dir)) + 1, total - 2), total - 2)
    code = _interrupt(project, overrides, "resume", run_dir, second, signal.SIGKILL, rng)
    assert code == -signal.SIGKILL and not (run_dir / "metrics.json").exists()

    resumed = load_config(run_dir / "config.yaml")  # what `fedtail run --resume r` reads
    pipeline.check_run_target(resumed, run_dir, runs.Mode.RESUME)
    pipeline.simulate(resumed, staged, parts, run_dir, mode=runs.Mode.RESUME)
    ours, theirs = _files(run_dir), _files(reference)
    assert ours.keys() == theirs.keys()
    differ = [name for name in ours if ours[name] != theirs[name]]
    assert not differ, f"FEDTAIL_TEST_SEED={seed}, interrupts after rounds {first}, {second}: " + "; ".join(
        _first_difference(name, ours[name], theirs[name]) for name in differ
    )
    configs = [yaml.safe_load((d / "config.yaml").read_text()) for d in (run_dir, reference)]
    assert [{**c, "output": None} for c in configs[:1]] == [{**configs[1], "output": None}]


@pytest.mark.parametrize(
    ("writer", "when"),
    [
        ("_write_rounds", "after the last round's checkpoint"),
        ("_write_tasks", "after the last task's checkpoint"),
    ],
)
def test_a_kill_between_the_last_checkpoint_and_its_csv_still_resumes_to_the_same_files(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str, when: str
) -> None:
    """Found by the random interrupts above: killed ``when``, the resumed run had no round (or task) left
    to record, so rounds.csv lacked its last row (or tasks.csv its last task); `finish` now writes both."""
    from server.recorder import RunRecorder

    cfg = smoke_config(project, **{"output.run_id": "r", "output.runs_dir": str(tmp_path / "ref")})
    staged = pipeline.stage(cfg, project)
    parts = pipeline.partition(cfg, staged, project)
    reference = pipeline.simulate(cfg, staged, parts, pipeline.new_run_dir(cfg, project))

    cfg = smoke_config(project, **{"output.run_id": "r", "output.runs_dir": str(tmp_path / "runs")})
    total = cfg.num_tasks * cfg.task_rounds
    original = getattr(RunRecorder, writer)

    def killed_at_the_end(self: RunRecorder) -> None:
        if len(self.rows) == total and self.tasks_done == (cfg.num_tasks if writer == "_write_tasks" else 1):
            raise KeyboardInterrupt(when)  # as a kill there: the checkpoint is written, the csv is not
        original(self)

    monkeypatch.setattr(RunRecorder, writer, killed_at_the_end)
    run_dir = pipeline.new_run_dir(cfg, project)
    with pytest.raises(KeyboardInterrupt):
        pipeline.simulate(cfg, staged, parts, run_dir)
    monkeypatch.setattr(RunRecorder, writer, original)
    pipeline.simulate(cfg, staged, parts, run_dir, mode=runs.Mode.RESUME)
    ours, theirs = _files(run_dir), _files(reference)
    assert [name for name in theirs if ours.get(name) != theirs[name]] == []
