"""Replay's exemplar memory (iCaRL's herding and budget, random selection), kept in the client's state;
Joint's training set; the end-of-task model the server sends to methods that ask for it."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.continual.joint import Joint
from clients.continual.memory import Memory, herding, random_exemplars, update_memory
from clients.continual.replay import Replay
from clients.local import ClientData
from fedtail.config import ConfigError, build_config
from fedtail.models import build_model
from tests.conftest import local_context, smoke_run


def _data(per_class: dict[int, int], dim: int = 4, seed: int = 0) -> ClientData:
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in per_class.items()])
    x = (rng.normal(size=(y.size, dim)) + y[:, None]).astype(np.float32)
    return ClientData(x=x, y=y, x_unlabeled=np.zeros((0, dim), dtype=np.float32))


def _ctx(data: ClientData, task_classes: list[int], seen: list[int], **continual):
    cfg = build_config({"continual": {"method": "replay", "options": continual}})
    model = build_model("mlp", (data.x.shape[1],), 10, 8, 0)
    previous = build_model("mlp", (data.x.shape[1],), 10, 8, 1)
    return local_context(
        cfg,
        model,
        data=data,
        task_classes=task_classes,
        seen_classes=seen,
        task=1,
        previous_model_fn=lambda: previous,
    )


def test_herding_is_the_greedy_mean_matching_of_icarl() -> None:
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(9, 3))
    phi = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    mu = phi.mean(axis=0)
    chosen: list[int] = []  # Alg. 4 written out: try every remaining sample at each step
    for k in range(1, 5):
        best = min(
            (i for i in range(9) if i not in chosen),
            key=lambda i: np.linalg.norm(mu - (phi[i] + phi[chosen].sum(axis=0)) / k),
        )
        chosen.append(best)
    assert herding(feats, 4).tolist() == chosen
    assert sorted(herding(feats, 20).tolist()) == list(range(9))  # m > n: every sample once


def test_herding_means_approach_the_class_mean_faster_than_random_subsets() -> None:
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(40, 5)) + np.array([3.0, 0, 0, 0, 0])
    phi = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    mu = phi.mean(axis=0)
    picked = herding(feats, 5)
    herd_err = np.linalg.norm(phi[picked].mean(axis=0) - mu)
    random_errs = [
        np.linalg.norm(phi[list(s)].mean(axis=0) - mu)
        for s in itertools.islice((rng.choice(40, 5, replace=False) for _ in itertools.count()), 200)
    ]
    assert herd_err < np.percentile(random_errs, 5)


def test_random_exemplars_are_distinct_and_seeded() -> None:
    a = random_exemplars(10, 4, np.random.default_rng(3))
    assert len(set(a.tolist())) == 4 and a.max() < 10
    assert a.tolist() == random_exemplars(10, 4, np.random.default_rng(3)).tolist()
    assert random_exemplars(3, 4, np.random.default_rng(3)).size == 3


def test_memory_splits_a_fixed_budget_over_old_classes_and_reduces_by_priority() -> None:
    data = _data({0: 30, 1: 30, 2: 30, 3: 30, 4: 2})
    ctx = _ctx(data, task_classes=[2, 3], seen=[0, 1, 2, 3], memory_size=20)
    memory, added = update_memory(ctx, 20, "herding")
    assert added == [0, 1]
    assert np.bincount(memory.labels).tolist() == [10, 10]
    assert (data.y[memory.indices] == memory.labels).all()
    first = Memory.load(ctx.state)
    assert first.indices.tolist() == memory.indices.tolist()  # kept in the client's state

    # Next task: classes 2, 3 become old; 4 classes share 20 -> 5 each, the first 5 of 0 and 1 kept.
    later = _ctx(data, task_classes=[4], seen=[0, 1, 2, 3, 4], memory_size=20)
    later.state = ctx.state
    memory2, added2 = update_memory(later, 20, "herding")
    assert added2 == [2, 3]
    assert np.bincount(memory2.labels).tolist() == [5, 5, 5, 5]
    for c in (0, 1):
        assert memory2.indices[memory2.labels == c].tolist() == first.indices[first.labels == c][:5].tolist()
    assert update_memory(later, 20, "herding")[1] == []  # nothing new: unchanged, nothing written


def test_a_class_the_client_never_held_takes_no_budget() -> None:
    data = _data({0: 30, 2: 30})
    ctx = _ctx(data, task_classes=[2, 3], seen=[0, 1, 2, 3], memory_size=12)
    memory, added = update_memory(ctx, 12, "random")
    assert added == [0] and len(memory) == 12


def test_replay_trains_on_new_samples_and_exemplars() -> None:
    data = _data({0: 30, 1: 30, 2: 30, 3: 30})
    ctx = _ctx(data, task_classes=[2, 3], seen=[0, 1, 2, 3], memory_size=10)
    x, y = data.for_classes([2, 3])
    method = Replay(ctx)
    xt, yt = method.training_data(torch.from_numpy(x), torch.from_numpy(y))
    assert len(yt) == len(y) + 10
    assert method.objective_classes() == [0, 1, 2, 3]  # a grown head: no loss on classes to come
    assert sorted(set(yt[len(y) :].tolist())) == [0, 1]
    samples, nbytes = Replay.memory_footprint(ctx)
    assert samples == 10 and nbytes == 10 * (4 * 4 + 8)


def test_joint_trains_on_every_seen_class() -> None:
    data = _data({0: 5, 1: 6, 2: 7, 3: 8})
    cfg = build_config({"continual": {"method": "joint"}})
    model = build_model("mlp", (4,), 10, 8, 0)
    ctx = local_context(cfg, model, data=data, task_classes=[2, 3], seen_classes=[0, 1, 2, 3], task=1)
    x, y = data.for_classes([2, 3])
    _, yt = Joint(ctx).training_data(torch.from_numpy(x), torch.from_numpy(y))
    assert np.bincount(yt.numpy()).tolist() == [5, 6, 7, 8]
    assert Joint.memory_footprint(ctx)[0] == 11


@pytest.mark.parametrize(
    "options", [{"memory_size": 0}, {"memory_size": 9}, {"selection": "best"}, {"size": 10}]
)
@pytest.mark.parametrize("method", ["replay", "wa"])
def test_bad_replay_options_are_refused(method: str, options: dict) -> None:
    with pytest.raises(ConfigError, match="continual.options"):
        build_config({"continual": {"method": method, "options": options}})


def test_replay_and_joint_forget_less_than_finetune(project: Path) -> None:
    common = {"tasks.classes_per_task": 2, "federation.rounds_per_task": 3}
    _, fine = smoke_run(project, "cil-finetune", **common)
    _, replay = smoke_run(project, "cil-replay", **common, **{"continual.method": "replay"})
    _, joint = smoke_run(project, "cil-joint", **common, **{"continual.method": "joint"})
    assert joint["final_average_accuracy"] > replay["final_average_accuracy"] > fine["final_average_accuracy"]
    assert replay["forgetting"] < fine["forgetting"]


@pytest.mark.parametrize(
    ("method", "crash_at"),
    [
        ("replay", 3),
        ("ewc", 2),
        ("wa", 2),
        ("lwf", 3),
        ("derpp", 3),
        ("icarl", 2),
        ("bic", 2),
        ("glfc", 3),
        ("prototype", 2),
    ],
)
def test_a_crashed_continual_run_resumes_to_the_same_result(
    project: Path, method: str, crash_at: int
) -> None:
    """Memory, Fisher and the end-of-task model live in client state and the checkpoint: a crash in the
    last round of task 0 (before the server's end-of-task step) or in task 1 changes nothing."""
    from fedtail import pipeline, runs
    from tests.conftest import crashed_run, smoke_config

    options = {"continual.method": method}
    ref_dir, reference = smoke_run(project, f"ref-{method}", **options)
    cfg = smoke_config(project, **{"output.run_id": f"crash-{method}", **options})
    run_dir = crashed_run(cfg, project, crash_at=crash_at)
    staged = pipeline.stage(cfg, project)
    pipeline.simulate(cfg, staged, pipeline.partition(cfg, staged, project), run_dir, mode=runs.Mode.RESUME)
    assert json.loads((run_dir / "metrics.json").read_text()) == reference
    for name in ("tasks.csv", "clients.csv", "rounds.csv"):
        assert (run_dir / name).read_text() == (ref_dir / name).read_text(), name


@pytest.mark.parametrize(
    "method", ["replay", "ewc", "lwf", "wa", "derpp", "icarl", "bic", "glfc", "prototype"]
)
def test_methods_that_act_across_tasks_refuse_a_single_task(method: str) -> None:
    with pytest.raises(ConfigError, match="acts from the second task on, but the schedule has one task"):
        build_config({"continual": {"method": method}, "tasks": {"classes_per_task": None}})
    build_config({"continual": {"method": method}, "tasks": {"classes_per_task": None, "sizes": [5, 5]}})


@pytest.mark.parametrize("method", ["finetune", "joint"])
def test_finetune_and_joint_run_as_plain_fl(method: str) -> None:
    build_config({"continual": {"method": method}, "tasks": {"classes_per_task": None}})
