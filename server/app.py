"""The fedtail ServerApp (Flower Message API): tasks x rounds of federated class-incremental training.

For each task of the schedule the configured strategy runs ``rounds_per_task`` rounds (Flower's
``Strategy.start``); after every round the global model is evaluated server-side on the test set, the
row is recorded and checkpointed; after every task the accuracy-matrix row is written.

`build_server_app(job, run_dir, on_round)` binds a prepared job (used by the in-process and Ray
engines); the module-level ``app`` is what ``flwr run .`` loads: it reads the config from Flower's
run-config and prepares data and partitions itself.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from clients.local import step_seed
from clients.semisup import PSEUDO_LABELS, pseudo_label_columns
from clients.state import from_bytes, restore_content
from fedtail import io, runs
from fedtail import protocol as P
from fedtail.config import FedtailConfig, check_paths, from_run_config, parse_override_list
from fedtail.metrics import class_groups
from fedtail.models import (
    array_from_numpy,
    array_to_numpy,
    model_for,
    reinit_classifier,
    resolve_device,
    to_arrays,
    to_state_dict,
)
from fedtail.partition import labeled_class_counts, load_schedule
from fedtail.progress import ROUND_RECORD
from fedtail.registry import ADJUSTMENTS, CONTINUAL, SEMISUP, STRATEGIES
from fedtail.staging import load_staged, staged_meta
from fedtail.tasks import TaskSchedule
from server.evaluation import ADJUSTED_KEYS, Evaluator, LogitsFn
from server.recorder import CONTINUAL_COLUMNS, IMBALANCE_COLUMNS, OPEN_WORLD_COLUMNS, RunRecorder
from strategies.base import FedtailStrategy, divergence_hint

log = logging.getLogger("fedtail")

OnRound = Callable[[dict], None]


def discover_clients(grid: Grid, job: P.Job, timeout: float) -> tuple[dict[int, int], np.ndarray]:
    """Map partition ids to nodes: a grid that assigns them itself (fedtail's simulation grids have
    ``partition_ids()``) says so; any other grid's nodes are asked once (a QUERY message; nodes load no
    data for it).

    Returns ``{partition_id: node_id}`` and the clients x classes counts of the samples each client
    trains on (its labeled ones), taken from the partition folder: the same numbers the clients would
    report, without loading every client's data before round 1.
    """
    n = job.config.federation.num_clients
    known = getattr(grid, "partition_ids", None)
    if callable(known):
        node_of = {int(pid): int(node) for node, pid in known().items()}
    else:
        node_of = _query_partition_ids(grid, job, timeout)
    if sorted(node_of) != list(range(n)):
        raise ValueError(
            f"federation.num_clients={n} but the connected nodes hold partitions {sorted(node_of)}; "
            "run exactly one node per client (flwr: options.num-supernodes)"
        )
    y_train = load_staged(job.staged_dir).y_train
    reveal = SEMISUP.get(job.config.semisup.method).reveals_labels  # all-labels: every sample is labeled
    return node_of, labeled_class_counts(job.partition_dir, y_train, job.config.num_classes, reveal)


def _query_partition_ids(grid: Grid, job: P.Job, timeout: float) -> dict[int, int]:
    """Wait for ``federation.num_clients`` nodes, then ask each for its partition id."""
    n = job.config.federation.num_clients
    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of federation.num_clients={n} nodes connected")
        time.sleep(0.2)
    content = RecordDict({P.CONFIG: ConfigRecord({P.JOB: job.to_json()})})
    messages = [
        Message(content=content, dst_node_id=node, message_type=MessageType.QUERY) for node in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    errors = [r.error.reason for r in replies if r.has_error()]
    if errors or len(replies) != len(node_ids):
        raise RuntimeError(f"client discovery failed ({len(replies)}/{len(node_ids)} replies): {errors[:3]}")
    return {int(r.content[P.INFO][P.PARTITION_ID]): r.metadata.src_node_id for r in replies}


def restore_client_states(
    grid: Grid, node_of: dict[int, int], states: dict[int, bytes], timeout: float
) -> None:
    """Resume: put every node's ``context.state`` back to the checkpoint's copy (empty if it had none).

    Every node gets one, so a node whose state moved past the checkpoint (a long-lived SuperNode) is
    reset too; without this a resumed run's stateful clients would silently start over.
    """
    messages = [
        Message(
            content=restore_content(from_bytes(states[pid]) if pid in states else RecordDict()),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for pid, node in sorted(node_of.items())
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    errors = [r.error.reason for r in replies if r.has_error()]
    if errors or len(replies) != len(messages):
        raise RuntimeError(
            f"could not restore the clients' state for resuming ({len(replies)}/{len(messages)} replies): "
            f"{errors[:3]}"
        )


def head_record(head: dict[str, np.ndarray]) -> ArrayRecord:
    """A continual method's head as it travels in messages."""
    return ArrayRecord({k: array_from_numpy(np.ascontiguousarray(v)) for k, v in head.items()})


def collect_statistics(
    grid: Grid,
    node_of: dict[int, int],
    arrays: ArrayRecord,
    head: dict[str, np.ndarray],
    config: ConfigRecord,
    extra: dict[str, ArrayRecord],
    timeout: float,
) -> dict[str, np.ndarray]:
    """One end-of-task exchange (`ContinualMethod.statistics_rounds`): send every client the model and
    the head, and add up the sums they return, in float64 and partition order (the same total on every
    engine). A client that fails is left out with a warning, as in a round; none answering is an error.
    """
    content = {P.ARRAYS: arrays, P.HEAD: head_record(head), P.CONFIG: config, **extra}
    messages = [
        Message(content=RecordDict(dict(content)), dst_node_id=node, message_type=MessageType.EVALUATE)
        for _, node in sorted(node_of.items())
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    answers: list[tuple[int, ArrayRecord]] = []
    for reply in replies:
        if reply.has_error():
            log.warning(
                "task %d statistics: failed client: node %s: %s",
                int(config[P.TASK]) + 1,
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            continue
        answers.append((int(reply.content[P.INFO][P.PARTITION_ID]), reply.content[P.STATISTICS]))
    if not answers:
        raise RuntimeError(
            f"task {int(config[P.TASK]) + 1}: no client answered the end-of-task statistics exchange"
        )
    sums: dict[str, np.ndarray] = {}
    for _, record in sorted(answers, key=lambda item: item[0]):
        for key, value in record.items():
            array = array_to_numpy(value).astype(np.float64)
            sums[key] = array if key not in sums else sums[key] + array
    return sums


FL, CRT = "fl", "crt"
"""A task's stages: its federated rounds, then the optional cRT rounds (``crt.rounds``)."""
CRT_SEED = 0xC47  # seeds the classifier rows cRT re-initialises, per task


@dataclass(frozen=True)
class RoundContext:
    """What scoring and recording a round needs, beside the round itself."""

    cfg: FedtailConfig
    evaluator: Evaluator
    recorder: RunRecorder
    strategy: FedtailStrategy
    schedule: TaskSchedule
    on_round: OnRound | None


def collapse_hint(cfg: FedtailConfig, train_loss: float) -> str:
    """Why a task can end at chance: attacking clients, if the run has them; else, told apart by whether
    the clients fit their own samples: a training loss still above ln 2 means the local steps do not
    learn (too large a step); a low one means they do, and the global model forgets or follows the head
    classes (the data's doing, as in the default fine-tuning baseline)."""
    if cfg.attack.name != "none":
        k = round(cfg.attack.fraction * cfg.federation.num_clients)
        return (
            f"attack.name={cfg.attack.name!r}: {k} of {cfg.federation.num_clients} clients send corrupted "
            f"updates, which strategy.name={cfg.strategy.name!r} averages in; a robust aggregator "
            "(multikrum, bulyan, fedmedian, fedtrimmedavg; strategy.options.num_malicious_nodes where it "
            "takes one) is the remedy"
        )
    if not math.isfinite(train_loss) or train_loss >= math.log(2):
        hint = divergence_hint(cfg, "training collapsed")
        return f"the clients do not fit their own samples (training loss {train_loss:.3f}); {hint}"
    return (
        f"the clients fit their own samples (training loss {train_loss:.3f}), so the global model forgets "
        "or favours the head classes: a continual method (continual.method), a rebalancing objective "
        "(train.objective) or a classifier adjustment (evaluation.adjustment) is the remedy"
    )


def evaluate_served(
    evaluator: Evaluator,
    strategy: FedtailStrategy,
    arrays: ArrayRecord,
    seen: list[int],
    tasks: list,
    head: LogitsFn | None = None,
) -> dict:
    """The evaluation of the global model ``arrays`` as the strategy serves it: its evaluated model
    (`FedtailStrategy.evaluation_arrays`), and the per-client columns scored with each client's own
    model when it trains several (`FedtailStrategy.client_models`)."""
    result = evaluator.evaluate(strategy.evaluation_arrays(arrays), seen, tasks, head=head)
    view = strategy.client_models(arrays)
    return result if view is None else evaluator.per_client_view(result, *view, seen)


def evaluate_round(
    server_round: int,
    arrays: ArrayRecord,
    *,
    t: int,
    stage: str,
    first: int,
    seen: list[int],
    context: RoundContext,
) -> MetricRecord | None:
    """Flower's ``evaluate_fn``: score the aggregated model after a round, record the row (checkpoint
    included) and log it. ``first`` is how many rounds of task ``t`` came before this call's stage."""
    if server_round == 0:
        return None
    cfg, strategy, schedule = context.cfg, context.strategy, context.schedule
    r = first + server_round  # 1-based round within the task, counting every stage
    res = evaluate_served(context.evaluator, strategy, arrays, seen, schedule.tasks[: t + 1])
    nan = float("nan")
    recall = {f"recall_{c}": res["per_class_recall"].get(c, nan) for c in range(cfg.num_classes)}
    precision = {f"precision_{c}": res["per_class_precision"].get(c, nan) for c in range(cfg.num_classes)}
    row = {
        "task": t,
        "stage": stage,
        "round": r,
        "global_round": t * cfg.task_rounds + r,
        **strategy.last_counts._asdict(),
        "train_loss": strategy.last_train_loss,
        "accuracy": res["accuracy"],
        "balanced_accuracy": res["balanced_accuracy"],
        "macro_f1": res["macro_f1"],
        "num_seen_classes": len(seen),
        **{k: res.get(k, nan) for k in (*IMBALANCE_COLUMNS, *CONTINUAL_COLUMNS)},
        **{f"adjusted_{k}": res[f"adjusted_{k}"] for k in ADJUSTED_KEYS if f"adjusted_{k}" in res},
        **recall,
        **precision,
    }
    if cfg.partition.novel_classes:  # open world
        row.update({k: res.get(k, nan) for k in OPEN_WORLD_COLUMNS})
    if SEMISUP.get(cfg.semisup.method).views:  # the round's pseudo-labels, counted over its clients
        tail = context.evaluator.groups.get("tail")
        row.update(pseudo_label_columns(strategy.last_sums.get(PSEUDO_LABELS), cfg.num_classes, tail))
    context.recorder.record_round(row, arrays, strategy.state_dict())
    log.info(
        "task %d/%d round %d/%d%s  balanced_acc=%.4f  acc=%.4f  macro_f1=%.4f  loss=%.4f",
        t + 1,
        schedule.num_tasks,
        r,
        cfg.task_rounds,
        " (cRT)" if stage == CRT else "",
        res["balanced_accuracy"],
        res["accuracy"],
        res["macro_f1"],
        row["train_loss"],
        extra={ROUND_RECORD: True},  # a terminal progress bar shows the round instead
    )
    if r == cfg.task_rounds and len(seen) > 1 and res["balanced_accuracy"] <= 1.0 / len(seen) + 1e-9:
        log.warning(
            "task %d/%d: balanced accuracy %.4f is chance on the %d seen classes: %s",
            t + 1,
            schedule.num_tasks,
            res["balanced_accuracy"],
            len(seen),
            collapse_hint(cfg, row["train_loss"]),
        )
    if context.on_round is not None:
        context.on_round(dict(row, num_tasks=schedule.num_tasks, rounds_per_task=cfg.task_rounds))
    return MetricRecord({k: float(row[k]) for k in ("accuracy", "balanced_accuracy", "macro_f1")})


class StrategyBannerOnce(logging.Filter):
    """Flower's strategy prints a banner each time it starts, i.e. once per task and stage here, with the
    whole train ConfigRecord (the job's JSON, pages of it): show the banner once, the config in one line.
    Flower's line about the nodes it sampled is dropped: fedtail sends the round to its own sample."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = self.muting = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        if msg == "Starting %s strategy:":
            self.muting, self.seen = self.seen, True
            return not self.muting
        if self.muting:
            self.muting = msg != ""  # the banner ends with an empty line
            return False
        if msg.startswith("configure_train: Sampled"):
            return False  # Flower's own draw, which fedtail replaces by its seeded one
        if msg.startswith("\t├── ConfigRecord (train)"):
            record.args = ("the job (resolved config, data locations), task, stage, classes, class prior",)
        return True


def run_federation(grid: Grid, job: P.Job, run_dir: Path, on_round: OnRound | None = None) -> dict:
    """The server loop over tasks and rounds; returns the final metrics (also in metrics.json)."""
    flower = logging.getLogger("flwr")
    banner = StrategyBannerOnce()
    flower.addFilter(banner)
    try:
        return _run_federation(grid, job, run_dir, on_round)
    finally:
        flower.removeFilter(banner)


def _run_federation(grid: Grid, job: P.Job, run_dir: Path, on_round: OnRound | None) -> dict:
    cfg = job.config
    schedule = load_schedule(job.partition_dir)
    meta = staged_meta(job.staged_dir)
    device = resolve_device(cfg.engine.device)
    model = model_for(cfg, meta["input_shape"])
    node_of, counts = discover_clients(grid, job, cfg.engine.timeout)
    global_counts = counts.sum(axis=0)  # per class, over every client: the prior, groups, adjustments
    prior = global_counts / max(int(global_counts.sum()), 1)
    by_labels = global_counts
    if SEMISUP.get(cfg.semisup.method).reveals_labels:  # head / tail stay those of the labeled part
        y_train = load_staged(job.staged_dir).y_train
        by_labels = labeled_class_counts(job.partition_dir, y_train, cfg.num_classes).sum(axis=0)
    groups = class_groups(by_labels, cfg.evaluation.many_shot, cfg.evaluation.few_shot)
    adjustment = None
    if cfg.evaluation.adjustment != "none":
        adjustment = ADJUSTMENTS.get(cfg.evaluation.adjustment)(cfg.evaluation.options, global_counts)
    evaluator = Evaluator(
        model,
        load_staged(job.staged_dir),
        device,
        threads=cfg.engine.threads_per_client,
        groups=groups,
        adjustment=adjustment,
        client_counts=counts,
        seed=cfg.seed,
        novel=cfg.partition.novel_classes,
    )
    recorder = RunRecorder(run_dir, cfg, schedule)
    if recorder.resumed:
        restore_client_states(grid, node_of, recorder.client_states, cfg.engine.timeout)
    arrays = recorder.arrays or to_arrays(model)
    strategy = STRATEGIES.get(cfg.strategy.name).from_config(cfg, node_of)
    strategy.client_info, strategy.client_states = recorder.client_info, recorder.client_states  # shared
    if recorder.resumed:
        strategy.load_state_dict(recorder.strategy_state)
    round_context = RoundContext(cfg, evaluator, recorder, strategy, schedule, on_round)
    shape = meta["input_shape"]
    rounds, n_tasks = cfg.federation.rounds_per_task, schedule.num_tasks
    stages = [(FL, rounds)] + ([(CRT, cfg.crt.rounds)] if cfg.crt.rounds else [])
    method = CONTINUAL.get(cfg.continual.method)
    participation = cfg.participation()
    exchanges = method.statistics_rounds(cfg)
    options = method.Options.model_validate(cfg.continual.options)

    def scored_by(head: dict[str, np.ndarray]) -> LogitsFn | None:
        """How end-of-task evaluations compute logits: through the method's head, if it builds one."""
        return functools.partial(method.evaluation_logits, head=head) if exchanges else None

    for t in range(recorder.tasks_done, n_tasks):
        seen = schedule.seen_classes(t)
        offset = 0  # rounds of this task before the stage

        def task_config(key: str, value: object, t: int = t, seen: list[int] = seen) -> ConfigRecord:
            """What a train or statistics message of task ``t`` tells the client, and ``key: value``."""
            return ConfigRecord(
                {
                    P.JOB: job.to_json(),
                    P.TASK: t,
                    key: value,
                    "task-classes": list(schedule.tasks[t]),
                    "seen-classes": seen,
                    P.CLASS_PRIOR: prior.tolist(),
                    P.CLASS_COUNTS: [int(c) for c in global_counts],
                }
            )

        previous = recorder.task_arrays if method.uses_previous_model and t > 0 else None
        strategy.extra_records = {} if previous is None else {P.PREVIOUS_ARRAYS: previous}
        if previous is not None and exchanges:
            strategy.extra_records[P.PREVIOUS_HEAD] = head_record(recorder.task_head)
        strategy.present = None if participation is None else np.flatnonzero(participation[:, t]).tolist()
        for stage, stage_rounds in stages:
            done = recorder.rounds_done_in_task(t, stage)
            if done < stage_rounds:
                if stage == CRT and done == 0 and cfg.crt.reinit:
                    seed = step_seed(cfg.seed, t, CRT_SEED)
                    fresh = model_for(cfg.model_copy(update={"seed": seed}), shape)
                    arrays = reinit_classifier(arrays, fresh, schedule.tasks[t])
                strategy.round_offset = t * cfg.task_rounds + offset + done
                strategy.frozen_prefixes = ("features.",) if stage == CRT else ()
                train_config = task_config(P.STAGE, stage)
                evaluate_fn = functools.partial(
                    evaluate_round, t=t, stage=stage, first=offset + done, seen=seen, context=round_context
                )
                result = strategy.start(
                    grid,
                    arrays,
                    num_rounds=stage_rounds - done,
                    timeout=cfg.engine.timeout,
                    train_config=train_config,
                    evaluate_fn=evaluate_fn,
                )
                arrays = recorder.arrays if recorder.arrays is not None else result.arrays
            offset += stage_rounds
        old = [c for task in schedule.tasks[:t] for c in task]
        arrays = method.end_task_on_server(arrays, old, list(schedule.tasks[t]))
        head = recorder.task_head
        for exchange in range(exchanges):
            config = task_config(P.EXCHANGE, exchange)
            sums = collect_statistics(
                grid, node_of, arrays, head, config, strategy.extra_records, cfg.engine.timeout
            )
            arrays, head = method.head_from_statistics(
                sums, head, exchange, arrays=arrays, old=old, new=list(schedule.tasks[t]), options=options
            )
        result = evaluate_served(evaluator, strategy, arrays, seen, schedule.tasks[: t + 1], scored_by(head))
        recorder.end_task(t, result, arrays, head)

    last = schedule.num_tasks - 1
    seen = schedule.seen_classes(last)
    final = evaluate_served(evaluator, strategy, arrays, seen, schedule.tasks, scored_by(recorder.task_head))
    return recorder.finish(to_state_dict(strategy.evaluation_arrays(arrays)), final)


def write_run_header(job: P.Job, run_dir: Path) -> None:
    """Resolved config and the partition's tables, so a run folder explains itself."""
    io.write_text(run_dir / "config.yaml", job.config.to_yaml())
    for src, dst in (
        ("stats.csv", "partition_stats.csv"),
        ("schedule.json", "schedule.json"),
    ):
        path = job.partition_dir / src
        if path.is_file():
            io.write_bytes(run_dir / dst, path.read_bytes())


def build_server_app(job: P.Job, run_dir: Path, on_round: OnRound | None = None) -> ServerApp:
    """A ServerApp bound to a prepared job (in-process and Ray engines)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, job, run_dir, on_round)

    return server_app


def _log_through_flower() -> None:
    """Under ``flwr run`` only Flower's own logger reaches the user (``--stream``): fedtail's per-round
    lines and the report's location go through its handlers, and its warning about federated evaluation
    (fedtail evaluates on the server) is dropped."""
    from fedtail.pipeline import ExpectedWarnings

    flower = logging.getLogger("flwr")
    for handler in flower.handlers:
        if not any(isinstance(f, ExpectedWarnings) for f in handler.filters):
            handler.addFilter(ExpectedWarnings())
    log.handlers[:] = list(flower.handlers)
    log.setLevel(logging.INFO)
    log.propagate = False


app = ServerApp()


@app.main()
def flwr_main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: config from run-config, then the whole pipeline."""
    from fedtail import pipeline

    _log_through_flower()
    run_config = dict(context.run_config)
    root = Path(str(run_config.pop("root", "") or ".")).resolve()
    run_config.update(parse_override_list(str(run_config.pop("set", ""))))
    cfg = from_run_config(run_config, root)
    check_paths(cfg, root)
    staged = pipeline.stage(cfg, root)
    parts = pipeline.partition(cfg, staged, root)
    job = P.Job(cfg, staged, parts)
    with runs.claim(pipeline.new_run_dir(cfg, root), runs.Mode.NEW) as run_dir:
        write_run_header(job, run_dir)
        run_federation(grid, job, run_dir)
    pipeline.report(run_dir)  # takes the run's lock itself
    log.info("report: %s", run_dir / "report.md")
