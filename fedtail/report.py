"""Plots and ``report.md`` for a finished run folder, read back from the files the run wrote.

The report only reads files (``rounds.csv``, ``metrics.json``, ``accuracy_matrix.csv``, ...), so it can be
rebuilt for any old run, by DVC's report stage, the Prefect flow or by hand. Figures use the Agg canvas
directly (no pyplot global state), and every file is written atomically.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from fedtail import io

PLOTS_DIR = "plots"
PLOT_FILES = {
    "balanced_accuracy": "balanced_accuracy.png",
    "per_class_recall": "per_class_recall.png",
    "accuracy_matrix": "accuracy_matrix.png",
    "partition": "partition.png",
    "confusion_matrix": "confusion_matrix.png",
    "old_new": "old_new_accuracy.png",
    "pseudo_labels": "pseudo_labels.png",
}
TASK_COLUMNS = (
    ("task", "task"),
    ("classes", "classes"),
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced acc."),
    ("old_class_accuracy", "old classes"),
    ("new_class_accuracy", "new classes"),
    ("tail_accuracy", "tail acc."),
    ("accuracy_now", "task's accuracy now"),
    ("forgetting", "forgetting"),
    ("memory_samples", "memory (samples)"),
    ("max_client_memory_bytes", "largest client memory (bytes)"),
)
"""tasks.csv columns the report shows (of those a run has), with their headers."""
CONFUSION_FILES = {"plain": "confusion_matrix.csv", "adjusted": "confusion_matrix_adjusted.csv"}
RECALL_PREFIX = "recall_"


# ---- reading a run folder ------------------------------------------------------------------------
def _need(run_dir: Path, name: str) -> Path:
    path = run_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a finished fedtail run folder")
    return path


def read_rounds(run_dir: Path) -> pd.DataFrame:
    """``rounds.csv`` as a frame; recall columns of classes not seen yet are NaN."""
    frame = pd.read_csv(_need(Path(run_dir), "rounds.csv"))
    if frame.empty:
        raise ValueError(f"{Path(run_dir) / 'rounds.csv'} has no rounds")
    return frame


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads(_need(Path(run_dir), "metrics.json").read_text())


def read_accuracy_matrix(run_dir: Path) -> pd.DataFrame | None:
    path = Path(run_dir) / "accuracy_matrix.csv"
    return pd.read_csv(path, index_col="after_task") if path.is_file() else None


def read_tasks(run_dir: Path) -> pd.DataFrame | None:
    path = Path(run_dir) / "tasks.csv"
    return pd.read_csv(path) if path.is_file() else None


def read_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config as plain data; not re-validated, so old runs still report."""
    path = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def read_schedule(run_dir: Path) -> list[list[int]] | None:
    path = Path(run_dir) / "schedule.json"
    return [list(t) for t in json.loads(path.read_text())["tasks"]] if path.is_file() else None


def class_totals(run_dir: Path) -> pd.Series | None:
    """Training samples per class summed over clients (after the long tail), from partition_stats.csv."""
    path = Path(run_dir) / "partition_stats.csv"
    if not path.is_file():
        return None
    stats = pd.read_csv(path, index_col=0)
    counts = stats.drop(columns=["total"], errors="ignore").sum(axis=0)
    counts.index = counts.index.astype(int)
    return counts.astype(int)


def final_recall(rounds: pd.DataFrame) -> pd.Series:
    """Per-class recall of the last round, indexed by class id."""
    cols = [c for c in rounds.columns if c.startswith(RECALL_PREFIX)]
    last = rounds.iloc[-1][cols].astype(float)
    last.index = [int(c.removeprefix(RECALL_PREFIX)) for c in cols]
    return last


UI_COLUMNS = (
    "task", "stage", "round", "global_round", "balanced_accuracy", "accuracy", "macro_f1", "train_loss",
    "old_class_accuracy", "new_class_accuracy", "g_mean", "tail_accuracy", "num_clients", "num_failed",
    "num_rejected",
)  # fmt: skip
"""The per-round columns a UI table shows (besides each class's recall)."""


def ui_rounds(rows: Sequence[dict[str, Any]], digits: int = 4) -> list[dict[str, Any]]:
    """Per-round rows as the run's files number them (`fedtail.runs.public_rows`) for a UI table:
    numbers rounded to ``digits``, the per-class recalls kept (``recall_<class>``), precisions and
    adjusted metrics left to rounds.csv; NaN as None (JSON-safe)."""
    out = []
    for row in rows:
        item: dict[str, Any] = {}
        for key, value in row.items():
            if key not in UI_COLUMNS and not key.startswith(RECALL_PREFIX):
                continue
            if key in ("task", "round", "global_round"):
                value = int(value)
            elif isinstance(value, float | np.floating):
                value = None if math.isnan(value) else round(float(value), digits)
            elif isinstance(value, np.integer):
                value = int(value)
            item[key] = value
        out.append(item)
    return out


def rounds_table(run_dir: Path) -> list[dict[str, Any]]:
    """`ui_rounds` of the run's ``rounds.csv``."""
    return ui_rounds(read_rounds(run_dir).to_dict("records"))


# ---- formatting ----------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return "–"
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3g}"
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _config_essentials(cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    """The settings that tell runs apart, as (dotted key, value); missing keys are skipped."""
    keys = (
        "seed",
        "dataset.name",
        "partition.method",
        "partition.alpha",
        "partition.imbalance_factor",
        "partition.labeled_fraction",
        "tasks.classes_per_task",
        "federation.num_clients",
        "federation.rounds_per_task",
        "federation.fraction_train",
        "strategy.name",
        "strategy.options",
        "train.objective",
        "train.epochs",
        "train.optimizer",
        "train.lr",
        "continual.method",
        "model.name",
        "engine.name",
    )
    out = []
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node != {}:
            out.append((key, node))
    return out


UPDATE_COUNTS = ("num_sampled", "num_clients", "num_failed", "num_rejected")


def client_updates_markdown(rounds: pd.DataFrame) -> list[str]:
    """Totals of sampled / aggregated / failed / rejected client updates, and the rounds that lost some."""
    if not set(UPDATE_COUNTS) <= set(rounds.columns):
        return []  # a run recorded before these columns existed
    sampled, aggregated, failed, rejected = (int(rounds[c].sum()) for c in UPDATE_COUNTS)
    no_data = sampled - aggregated - failed - rejected
    parts = [
        "## Client updates",
        _table(
            ["sampled", "aggregated", "failed", "rejected", "no data for the task"],
            [[sampled, aggregated, failed, rejected, no_data]],
        ),
    ]
    lost = rounds[(rounds["num_failed"] > 0) | (rounds["num_rejected"] > 0)]
    if len(lost):
        cols = ["task", "round", "global_round", *UPDATE_COUNTS]
        parts += [
            "Rounds in which client updates failed (error or no reply in time) or were rejected "
            "(wrong keys or shapes, NaN/Inf); their reasons are in the run's log:",
            _table(cols, lost[cols].to_numpy().tolist()),
        ]
    return parts


HEADLINE = (
    ("balanced_accuracy", "balanced accuracy ↑"),
    ("accuracy", "accuracy ↑"),
    ("macro_f1", "macro-F1 ↑"),
    ("g_mean", "G-mean ↑"),
    ("head_accuracy", "head (many-shot) accuracy ↑"),
    ("medium_accuracy", "medium-shot accuracy ↑"),
    ("tail_accuracy", "tail (few-shot) accuracy ↑"),
    ("ece", "ECE (15 bins) ↓"),
    ("auroc", "macro AUROC (one-vs-rest) ↑"),
    ("auprc", "macro AUPRC (one-vs-rest) ↑"),
    ("client_accuracy_mean", "client accuracy, mean ↑"),
    ("client_accuracy_std", "client accuracy, std ↓"),
    ("client_accuracy_worst10", "client accuracy, worst 10 % ↑"),
)
CONTINUAL_HEADLINE = (
    ("average_incremental_accuracy", "average incremental accuracy ↑"),
    ("final_average_accuracy", "final average accuracy ↑"),
    ("forgetting", "forgetting ↓"),
    ("backward_transfer", "backward transfer ↑"),
)


def headline_markdown(metrics: dict[str, Any], adjustment: str | None) -> list[str]:
    """The final model's imbalance metrics, plain and (with an evaluation-time adjustment) adjusted side
    by side, then the continual metrics of a multi-task run."""
    adjusted = adjustment not in (None, "none")
    header = ["metric", "plain"] + ([f"adjusted ({adjustment})"] if adjusted else [])
    rows = []
    for key, label in HEADLINE:
        if f"final_{key}" not in metrics:
            continue
        row = [label, _num(metrics[f"final_{key}"])]
        if adjusted:
            row.append(_num(metrics.get(f"final_adjusted_{key}")))
        rows.append(row)
    parts = [
        "## Headline",
        "The final global model on the test classes seen so far. Head / medium / tail: classes with more "
        "than `evaluation.many_shot`, between, and fewer than `evaluation.few_shot` training samples. "
        "Client accuracy: each client's accuracy on a test set with its own label distribution.",
        _table(header, rows),
    ]
    if int(metrics.get("num_tasks", 1) or 1) > 1:
        parts.append(
            _table(
                ["continual metric", "value"], [[lbl, _num(metrics.get(k))] for k, lbl in CONTINUAL_HEADLINE]
            )
        )
    return parts


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def summary_markdown(run_dir: Path) -> str:
    """Metrics, config essentials, accuracy matrix and last round as markdown (no images).

    Shared by ``report.md`` and the Prefect markdown artifact, where relative image links would not load.
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    rounds = read_rounds(run_dir)
    matrix = read_accuracy_matrix(run_dir)
    adjustment = (read_config(run_dir).get("evaluation") or {}).get("adjustment")
    parts = [
        f"# fedtail run `{run_dir.name}`",
        *headline_markdown(metrics, adjustment),
        "## Metrics",
        _table(["metric", "value"], list(metrics.items())),
    ]
    essentials = _config_essentials(read_config(run_dir))
    if essentials:
        parts += ["## Configuration", _table(["setting", "value"], essentials)]
    if matrix is not None and len(matrix) > 1:
        parts += [
            "## Accuracy matrix",
            "Row *i*: accuracy on each task's test classes after training task *i* (– = not trained yet).",
            _table(
                ["after task", *matrix.columns],
                [[f"task {i}", *row] for i, row in zip(matrix.index, matrix.to_numpy(), strict=True)],
            ),
        ]
    tasks = read_tasks(run_dir)
    if tasks is not None and len(tasks) > 1:
        shown = [(c, h) for c, h in TASK_COLUMNS if c in tasks.columns]
        parts += [
            "## Tasks",
            "Each task at its end (accuracy over the classes seen by then; old / new: the earlier tasks' "
            "classes vs its own), its accuracy and forgetting after the last task, and the memory the "
            "clients kept for the continual method.",
            _table([h for _, h in shown], tasks[[c for c, _ in shown]].to_numpy().tolist()),
        ]
    parts += client_updates_markdown(rounds)
    last = rounds.iloc[-1:].to_dict("records")[0]  # keeps each column's dtype (ints stay ints)
    main = [(c, v) for c, v in last.items() if not c.startswith(RECALL_PREFIX)]
    parts += ["## Last round", _table(["column", "value"], main)]
    parts += classes_markdown(final_recall(rounds), class_totals(run_dir), read_schedule(run_dir))
    return "\n\n".join(parts) + "\n"


def classes_markdown(
    recall: pd.Series, totals: pd.Series | None, schedule: list[list[int]] | None
) -> list[str]:
    """Per class, head to tail by training count: the task that brings it, its training samples and its
    recall after the last round."""
    if not len(recall):
        return []
    order = list(recall.index)
    if totals is not None:
        order = sorted(order, key=lambda c: (-int(totals.get(c, 0)), c))
    task_of = class_tasks(schedule)
    rows = [
        [
            c,
            task_of.get(int(c), "–"),
            int(totals.get(c, 0)) if totals is not None else "–",
            float(recall.loc[c]),
        ]
        for c in order
    ]
    return [
        "## Classes",
        "Head to tail by training samples (summed over clients): the task that brings each class and its "
        "recall after the last round.",
        _table(["class", "task", "training samples", "recall"], rows),
    ]


# ---- figures -------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    return io.write_with(path, functools.partial(fig.savefig, format="png", dpi=110))


def plot_accuracy_curve(rounds: pd.DataFrame, schedule: list[list[int]] | None, path: Path) -> Path:
    """Balanced vs plain accuracy per global round; dashed lines mark where a new task starts."""
    series = [("balanced_accuracy", "balanced accuracy", "o"), ("accuracy", "accuracy", "s")]
    return plot_round_curves(rounds, schedule, path, series, "Accuracy on the classes seen so far")


def plot_round_curves(
    rounds: pd.DataFrame,
    schedule: list[list[int]] | None,
    path: Path,
    series: list[tuple[str, str, str]],
    title: str,
    ylabel: str = "score on seen classes",
) -> Path:
    """``(column, label, marker)`` curves per global round; dashed lines mark where a new task starts."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(8.0, 4.2)
    ax = fig.add_subplot()
    x = rounds["global_round"].to_numpy()
    for i, (column, label, marker) in enumerate(series):
        ax.plot(x, rounds[column], marker=marker, ms=3, alpha=1.0 if i == 0 else 0.7, label=label)
    ax.set_xlim(x.min() - 0.5, x.max() + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("global round")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0.0, 1.15)
    ax.grid(alpha=0.3)
    spans = rounds.groupby("task")["global_round"].agg(["min", "max"])
    for task, (lo, hi) in spans.iterrows():
        if lo > x.min():
            ax.axvline(lo - 0.5, color="grey", ls="--", lw=1)
        label, k = f"task {task}", int(task) - 1  # rounds.csv numbers tasks from 1
        if schedule is not None and 0 <= k < len(schedule) and len(schedule[k]) <= 4:
            label += "\n" + ",".join(map(str, schedule[k]))
        ax.text((lo + hi) / 2, 1.13, label, ha="center", va="top", fontsize=8, color="dimgrey")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def class_tasks(schedule: list[list[int]] | None) -> dict[int, int]:
    """Class -> the task (numbered from 1) that brings it; empty without a schedule."""
    return {int(c): k + 1 for k, classes in enumerate(schedule or []) for c in classes}


def plot_per_class_recall(
    recall: pd.Series, totals: pd.Series | None, path: Path, schedule: list[list[int]] | None = None
) -> Path:
    """Final recall per class, head to tail by training count: the long-tail effect in one picture; with
    several tasks each bar is coloured by the task that brought its class."""
    order = list(recall.index)
    if totals is not None:
        order = sorted(order, key=lambda c: (-int(totals.get(c, 0)), c))
    n = len(order)
    fig = _figure(min(3.0 + 0.45 * n, 20.0), 4.2)
    ax = fig.add_subplot()
    values = np.nan_to_num(recall.loc[order].to_numpy(dtype=float), nan=0.0)
    task_of = class_tasks(schedule) if schedule is not None and len(schedule) > 1 else {}
    palette = [f"C{(task_of.get(int(c), 1) - 1) % 10}" for c in order] if task_of else "tab:blue"
    bars = ax.bar(range(n), values, color=palette)
    if task_of:
        from matplotlib.patches import Patch

        tasks = sorted(set(task_of.values()))
        handles = [Patch(color=f"C{(k - 1) % 10}", label=f"task {k}") for k in tasks]
        ax.legend(handles=handles, fontsize=7, ncol=min(len(tasks), 10), loc="upper right", title="class of")
    ax.set_xticks(range(n), [str(c) for c in order], rotation=90 if n > 20 else 0, fontsize=8)
    if task_of:
        for label, colour in zip(ax.get_xticklabels(), palette, strict=True):
            label.set_color(colour)  # a class with no recall has no bar to colour
            label.set_fontweight("bold")
    ax.set_xlabel("class (head → tail)" if totals is not None else "class")
    ax.set_ylabel("final recall")
    ax.set_ylim(0.0, 1.15)
    ax.grid(axis="y", alpha=0.3)
    if totals is not None:
        for bar, c in zip(bars, order, strict=True):
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                bar.get_height() + 0.02,
                f"n={int(totals.get(c, 0))}",
                ha="center",
                va="bottom",
                fontsize=6 if n > 20 else 7,
                rotation=90 if n > 20 else 0,
            )
    for i, c in enumerate(order):
        if math.isnan(float(recall.loc[c])):
            ax.text(i, 0.02, "n/a", ha="center", va="bottom", fontsize=7, color="grey")
    ax.set_title("Per-class recall after the last round (n = training samples of the class)")
    return _save(fig, path)


def plot_accuracy_matrix(matrix: pd.DataFrame, path: Path) -> Path:
    """T x T heatmap of task accuracies; cells of tasks not trained yet stay blank."""
    values = matrix.to_numpy(dtype=float)
    t = values.shape[0]
    side = min(2.5 + 0.7 * t, 14.0)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_xticks(range(values.shape[1]), [c.removeprefix("task_") for c in matrix.columns])
    ax.set_yticks(range(t), [str(i) for i in matrix.index])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    if t <= 20:
        for (i, j), v in np.ndenumerate(values):
            if not math.isnan(v):
                colour = "black" if v > 0.5 else "white"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color=colour)
    ax.set_title("Accuracy matrix")
    return _save(fig, path)


def plot_partition(stats: Path, cfg: dict[str, Any], path: Path) -> Path:
    """The clients x classes training counts of the run's partition (`partition_stats.csv`), drawn as the
    partition stage draws them."""
    from fedtail.partition import heatmap_writer

    frame = pd.read_csv(stats, index_col=0)
    counts = frame.drop(columns=[c for c in ("total",) if c in frame.columns]).to_numpy(dtype=np.int64)
    part = cfg.get("partition") or {}
    keys = ("alpha", "imbalance_factor") if part.get("method") == "dirichlet" else ("imbalance_factor",)
    shape = [f"{k}={part[k]}" for k in keys if part.get(k) is not None]
    title = f"{part.get('method', 'partition')}: {counts.shape[0]} clients x {counts.shape[1]} classes"
    title += ("\n" + ", ".join(shape)) if shape else ""
    return io.write_with(path, heatmap_writer(counts, title))


def read_confusions(run_dir: Path) -> dict[str, pd.DataFrame]:
    """The final model's confusion matrices (``plain``, and ``adjusted`` with an adjustment) by name."""
    out = {}
    for name, file in CONFUSION_FILES.items():
        path = Path(run_dir) / file
        if path.is_file():
            out[name] = pd.read_csv(path, index_col="true")
    return out


def plot_confusion(confusions: dict[str, pd.DataFrame], path: Path) -> Path:
    """Row-normalised confusion matrices (recall on the diagonal), one panel per matrix; counts in the
    cells when there are few classes. Rows are true classes, columns predicted ones."""
    n = len(next(iter(confusions.values())))
    side = min(3.0 + 0.45 * n, 12.0)
    fig = _figure(side * len(confusions) + 1.0, side)
    for i, (name, frame) in enumerate(confusions.items()):
        ax = fig.add_subplot(1, len(confusions), i + 1)
        counts = frame.to_numpy(dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = counts / counts.sum(axis=1, keepdims=True)
        image = ax.imshow(np.ma.masked_invalid(share), vmin=0.0, vmax=1.0, cmap="Blues")
        labels = [c.removeprefix("pred_") for c in frame.columns]
        ax.set_xticks(range(len(labels)), labels, rotation=90 if n > 20 else 0, fontsize=7)
        ax.set_yticks(range(n), [str(c) for c in frame.index], fontsize=7)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"{name} (row-normalised)")
        if n <= 15:
            for (r, c), v in np.ndenumerate(counts):
                if v:
                    colour = "white" if share[r, c] > 0.5 else "black"
                    ax.text(c, r, str(int(v)), ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=fig.axes, label="share of the true class", shrink=0.8)
    return io.write_with(path, functools.partial(fig.savefig, format="png", dpi=110, bbox_inches="tight"))


# ---- the report ----------------------------------------------------------------------------------
def write_plots(run_dir: Path) -> dict[str, Path]:
    """Every figure the run's files allow; returns name -> path of those written."""
    run_dir = Path(run_dir)
    out = run_dir / PLOTS_DIR
    rounds = read_rounds(run_dir)
    written = {
        "balanced_accuracy": plot_accuracy_curve(
            rounds, read_schedule(run_dir), out / PLOT_FILES["balanced_accuracy"]
        ),
        "per_class_recall": plot_per_class_recall(
            final_recall(rounds),
            class_totals(run_dir),
            out / PLOT_FILES["per_class_recall"],
            read_schedule(run_dir),
        ),
    }
    matrix = read_accuracy_matrix(run_dir)
    if matrix is not None and len(matrix) > 1:  # one task (plain FL): a 1 x 1 matrix says nothing
        written["accuracy_matrix"] = plot_accuracy_matrix(matrix, out / PLOT_FILES["accuracy_matrix"])
    if "old_class_accuracy" in rounds.columns and rounds["task"].nunique() > 1:
        series = [("old_class_accuracy", "old classes", "o"), ("new_class_accuracy", "new classes", "s")]
        title = "Accuracy on the earlier tasks' classes and on the current task's"
        written["old_new"] = plot_round_curves(
            rounds, read_schedule(run_dir), out / PLOT_FILES["old_new"], series, title
        )
    if "pl_precision" in rounds.columns:
        series = [
            ("pl_precision", "pseudo-label precision", "o"),
            ("pl_used", "share of unlabeled samples used", "s"),
        ]
        if "tail_pl_precision" in rounds.columns:
            series.append(("tail_pl_precision", "tail classes' pseudo-label precision", "^"))
        title = "Pseudo-labels per round (counts summed over the round's clients)"
        written["pseudo_labels"] = plot_round_curves(
            rounds, read_schedule(run_dir), out / PLOT_FILES["pseudo_labels"], series, title, "share"
        )
    confusions = read_confusions(run_dir)
    if confusions:
        written["confusion_matrix"] = plot_confusion(confusions, out / PLOT_FILES["confusion_matrix"])
    stats = run_dir / "partition_stats.csv"
    if stats.is_file():
        written["partition"] = plot_partition(stats, read_config(run_dir), out / PLOT_FILES["partition"])
    return written


PLOT_CAPTIONS = {
    "balanced_accuracy": "Balanced accuracy and accuracy per round",
    "per_class_recall": "Final per-class recall, head to tail",
    "accuracy_matrix": "Accuracy matrix",
    "partition": "Client x class partition",
    "confusion_matrix": "Confusion matrix of the final model",
    "old_new": "Old-class vs new-class accuracy per round",
    "pseudo_labels": "Pseudo-label precision and use per round",
}


def embedded_report_markdown(run_dir: Path) -> str:
    """The report with its plots inlined as data URLs (PNG, base64): for a viewer that cannot follow
    relative links, such as the Prefect UI's markdown artifacts. Reads the plots `write_report` wrote."""
    import base64

    run_dir = Path(run_dir)
    parts = [summary_markdown(run_dir), "## Plots"]
    for name, file in PLOT_FILES.items():
        path = run_dir / PLOTS_DIR / file
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(
                f"### {PLOT_CAPTIONS[name]}\n\n![{PLOT_CAPTIONS[name]}](data:image/png;base64,{data})"
            )
    return "\n\n".join(parts) + "\n"


def write_report(run_dir: Path) -> Path:
    """Write ``plots/*.png`` and ``report.md`` (summary plus relative image links); returns its path."""
    run_dir = Path(run_dir)
    summary = summary_markdown(run_dir)  # fails early, before any file is written, on a bad run folder
    plots = write_plots(run_dir)
    figures = [
        f"### {PLOT_CAPTIONS[name]}\n\n![{PLOT_CAPTIONS[name]}]({path.relative_to(run_dir).as_posix()})"
        for name, path in plots.items()
    ]
    # Wall times stay in timing.json: the report is a reproducible artifact (dvc.lock hashes it).
    body = summary + "\n## Plots\n\n" + "\n\n".join(figures) + "\n"
    return io.write_text(run_dir / "report.md", body)
