"""The fedtail ClientApp (Flower Message API).

``query``: report this node's partition id and class counts once (the server derives the global class
prior from them); it leaves the persistent state alone, which only training changes. ``train``: train the
received global model on this client's samples of the current task's classes and return the update.
Persistent per-client state lives in ``context.state``; the `persist_state` mod carries it into the
server's checkpoints and back on resume.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.local import ClientData, LocalContext, load_client_data, train_local
from clients.state import persist_state
from fedtail import protocol as P
from fedtail.models import build_model, load_arrays, resolve_device, to_arrays
from fedtail.staging import staged_meta

STATE_KEY = "fedtail-client"

app = ClientApp(mods=[persist_state])  # context.state travels into checkpoints


def _job_and_data(msg: Message, context: Context) -> tuple[P.Job, int, ClientData]:
    job = P.Job.from_json(str(msg.content[P.CONFIG][P.JOB]))
    pid = int(context.node_config[P.NODE_PARTITION_ID])
    data = load_client_data(str(job.staged_dir), str(job.partition_dir), pid)
    return job, pid, data


def _client_state(context: Context) -> ConfigRecord:
    if STATE_KEY not in context.state:
        context.state[STATE_KEY] = ConfigRecord({"rounds-trained": 0, "tasks-seen": []})
    return context.state[STATE_KEY]


@app.query()
def query(msg: Message, context: Context) -> Message:
    job, pid, data = _job_and_data(msg, context)
    counts = data.class_counts(job.config.num_classes)
    info = ConfigRecord(
        {P.PARTITION_ID: pid, P.CLASS_COUNTS: counts.tolist(), "num-unlabeled": len(data.x_unlabeled)}
    )
    return Message(RecordDict({P.INFO: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    job, pid, data = _job_and_data(msg, context)
    cfg = job.config
    conf = msg.content[P.CONFIG]
    torch.set_num_threads(cfg.engine.threads_per_client)
    meta = staged_meta(job.staged_dir)
    model = build_model(cfg.model_name(), meta["input_shape"], cfg.num_classes, cfg.model.hidden, cfg.seed)
    load_arrays(model, msg.content[P.ARRAYS])
    global_model = copy.deepcopy(model).eval()
    for p in global_model.parameters():
        p.requires_grad_(False)
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
        class_counts=data.class_counts(cfg.num_classes),
        model=model,
        global_model=global_model,
        state=context.state,
        device=resolve_device(cfg.engine.device),
        options=dict(cfg.train.options),
    )
    x, y = data.for_classes(task_classes)
    loss, n = train_local(ctx, x, y)
    state["rounds-trained"] = int(state["rounds-trained"]) + 1
    if task not in list(state["tasks-seen"]):
        state["tasks-seen"] = [*state["tasks-seen"], task]
    content = RecordDict(
        {
            P.ARRAYS: to_arrays(ctx.model.cpu()),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.TRAIN_LOSS: loss}),
            P.INFO: ConfigRecord(
                {
                    P.PARTITION_ID: pid,
                    "rounds-trained": int(state["rounds-trained"]),
                    "tasks-seen": list(state["tasks-seen"]),
                }
            ),
        }
    )
    return Message(content, reply_to=msg)
