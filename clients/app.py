"""The fedtail ClientApp (Flower Message API).

``query``: report this node's partition id once (the server maps partitions to nodes with it); it
leaves the persistent state alone, which only training changes. ``train``: train the received global
model on this client's samples of the current task's classes and return the update. Persistent
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

from clients.local import ClientData, LocalContext, load_client_data, retrain_classifier, train_local
from clients.state import persist_state
from fedtail import protocol as P
from fedtail.models import load_arrays, model_for, resolve_device, to_arrays
from fedtail.registry import CONTINUAL
from fedtail.staging import load_staged, staged_meta

STATE_KEY = "fedtail-client"

app = ClientApp(mods=[persist_state])  # context.state travels into checkpoints


def _job_and_data(msg: Message, context: Context) -> tuple[P.Job, int, ClientData]:
    job = P.parse_job(str(msg.content[P.CONFIG][P.JOB]))
    pid = int(context.node_config[P.NODE_PARTITION_ID])
    data = load_client_data(str(job.staged_dir), str(job.partition_dir), pid)
    return job, pid, data


@functools.lru_cache(maxsize=4)
def _arrival(job_json: str) -> tuple[np.ndarray, tuple[tuple[int, ...], ...]]:
    """Who takes part in which task, and the tasks' classes (per-client arrival; pure in the config)."""
    from fedtail.tasks import schedule_from_config

    cfg = P.parse_job(job_json).config
    return cfg.participation(), schedule_from_config(cfg).tasks


def held_classes(job_json: str, cfg, pid: int, task: int) -> list[int] | None:
    """Classes of the tasks up to ``task`` that client ``pid`` took part in; None without arrival."""
    if not (cfg.tasks.late_join_fraction or cfg.tasks.skip_fraction):
        return None
    present, tasks = _arrival(job_json)
    return sorted(c for k in range(task + 1) if present[pid, k] for c in tasks[k])


def task_samples(job_json: str, data: ClientData, task: int) -> tuple[np.ndarray, np.ndarray]:
    """The client's samples presented in ``task`` with blurry boundaries (`fedtail.tasks.sample_tasks`)."""
    from fedtail.tasks import sample_tasks, schedule_from_config

    job = P.parse_job(job_json)
    cfg = job.config
    size = len(load_staged(job.staged_dir).y_train)  # memory-mapped: the draws are per training sample
    which = sample_tasks(data.y, schedule_from_config(cfg), cfg.tasks.blurry, cfg.seed, data.index, size)
    mask = which == task
    return data.x[mask], data.y[mask]


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
    key = (cfg.model_name(), shape, cfg.num_classes, m.hidden, m.classifier, m.cosine_scale)
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    job, pid, data = _job_and_data(msg, context)
    cfg = job.config
    conf = msg.content[P.CONFIG]
    if torch.get_num_threads() != cfg.engine.threads_per_client:
        torch.set_num_threads(cfg.engine.threads_per_client)
    received = msg.content[P.ARRAYS]
    previous = msg.content.array_records.get(P.PREVIOUS_ARRAYS)
    model = _model(job, received)
    task = int(conf[P.TASK])
    task_classes = [int(c) for c in conf["task-classes"]]
    state = _client_state(context)
    ctx = LocalContext(
        job=job,
        partition_id=pid,
        task=task,
        global_round=int(conf[P.GLOBAL_ROUND]),
        task_classes=task_classes,
        seen_classes=[int(c) for c in conf["seen-classes"]],
        class_prior=np.asarray(conf[P.CLASS_PRIOR], dtype=np.float64),
        global_counts=np.asarray(conf[P.CLASS_COUNTS], dtype=np.int64) if P.CLASS_COUNTS in conf else None,
        class_counts=data.class_counts(cfg.num_classes),
        model=model,
        global_model_fn=lambda: _fresh_model(job, received),
        previous_model_fn=None if previous is None else lambda: _fresh_model(job, previous),
        held_classes=held_classes(str(conf[P.JOB]), cfg, pid, task),
        data=data,
        state=context.state,
        device=resolve_device(cfg.engine.device),
        options=dict(cfg.train.options),
    )
    x, y = task_samples(str(conf[P.JOB]), data, task) if cfg.tasks.blurry else data.for_classes(task_classes)
    stage = str(conf[P.STAGE]) if P.STAGE in conf else "fl"
    loss, n = (retrain_classifier if stage == "crt" else train_local)(ctx, x, y)
    state["rounds-trained"] = int(state["rounds-trained"]) + 1
    if task not in list(state["tasks-seen"]):
        state["tasks-seen"] = [*state["tasks-seen"], task]
    memory_samples, memory_bytes = CONTINUAL.get(cfg.continual.method).memory_footprint(ctx)
    content = RecordDict(
        {
            P.ARRAYS: to_arrays(ctx.model),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.TRAIN_LOSS: loss}),
            P.INFO: ConfigRecord(
                {
                    P.PARTITION_ID: pid,
                    "rounds-trained": int(state["rounds-trained"]),
                    "tasks-seen": list(state["tasks-seen"]),
                    P.MEMORY_SAMPLES: memory_samples,
                    P.MEMORY_BYTES: memory_bytes,
                }
            ),
        }
    )
    return Message(content, reply_to=msg)
