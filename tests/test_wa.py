"""WA: the weight aligning of eq. 6-7 on a small case, its training loss, the server step, and the
refusal of a cosine head."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from clients.continual.lwf import distillation_loss
from clients.continual.wa import WeightAligning, weight_align
from clients.local import ClientData
from fedtail.config import ConfigError, build_config
from fedtail.models import array_to_numpy, build_model, to_arrays
from tests.conftest import local_context, smoke_run


def test_weight_align_scales_new_rows_to_the_old_mean_norm() -> None:
    w = np.array([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.0, 20.0], [1.0, 1.0]], dtype=np.float32)
    out, gamma = weight_align(w, old=[0, 1], new=[2, 3])
    assert gamma == pytest.approx((5 + 1) / 2 / ((10 + 20) / 2))  # mean old norm / mean new norm
    np.testing.assert_allclose(out[[2, 3]], w[[2, 3]] * gamma, rtol=1e-6)
    np.testing.assert_array_equal(out[[0, 1, 4]], w[[0, 1, 4]])  # old and unseen rows untouched
    new_norms = np.linalg.norm(out[[2, 3]], axis=1)
    assert new_norms.mean() == pytest.approx(np.linalg.norm(w[[0, 1]], axis=1).mean())
    assert weight_align(w, old=[], new=[0, 1])[1] == 1.0


def test_the_server_step_aligns_the_classifier_and_keeps_the_rest() -> None:
    model = build_model("mlp", (4,), 6, 8, 0)
    arrays = to_arrays(model)
    out = WeightAligning.end_task_on_server(arrays, [0, 1], [2, 3])
    want, _ = weight_align(array_to_numpy(arrays["classifier.weight"]), [0, 1], [2, 3])
    np.testing.assert_array_equal(array_to_numpy(out["classifier.weight"]), want)
    for key in arrays:
        if key != "classifier.weight":
            np.testing.assert_array_equal(array_to_numpy(out[key]), array_to_numpy(arrays[key]))
    assert isinstance(out, ArrayRecord)


def test_wa_weighs_ce_and_distillation_by_the_share_of_old_classes() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 5)
    data = ClientData(rng.normal(size=(30, 4)).astype(np.float32), y, np.zeros((0, 4), np.float32))
    cfg = build_config({"continual": {"method": "wa", "options": {"memory_size": 10}}})
    teacher = build_model("mlp", (4,), 10, 8, 1)
    ctx = local_context(
        cfg,
        build_model("mlp", (4,), 10, 8, 0),
        data=data,
        task=2,
        task_classes=[4, 5],
        seen_classes=[0, 1, 2, 3, 4, 5],
        previous_model_fn=lambda: copy.deepcopy(teacher),
    )
    method = WeightAligning(ctx)
    assert method.objective_weight() == pytest.approx(1 - 4 / 6)
    x = torch.from_numpy(data.x[:7])
    logits = ctx.model(x)
    want = 4 / 6 * distillation_loss(logits[:, :4], teacher(x)[:, :4], 2.0)
    torch.testing.assert_close(method.extra_loss(logits, torch.zeros(7), x), want)


def test_wa_needs_a_linear_classifier() -> None:
    with pytest.raises(ConfigError, match="model.classifier"):
        build_config({"continual": {"method": "wa"}, "model": {"classifier": "cosine"}})


def test_wa_run_ends_each_task_with_aligned_norms(project: Path) -> None:
    run_dir, metrics = smoke_run(project, "cil-wa", **{"tasks.classes_per_task": 2, "continual.method": "wa"})
    state = torch.load(run_dir / "model.pt", weights_only=True)
    norms = state["classifier.weight"].double().norm(dim=1).numpy()
    schedule = __import__("json").loads((run_dir / "schedule.json").read_text())["tasks"]
    old, new = [c for t in schedule[:-1] for c in t], schedule[-1]
    assert norms[new].mean() == pytest.approx(norms[old].mean(), rel=1e-5)
    assert __import__("yaml").safe_load((run_dir / "config.yaml").read_text())["continual"]["method"] == "wa"
    tasks = (run_dir / "tasks.csv").read_text().splitlines()
    header, last = tasks[0].split(","), tasks[-1].split(",")
    for key in ("old_class_accuracy", "new_class_accuracy", "balanced_accuracy"):  # the aligned model's
        assert metrics[f"final_{key}"] == pytest.approx(float(last[header.index(key)]), abs=1e-6)
