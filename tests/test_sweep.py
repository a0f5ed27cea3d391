"""Experiment grids: the sweep file is checked, expanded and run; finished runs are skipped, new cells run
alone, failures are rows; the table is the same whatever the number of workers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from fedtail import sweep
from fedtail.config import ConfigError
from flows.sweep import _Data, prepare
from tests.conftest import REPO


def _write(tmp_path: Path, project: Path, **spec) -> Path:
    data = {
        "base": str(REPO / "configs" / "smoke.yaml"),
        "set": {
            "output.data_dir": str(project / "data"),
            "output.artifacts_dir": str(project / "artifacts"),
            "tasks.classes_per_task": None,
            "federation.rounds_per_task": 1,
        },
        **spec,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"axes": {"seed": [0, 1]}}, "give seeds under 'seeds:'"),
        ({"metrics": ["accuracy"]}, "unknown metrics ['accuracy']; allowed: ['final_accuracy'"),
        ({"axes": {"partition.alpha": []}}, "axis 'partition.alpha' has no values"),
        ({"seeds": [1, 1]}, "seeds repeat"),
        ({"colour": 1}, "colour: unknown field"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_sweep_files_are_refused_naming_the_field(tmp_path: Path, spec: dict, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="invalid sweep") as err:
        sweep.load_sweep(path)
    assert message in str(err.value)


def test_invalid_cells_are_all_listed_before_anything_runs(tmp_path: Path, project: Path) -> None:
    path = _write(
        tmp_path, project, axes={"partition.alpha": [0.5, -1.0]}, variants={"ok": {}, "bad": {"train.lr": 0}}
    )
    with pytest.raises(sweep.InvalidCells) as err:
        sweep.expand(sweep.load_sweep(path), project, tmp_path / "s")
    text = str(err.value)
    assert text.startswith("3 sweep cell(s) are not valid configs; nothing was run")
    assert "partition.alpha=-1.0, variant='ok', seed=0" in text and "train.lr" in text
    assert not (tmp_path / "s").exists()


def test_expand_orders_cells_and_keys_runs_by_experiment(tmp_path: Path, project: Path) -> None:
    path = _write(
        tmp_path, project, axes={"partition.alpha": [0.5, 1.0]}, variants={"a": {}, "b": {}}, seeds=[3, 4]
    )
    cells = sweep.expand(sweep.load_sweep(path), project, tmp_path / "s")
    assert [(c.labels["partition.alpha"], c.labels["variant"], c.seed) for c in cells][:3] == [
        (0.5, "a", 3),
        (0.5, "a", 4),
        (0.5, "b", 3),
    ]
    assert len(cells) == 8 and all(c.config.seed == c.seed for c in cells)
    # variants a and b are the same experiment: the same run folder, so it runs once
    assert cells[0].run_id == cells[2].run_id != cells[1].run_id
    assert cells[0].config.output.runs_dir == str(tmp_path / "s" / "runs")


def test_run_ids_carry_the_data_version(tmp_path: Path, project: Path) -> None:
    """New data recorded in data.dvc gives new run folders: results of the old data are not reused."""
    text = (project / "data.dvc").read_text()
    md5 = yaml.safe_load(text)["outs"][0]["md5"]
    ids = []
    for name, recorded in (("old", md5), ("new", "0" * len(md5))):
        root = tmp_path / name
        root.mkdir()
        (root / "data.dvc").write_text(text.replace(md5, recorded))
        spec = sweep.load_sweep(_write(root, root, seeds=[0]))
        ids.append(sweep.expand(spec, root, tmp_path / "s")[0].run_id)
    old, new = ids
    assert old.startswith("r-") and new.split("-")[1] == old.split("-")[1]  # same experiment
    assert new != old and "unversioned" not in old + new


def test_summary_means_stds_and_best_per_direction() -> None:
    spec = sweep.SweepSpec(axes={"x": [1, 2]}, seeds=[0, 1], metrics=["final_accuracy", "forgetting"])
    cfg = None
    outcomes = [
        sweep.Outcome(sweep.Cell({"x": 1}, 0, cfg), "done", {"final_accuracy": 0.5, "forgetting": 0.1}),
        sweep.Outcome(sweep.Cell({"x": 1}, 1, cfg), "done", {"final_accuracy": 0.7, "forgetting": 0.3}),
        sweep.Outcome(sweep.Cell({"x": 2}, 0, cfg), "done", {"final_accuracy": 0.4, "forgetting": 0.0}),
        sweep.Outcome(sweep.Cell({"x": 2}, 1, cfg), "failed", error="boom"),
    ]
    rows = sweep.summary_rows(outcomes, spec)
    assert rows[0]["final_accuracy_mean"] == pytest.approx(0.6)
    assert rows[0]["final_accuracy_std"] == pytest.approx(math.sqrt(0.02))  # sample std
    assert (rows[1]["runs"], rows[1]["failed"]) == (1, 1) and math.isnan(rows[1]["final_accuracy_std"])
    assert sweep.best_index(rows, "final_accuracy") == 0 and sweep.best_index(rows, "forgetting") == 1
    text = sweep.summary_markdown(rows, spec, "t")
    assert "**0.6000 ± 0.1414**" in text and "| **0.0000** |" in text and "1 (1 failed)" in text
    adjusted = sweep.SweepSpec(axes={"x": [1]}, seeds=[0], metrics=["final_adjusted_accuracy"])
    text = sweep.summary_markdown(sweep.summary_rows(outcomes[:1], adjusted), adjusted, "t")
    assert text.splitlines()[4].endswith("| 1 | – |")  # a run without an adjustment did not fail


def _run(path: Path, project: Path, workers: int) -> tuple[Path, list[sweep.Outcome]]:
    spec = sweep.load_sweep(path)
    sweep_dir, cells = prepare(spec, "g", project)
    outcomes = sweep.run_cells(cells, project, _Data(project), workers)
    sweep.write_summary(sweep_dir, outcomes, spec, "g")
    return sweep_dir, outcomes


def test_sweep_runs_skips_finished_runs_adds_new_cells_and_reports_failures(
    tmp_path: Path, project: Path
) -> None:
    variants = {"plain": {}, "tiny": {"partition.alpha": 0.01, "partition.min_partition_size": 440}}
    path = _write(tmp_path, project, axes={"partition.alpha": [0.5]}, variants=variants, seeds=[0, 1])
    sweep_dir, first = _run(path, project, workers=2)
    assert [o.status for o in first] == ["done", "done", "failed", "failed"]
    assert first[2].error.startswith("ValueError: partition.min_partition_size=440 x federation.num_clients")
    summary = (sweep_dir / "summary.md").read_text()
    assert "| 0.5 | tiny | 0 (2 failed) | failed |" in summary and (sweep_dir / "plot.png").is_file()
    runs_csv = (sweep_dir / "runs.csv").read_text().splitlines()
    assert runs_csv[0].startswith("partition.alpha,variant,seed,run_id,status,final_accuracy")
    assert runs_csv[1].startswith("0.5,plain,0,r-")

    path = _write(tmp_path, project, axes={"partition.alpha": [0.5, 1.0]}, variants=variants, seeds=[0, 1])
    sweep_dir, second = _run(path, project, workers=1)
    assert [o.status for o in second] == [
        "skipped",
        "skipped",
        "failed",
        "failed",
        "done",
        "done",
        "failed",
        "failed",
    ]
    assert [o.metrics for o in second[:2]] == [o.metrics for o in first[:2]]
    assert all(not math.isnan(o.seconds) for o in second[:2])  # the finished runs' recorded wall time


def test_the_table_does_not_depend_on_the_number_of_workers(tmp_path: Path, project: Path) -> None:
    path = _write(tmp_path, project, axes={"partition.alpha": [0.3, 2.0]}, seeds=[0, 1])
    spec = sweep.load_sweep(path)
    tables = []
    for workers, where in ((1, "one"), (2, "two")):
        spec_dir = tmp_path / where
        cells = sweep.expand(spec, project, spec_dir)
        outcomes = sweep.run_cells(cells, project, _Data(project), workers)
        assert all(o.status == "done" for o in outcomes)
        sweep.write_summary(spec_dir, outcomes, spec, "t")
        tables.append((spec_dir / "summary.md").read_text())
    assert tables[0] == tables[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "fedtail sweep needs a sweep file"),
        (["{grid}", "--workers", "0"], "--workers 0: allowed 1..64"),
        (["{grid}", "--sweep-id", "a/b"], "--sweep-id 'a/b'"),
        (["{bad}"], "1 sweep cell(s) are not valid configs; nothing was run"),
        (["{missing}"], "does not exist"),
        (["--show", "nope"], "no sweep 'nope'"),
    ],
)
def test_cli_refuses_bad_input_before_any_work(
    tmp_path: Path, project: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    from fedtail.cli import main

    bad = _write(tmp_path, project, axes={"train.lr": [0.1, 0]}).rename(tmp_path / "bad.yaml")
    grid = _write(tmp_path, project)
    args = [a.format(grid=grid, bad=bad, missing=tmp_path / "missing.yaml") for a in args]
    rc = main(["sweep", *args, "--root", str(project), "--set", f"output.sweeps_dir={tmp_path / 'sweeps'}"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "sweeps").exists()
