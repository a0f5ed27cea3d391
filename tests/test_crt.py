"""cRT (Kang et al. 2020) as a federated stage: classifier rows re-initialised, features frozen exactly,
class-balanced classifier-only training on clients, resume inside the stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from clients.local import LocalContext, retrain_classifier
from fedtail import pipeline, runs
from fedtail.models import build_model, reinit_classifier, to_arrays, to_state_dict
from fedtail.protocol import Job
from tests.conftest import crashed_run, smoke_config, smoke_run


def test_reinit_replaces_only_the_given_classes_rows() -> None:
    trained = build_model("mlp", (8,), 4, 6, seed=0)
    fresh = build_model("mlp", (8,), 4, 6, seed=1)
    out = to_state_dict(reinit_classifier(to_arrays(trained), fresh, [1, 3]))
    old, new = trained.state_dict(), fresh.state_dict()
    for key in old:
        if not key.startswith("classifier."):
            assert torch.equal(out[key], old[key]), key
    for key in ("classifier.weight", "classifier.bias"):
        assert torch.equal(out[key][[1, 3]], new[key][[1, 3]])
        assert torch.equal(out[key][[0, 2]], old[key][[0, 2]])


def _context(project: Path, **overrides) -> LocalContext:
    cfg = smoke_config(project, **{"tasks.classes_per_task": None, "crt.rounds": 1, **overrides})
    model = build_model("mlp", (64,), 10, 16, seed=0)
    return LocalContext(
        job=Job(cfg, project, project),
        partition_id=0,
        task=0,
        global_round=3,
        task_classes=list(range(10)),
        seen_classes=list(range(10)),
        class_prior=np.full(10, 0.1),
        class_counts=np.zeros(10, dtype=np.int64),
        model=model,
        global_model_fn=lambda: model,
        state=None,  # type: ignore[arg-type]
        device=torch.device("cpu"),
    )


def test_retrain_classifier_trains_the_head_only(project: Path) -> None:
    ctx = _context(project)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60, dtype=np.int64), np.arange(1, 10)]  # one head class, nine single samples
    x = (rng.normal(size=(y.size, 64)) + y[:, None]).astype(np.float32)
    loss, n = retrain_classifier(ctx, x, y)
    after = ctx.model.state_dict()
    assert n == y.size and np.isfinite(loss)
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same is (not key.startswith("classifier.")), key


def test_class_balanced_head_beats_plain_on_the_tail(project: Path, monkeypatch) -> None:
    """The stage's defining choice: with a frozen representation, class-balanced batches pull the
    classifier's decision towards the tail that instance sampling (shuffled batches) neglects."""
    import clients.local

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 64)).astype(np.float32)
    y = np.r_[np.zeros(400, dtype=np.int64), np.ones(8, dtype=np.int64)]
    x = centres[y] + 2.0 * rng.normal(size=(y.size, 64)).astype(np.float32)
    x_test = centres[np.r_[np.zeros(200, int), np.ones(200, int)]] + 2.0 * rng.normal(size=(400, 64))
    recall = {}
    shuffled = clients.local.epoch_order
    for sampler in ("class_balanced", "shuffle"):
        if sampler == "shuffle":
            monkeypatch.setattr(clients.local, "epoch_order", lambda y, _, g: shuffled(y, "shuffle", g))
        ctx = _context(project, **{"train.epochs": 5})
        retrain_classifier(ctx, x, y)
        with torch.no_grad():
            pred = ctx.model(torch.from_numpy(x_test.astype(np.float32))).argmax(1).numpy()
        recall[sampler] = float((pred[200:] == 1).mean())
    assert recall["class_balanced"] > recall["shuffle"] + 0.2, recall


def test_crt_stage_follows_each_task_with_frozen_features(project: Path) -> None:
    plain_dir, _ = smoke_run(project, "crt-off", **{"tasks.classes_per_task": None})
    crt_dir, metrics = smoke_run(project, "crt-on", **{"tasks.classes_per_task": None, "crt.rounds": 2})
    rows = pd.read_csv(crt_dir / "rounds.csv")
    assert list(rows["stage"]) == ["fl", "fl", "crt", "crt"]
    assert list(rows["round"]) == [1, 2, 3, 4] and list(rows["global_round"]) == [1, 2, 3, 4]
    plain = pd.read_csv(plain_dir / "rounds.csv")
    pd.testing.assert_frame_equal(rows.iloc[:2].drop(columns="stage"), plain.drop(columns="stage"))
    a = torch.load(plain_dir / "model.pt", weights_only=True)
    b = torch.load(crt_dir / "model.pt", weights_only=True)
    for key in a:  # the features after the stage are bit-for-bit those the federated rounds left
        assert torch.equal(a[key], b[key]) is (not key.startswith("classifier.")), key
    assert metrics["final_balanced_accuracy"] == rows["balanced_accuracy"].iloc[-1].round(6)


def test_two_tasks_count_crt_rounds_in_the_global_round(project: Path) -> None:
    run_dir, _ = smoke_run(project, "crt-tasks", **{"crt.rounds": 1})
    rows = pd.read_csv(run_dir / "rounds.csv")
    assert list(rows["stage"]) == ["fl", "fl", "crt"] * 2
    assert list(rows["global_round"]) == [1, 2, 3, 4, 5, 6]


def test_crash_inside_the_stage_resumes_to_the_same_result(project: Path) -> None:
    _, reference = smoke_run(project, "crt-ref", **{"crt.rounds": 2, "tasks.classes_per_task": None})
    cfg = smoke_config(
        project, **{"output.run_id": "crt-crash", "crt.rounds": 2, "tasks.classes_per_task": None}
    )
    run_dir = crashed_run(cfg, project, crash_at=3)  # after the first cRT round
    staged = pipeline.stage(cfg, project)
    pipeline.simulate(cfg, staged, pipeline.partition(cfg, staged, project), run_dir, mode=runs.Mode.RESUME)
    assert json.loads((run_dir / "metrics.json").read_text()) == reference
