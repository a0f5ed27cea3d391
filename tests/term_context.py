"""A `LocalContext` for one client's round with a strategy's client part: what the loss-term tests
(`clients.terms`) train on, a 3-feature MLP over 10 classes and its frozen copy as the received model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from clients.local import LocalContext
from fedtail import protocol as P
from fedtail.config import build_config
from fedtail.models import build_model
from fedtail.protocol import Job


def term_context(
    strategy: str,
    options: dict | None = None,
    message: RecordDict | None = None,
    *,
    sections: dict[str, Any] | None = None,
    class_counts: np.ndarray | None = None,
    global_round: int = 1,
    **train: Any,
) -> LocalContext:
    """``strategy`` with ``options``, ``train`` settings and other config ``sections``, 4 clients; the
    train message ``message`` (default: an empty config record). ``ctx.global_model_fn()`` is the
    received model (a frozen copy of ``ctx.model`` as it starts)."""
    cfg = build_config(
        {
            "strategy": {"name": strategy, "options": options or {}},
            "train": train,
            "federation": {"num_clients": 4},
            **(sections or {}),
        }
    )
    model = build_model("mlp", (3,), 10, 8, 0)
    frozen = copy.deepcopy(model)
    return LocalContext(
        job=Job(cfg, Path("."), Path(".")),
        partition_id=0,
        task=0,
        global_round=global_round,
        task_classes=list(range(10)),
        seen_classes=list(range(10)),
        class_prior=np.full(10, 0.1),
        class_counts=np.zeros(10) if class_counts is None else class_counts,
        model=model,
        global_model_fn=lambda: frozen,
        state=RecordDict(),
        device=torch.device("cpu"),
        message=message or RecordDict({P.CONFIG: ConfigRecord()}),
    )
