"""The fedtail ClientApp (Flower Message API).

``query``: report this node's partition id once (the server maps partitions to nodes with it); it
leaves the persistent state alone, which only training changes. ``train``: train the received global
model on this client's samples of the current task's classes and return the update. ``evaluate``: an
end-of-task statistics exchange of the continual method (`ContinualMethod.task_statistics`; only sums
of the client's data go back). Persistent
per-client state lives in ``context.state``; the `persist_state` mod carries it into the server's
checkpoints and back on resume.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.attacks import attackers
from clients.local import (
    ClientData,
    LocalContext,
    frozen,
    load_client_data,
    retrain_classifier,
    step_seed,
    train_local,
)
from clients.state import persist_state
from fedtail import protocol as P
from fedtail.models import array_from_numpy, array_to_numpy, load_arrays, model_for, resolve_device, to_arrays
from fedtail.registry import ATTACKS, CONTINUAL, SEMISUP
from fedtail.staging import load_staged, staged_meta
from fedtail.tasks import TaskSchedule, sample_tasks, schedule_from_config

STATE_KEY = "fedtail-client"

app = ClientApp(mods=[persist_state])  # context.state travels into checkpoints


def _job_and_data(msg: Message, context: Context) -> tuple[P.Job, int, ClientData]:
    job = P.parse_job(str(msg.content[P.CONFIG][P.JOB]))
    pid = int(context.node_config[P.NODE_PARTITION_ID])
    reveal = SEMISUP.get(job.config.semisup.method).reveals_labels
    data = load_client_data(str(job.staged_dir), str(job.partition_dir), pid, reveal)
    return job, pid, data


@functools.lru_cache(maxsize=4)
def _schedule(job_json: str) -> tuple[np.ndarray | None, TaskSchedule]:
    """Who takes part in which task (None: everyone) and the task schedule; pure in the config."""
    cfg = P.parse_job(job_json).config
    return cfg.participation(), schedule_from_config(cfg)


def held_classes(job_json: str, pid: int, task: int) -> list[int] | None:
    """Classes of the tasks up to ``task`` that client ``pid`` took part in; None without arrival."""
    present, schedule = _schedule(job_json)
    if present is None:
        return None
    return sorted(c for k in range(task + 1) if present[pid, k] for c in schedule.tasks[k])


def task_positions(job_json: str, data: ClientData, task: int, classes: list[int]) -> np.ndarray:
    """Positions in ``data`` of the samples presented in ``task``: those of its ``classes``, or with
    blurry boundaries those `fedtail.tasks.sample_tasks` assigns to it."""
    job = P.parse_job(job_json)
    cfg = job.config
    if not cfg.tasks.blurry:
        return data.positions(classes)
    _, schedule = _schedule(job_json)
    size = len(load_staged(job.staged_dir).y_train)  # memory-mapped: the draws are per training sample
    which = sample_tasks(data.y, schedule, cfg.tasks.blurry, cfg.seed, data.index, size)
    return np.flatnonzero(which == task)


@functools.lru_cache(maxsize=8)
def _input_shape(staged_dir: str) -> tuple[int, ...]:
    return tuple(staged_meta(Path(staged_dir))["input_shape"])


_local = threading.local()  # per thread: an abandoned (timed-out) call never shares a model with the next


def _fresh_model(job: P.Job, arrays: ArrayRecord) -> torch.nn.Module:
    cfg = job.config
    shape = _input_shape(str(job.staged_dir))
    return load_arrays(model_for(cfg, shape), arrays)


def _model(job: P.Job, arrays: ArrayRecord) -> torch.nn.Module:
    """The configured model holding ``arrays``: one instance per thread and shape, reused across calls
    (building and seeding a fresh one per message cost more than small clients' training). Every
    parameter and buffer is overwritten from ``arrays`` (strict), so reuse changes no result."""
    cfg = job.config
    shape = _input_shape(str(job.staged_dir))
    m = cfg.model
    key = (cfg.model_name(), shape, cfg.num_classes, m.model_dump_json(), cfg.semisup.method)
    models = _local.__dict__.setdefault("models", {})
    model = models.get(key)
    if model is None:
        model = models[key] = model_for(cfg, shape)
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    return load_arrays(model, arrays)


def _client_state(context: Context) -> ConfigRecord:
    if STATE_KEY not in context.state:
        context.state[STATE_KEY] = ConfigRecord({"rounds-trained": 0, "tasks-seen": []})
    return context.state[STATE_KEY]


@app.query()
def query(msg: Message, context: Context) -> Message:
    """This node's partition id, read from its node config (no data is loaded: the server takes the
    class counts from the partition folder it already has)."""
    info = ConfigRecord({P.PARTITION_ID: int(context.node_config[P.NODE_PARTITION_ID])})
    return Message(RecordDict({P.INFO: info}), reply_to=msg)


def _head(content: RecordDict, key: str) -> dict[str, np.ndarray] | None:
    record = content.array_records.get(key)
    return None if record is None else {k: array_to_numpy(v) for k, v in record.items()}


def _local_context(msg: Message, context: Context, model: torch.nn.Module | None = None) -> LocalContext:
    """The `LocalContext` of a train or statistics message: the received model (``model``: an own
    instance to train, else a frozen copy), the task, the client's data and state."""
    job, pid, data = _job_and_data(msg, context)
    cfg = job.config
    conf = msg.content[P.CONFIG]
    if torch.get_num_threads() != cfg.engine.threads_per_client:
        torch.set_num_threads(cfg.engine.threads_per_client)
    received = msg.content[P.ARRAYS]
    previous = msg.content.array_records.get(P.PREVIOUS_ARRAYS)
    task = int(conf[P.TASK])
    job_json = str(conf[P.JOB])
    task_classes = [int(c) for c in conf["task-classes"]]
    device = resolve_device(cfg.engine.device)
    return LocalContext(
        job=job,
        partition_id=pid,
        task=task,
        global_round=int(conf[P.GLOBAL_ROUND]) if P.GLOBAL_ROUND in conf else -1,
        task_classes=task_classes,
        seen_classes=[int(c) for c in conf["seen-classes"]],
        class_prior=np.asarray(conf[P.CLASS_PRIOR], dtype=np.float64),
        global_counts=np.asarray(conf[P.CLASS_COUNTS], dtype=np.int64) if P.CLASS_COUNTS in conf else None,
        class_counts=data.class_counts(cfg.num_classes),
        model=model if model is not None else frozen(_fresh_model(job, received).to(device)),
        global_model_fn=lambda: _fresh_model(job, received),
        previous_model_fn=None if previous is None else lambda: _fresh_model(job, previous),
        previous_head=_head(msg.content, P.PREVIOUS_HEAD),
        held_classes=held_classes(job_json, pid, task),
        data=data,
        sample_index=task_positions(job_json, data, task, task_classes),
        unlabeled_index=task_positions(job_json, data.unlabeled(), task, task_classes)
        if SEMISUP.get(cfg.semisup.method).views
        else None,
        state=context.state,
        device=device,
        options=dict(cfg.train.options),
        message=msg.content,
    )


ATTACK_SEED = 0xA77  # keys each attacking client's per-round corruption


def sent_update(job: P.Job, ctx: LocalContext, received: ArrayRecord) -> tuple[ArrayRecord, bool]:
    """The arrays this client sends and whether it attacks (`clients.attacks`): its trained model, or,
    for one of the run's attackers, the attack's corruption of it."""
    cfg = job.config
    trained = to_arrays(ctx.model)
    if cfg.attack.name == "none":
        return trained, False
    if ctx.partition_id not in attackers(cfg.seed, cfg.federation.num_clients, cfg.attack.fraction):
        return trained, False
    attack_cls = ATTACKS.get(cfg.attack.name)
    attack = attack_cls(attack_cls.Options.model_validate(cfg.attack.options))
    rng = np.random.default_rng(
        step_seed(cfg.seed, ctx.task, ctx.global_round, ctx.partition_id, ATTACK_SEED)
    )
    sent = attack.corrupt(
        {k: array_to_numpy(a) for k, a in received.items()},
        {k: array_to_numpy(a) for k, a in trained.items()},
        rng,
    )
    return ArrayRecord({k: array_from_numpy(np.ascontiguousarray(v)) for k, v in sent.items()}), True


@app.train()
def train(msg: Message, context: Context) -> Message:
    job = P.parse_job(str(msg.content[P.CONFIG][P.JOB]))
    ctx = _local_context(msg, context, model=_model(job, msg.content[P.ARRAYS]))
    cfg, data, conf, task, pid = job.config, ctx.data, msg.content[P.CONFIG], ctx.task, ctx.partition_id
    state = _client_state(context)
    x, y = data.x[ctx.sample_index], data.y[ctx.sample_index]
    stage = str(conf[P.STAGE]) if P.STAGE in conf else "fl"
    loss, n = (retrain_classifier if stage == "crt" else train_local)(ctx, x, y)
    state["rounds-trained"] = int(state["rounds-trained"]) + 1
    if task not in list(state["tasks-seen"]):
        state["tasks-seen"] = [*state["tasks-seen"], task]
    memory_samples, memory_bytes = CONTINUAL.get(cfg.continual.method).memory_footprint(ctx)
    arrays, attacking = sent_update(job, ctx, msg.content[P.ARRAYS])
    info = {} if cfg.attack.name == "none" else {P.ATTACKER: attacking}
    content = RecordDict(
        {
            P.ARRAYS: arrays,
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.TRAIN_LOSS: loss}),
            P.INFO: ConfigRecord(
                {
                    P.PARTITION_ID: pid,
                    "rounds-trained": int(state["rounds-trained"]),
                    "tasks-seen": list(state["tasks-seen"]),
                    P.MEMORY_SAMPLES: memory_samples,
                    P.MEMORY_BYTES: memory_bytes,
                    **info,
                }
            ),
            **ctx.reply,
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def statistics(msg: Message, context: Context) -> Message:
    """An end-of-task exchange (`ContinualMethod.statistics_rounds`): the continual method's sums over
    this client's data under the end-of-task model. The client's state is lent as a copy: what the
    method computes from it (the memory it would hold next) is not kept."""
    ctx = _local_context(msg, context)
    ctx.state = RecordDict(dict(context.state.items()))
    method = CONTINUAL.get(ctx.job.config.continual.method)(ctx)
    head = _head(msg.content, P.HEAD) or {}
    sums = method.task_statistics(head, int(msg.content[P.CONFIG][P.EXCHANGE]))
    content = RecordDict(
        {
            P.STATISTICS: ArrayRecord({k: array_from_numpy(np.asarray(v)) for k, v in sums.items()}),
            P.INFO: ConfigRecord({P.PARTITION_ID: ctx.partition_id}),
        }
    )
    return Message(content, reply_to=msg)
