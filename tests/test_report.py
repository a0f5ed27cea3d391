"""`write_report` on synthetic run folders: every figure is a real PNG and report.md carries the numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedtail.report import PLOT_FILES, class_totals, summary_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_png(path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")


def make_run(
    run_dir: Path,
    tasks: list[list[int]],
    rounds_per_task: int = 2,
    heatmap: bool = True,
    adjustment: str | None = None,
) -> dict:
    """A run folder shaped like simulate's output (tasks numbered from 1 in its files), with NaN recalls
    for classes not seen yet; ``heatmap``: with the partition's table, from which the report draws it."""
    rng = np.random.default_rng(0)
    n_classes = sum(len(t) for t in tasks)
    n_tasks = len(tasks)
    run_dir.mkdir(parents=True)
    rows = []
    for t in range(n_tasks):
        seen = [c for task in tasks[: t + 1] for c in task]
        for r in range(1, rounds_per_task + 1):
            row = {
                "task": t + 1,
                "round": r,
                "global_round": t * rounds_per_task + r,
                "num_sampled": 3,
                "num_clients": 3,
                "num_failed": 0,
                "num_rejected": 0,
                "train_loss": float(rng.uniform(0.1, 2.0)),
                "accuracy": float(rng.uniform(0.3, 0.9)),
                "balanced_accuracy": float(rng.uniform(0.3, 0.9)),
                "macro_f1": float(rng.uniform(0.3, 0.9)),
                "num_seen_classes": len(seen),
                "old_class_accuracy": float(rng.uniform(0.0, 0.5)) if t else math.nan,
                "new_class_accuracy": float(rng.uniform(0.5, 1.0)),
            }
            for c in range(n_classes):
                row[f"recall_{c}"] = float(rng.uniform(0, 1)) if c in seen else math.nan
            rows.append(row)
    pd.DataFrame(rows).to_csv(run_dir / "rounds.csv", index=False, float_format="%.6f")

    acc = np.full((n_tasks, n_tasks), np.nan)
    for i in range(n_tasks):
        acc[i, : i + 1] = rng.uniform(0.2, 0.95, size=i + 1)
    matrix = pd.DataFrame(acc, columns=[f"task_{j + 1}" for j in range(n_tasks)], index=range(1, n_tasks + 1))
    matrix.index.name = "after_task"
    matrix.to_csv(run_dir / "accuracy_matrix.csv", float_format="%.6f")
    task_rows = [
        {
            "task": t + 1,
            "classes": " ".join(map(str, tasks[t])),
            "accuracy": acc[t, : t + 1].mean(),
            "old_class_accuracy": acc[t, :t].mean() if t else math.nan,
            "new_class_accuracy": acc[t, t],
            "accuracy_now": acc[-1, t],
            "forgetting": acc[t:-1, t].max() - acc[-1, t] if t < n_tasks - 1 else math.nan,
            "memory_samples": 40 * t,
        }
        for t in range(n_tasks)
    ]
    pd.DataFrame(task_rows).to_csv(run_dir / "tasks.csv", index=False, float_format="%.6f")

    counts = rng.integers(0, 60, size=(3, n_classes))
    stats = pd.DataFrame(
        counts, columns=[str(c) for c in range(n_classes)], index=[f"client_{k}" for k in range(3)]
    )
    stats["total"] = counts.sum(axis=1)
    stats.index.name = "client"
    if heatmap:
        stats.to_csv(run_dir / "partition_stats.csv")

    order = [c for task in tasks for c in task]
    (run_dir / "schedule.json").write_text(json.dumps({"class_order": order, "tasks": tasks}))
    (run_dir / "config.yaml").write_text(
        "seed: 0\ndataset: {name: digits}\npartition: {method: dirichlet, alpha: 0.5}\n"
        f"tasks: {{classes_per_task: {len(tasks[0])}}}\nfederation: {{num_clients: 3, rounds_per_task: 2}}\n"
        "strategy: {name: fedavg, options: {}}\n"
        f"evaluation: {{adjustment: {adjustment or 'none'}}}\n"
    )
    for file in ["confusion_matrix.csv"] + (["confusion_matrix_adjusted.csv"] if adjustment else []):
        cm = pd.DataFrame(
            rng.integers(0, 9, size=(n_classes, n_classes)), columns=[f"pred_{c}" for c in order], index=order
        )
        cm.index.name = "true"
        cm.to_csv(run_dir / file)
    metrics = {
        "final_accuracy": 0.8123,
        "final_balanced_accuracy": 0.7345,
        "final_macro_f1": 0.7001,
        "final_g_mean": 0.5512,
        "final_tail_accuracy": 0.3101,
        "final_client_accuracy_worst10": 0.2202,
        **(
            {"final_adjusted_balanced_accuracy": 0.7901, "final_adjusted_tail_accuracy": 0.5203}
            if adjustment
            else {}
        ),
        "average_incremental_accuracy": 0.6512,
        "final_average_accuracy": 0.6011,
        "forgetting": 0.2345 if n_tasks > 1 else math.nan,
        "backward_transfer": -0.1987 if n_tasks > 1 else math.nan,
        "num_tasks": n_tasks,
        "rounds_per_task": rounds_per_task,
        "num_clients": 3,
        "dataset": "digits",
        "strategy": "fedavg",
        "objective": "ce",
        "continual_method": "finetune",
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "timing.json").write_text(json.dumps({"engine": "inprocess", "simulate_seconds": 1.5}))
    return metrics


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 100 and data.startswith(PNG_MAGIC), path


def test_report_three_tasks(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r1"
    make_run(run_dir, [[3, 1, 4], [0, 5, 2], [8, 6, 7]], rounds_per_task=2)
    report = write_report(run_dir)

    assert report == run_dir / "report.md"
    plain = {k: v for k, v in PLOT_FILES.items() if k != "pseudo_labels"}  # semi-supervised runs only
    for name in plain.values():
        _assert_png(run_dir / "plots" / name)
    text = report.read_text()
    for key in ("final_balanced_accuracy", "forgetting", "backward_transfer"):
        assert key in text
    for value in ("0.8123", "0.7345", "0.2345", "-0.1987", "fedavg", "dirichlet"):
        assert value in text
    for name in plain.values():
        assert f"](plots/{name})" in text
    assert "| task 3 |" in text  # accuracy matrix table, last row
    tasks_table = text.split("## Tasks")[1].split("##")[0]
    assert "| 3 | 8 6 7 |" in tasks_table and "memory (samples)" in tasks_table
    assert "simulate_seconds" not in text  # wall time would make the report irreproducible
    assert not list(run_dir.rglob("*.tmp"))  # atomic writes left no temp files


def test_report_single_task_no_partition_heatmap(tmp_path: Path) -> None:
    run_dir = tmp_path / "plain"
    make_run(run_dir, [list(range(10))], rounds_per_task=3, heatmap=False)
    text = write_report(run_dir).read_text()

    for name in ("balanced_accuracy", "per_class_recall"):
        _assert_png(run_dir / "plots" / PLOT_FILES[name])
    assert not (run_dir / "plots" / PLOT_FILES["partition"]).exists()
    assert not (run_dir / "plots" / PLOT_FILES["accuracy_matrix"]).exists()  # no 1 x 1 matrix for plain FL
    assert "partition.png" not in text
    assert "forgetting | –" in text  # NaN shown as a dash, not 'nan'
    assert "## Tasks" not in text and not (run_dir / "plots" / PLOT_FILES["old_new"]).exists()


def test_summary_markdown_and_totals(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    make_run(run_dir, [[0, 1], [2, 3]])
    md = summary_markdown(run_dir)
    assert md.startswith("# fedtail run `r`")
    assert "![" not in md  # no relative images in the Prefect artifact
    totals = class_totals(run_dir)
    stats = pd.read_csv(run_dir / "partition_stats.csv", index_col=0)
    assert totals is not None and totals.loc[2] == stats["2"].sum()


def test_report_requires_a_finished_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        write_report(tmp_path / "empty")
    assert not (tmp_path / "empty" / "plots").exists()


def test_report_shows_failed_and_rejected_client_updates(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    make_run(run_dir, [[0, 1], [2, 3]])
    clean = summary_markdown(run_dir)
    assert "| 12 | 12 | 0 | 0 | 0 |" in clean and "Rounds in which" not in clean
    rounds = pd.read_csv(run_dir / "rounds.csv")
    rounds.loc[2, ["num_clients", "num_failed", "num_rejected"]] = [1, 1, 1]
    rounds.to_csv(run_dir / "rounds.csv", index=False)
    md = summary_markdown(run_dir)
    assert "| 12 | 10 | 1 | 1 | 0 |" in md  # sampled, aggregated, failed, rejected, no data
    assert "| 2 | 1 | 3 | 3 | 1 | 1 | 1 |" in md  # task 2 round 1 (global round 3) lost two updates


def test_headline_shows_plain_and_adjusted_side_by_side(tmp_path: Path) -> None:
    run_dir = tmp_path / "adj"
    make_run(run_dir, [list(range(4))], adjustment="posthoc_la")
    text = write_report(run_dir).read_text()
    headline = text.split("## Headline")[1].split("## Metrics")[0]
    assert "| metric | plain | adjusted (posthoc_la) |" in headline
    assert "| balanced accuracy ↑ | 0.7345 | 0.7901 |" in headline
    assert "| tail (few-shot) accuracy ↑ | 0.3101 | 0.5203 |" in headline
    assert "| client accuracy, worst 10 % ↑ | 0.2202 | – |" in headline
    assert "continual metric" not in headline  # one task: no continual table
    _assert_png(run_dir / "plots" / PLOT_FILES["confusion_matrix"])
    plain = tmp_path / "plain"
    make_run(plain, [[0, 1], [2, 3]])
    text = summary_markdown(plain)
    assert "| metric | plain |\n" in text and "adjusted" not in text.split("## Metrics")[0]
    assert "| forgetting ↓ | 0.2345 |" in text
