"""iCaRL: its sigmoid distillation, the nearest-mean-of-exemplars classifier built from clients' sums, and
a federated run that scores the end of each task through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from clients.continual.icarl import ICaRL, nearest_mean_scores, sigmoid_distillation
from clients.continual.memory import Memory, features_of
from clients.local import ClientData
from fedtail.config import build_config
from fedtail.models import build_model, to_arrays
from tests.conftest import local_context, smoke_run


def test_sigmoid_distillation_is_the_papers_bce_against_the_old_outputs() -> None:
    student = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [-1.0, 3.0]])
    q = torch.sigmoid(teacher)
    g = torch.sigmoid(student)
    by_hand = -(q * g.log() + (1 - q) * (1 - g).log()).sum() / 2  # summed over classes, mean over samples
    assert float(sigmoid_distillation(student, teacher)) == pytest.approx(float(by_hand), rel=1e-6)


def test_nearest_mean_scores_rank_classes_by_distance_of_normalised_features() -> None:
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    feats = torch.tensor([[10.0, 1.0], [0.2, 3.0], [-5.0, -4.0]])
    scores = nearest_mean_scores(feats, means)
    phi = feats / feats.norm(dim=1, keepdim=True)
    want = -((phi[:, None, :] - means[None]) ** 2).sum(-1)
    torch.testing.assert_close(scores, want, atol=1e-6, rtol=1e-6)
    assert scores.argmax(dim=1).tolist() == [0, 1, 2]


def _client(seed: int) -> ClientData:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), 6)
    x = (rng.normal(size=(24, 5)) + y[:, None]).astype(np.float32)
    return ClientData(x=x, y=y, x_unlabeled=np.zeros((0, 5), np.float32))


def test_class_means_from_two_clients_are_the_mean_of_all_their_exemplars() -> None:
    """Task 1 of [0, 1] | [2, 3] ends: each client herds the exemplars it keeps from now on with the
    end-of-task model and sends per-class sums; the server's mean is the mean over both clients'
    exemplars (normalised features, renormalised), as one client holding them all would compute."""
    cfg = build_config({"continual": {"method": "icarl", "options": {"memory_size": 20}}})
    model = build_model("mlp", (5,), 10, 8, 0).eval()
    previous = build_model("mlp", (5,), 10, 8, 1)
    sums, kept = [], []
    for pid, data in enumerate([_client(0), _client(1)]):
        state = RecordDict()
        ctx = local_context(
            cfg, model, data=data, task=1, task_classes=[2, 3], seen_classes=[0, 1, 2, 3],
            previous_model_fn=lambda: previous, state=state, partition_id=pid,
        )  # fmt: skip
        sums.append(ICaRL(ctx).task_statistics({}, 0))
        after = local_context(
            cfg, model, data=data, task=2, task_classes=[], seen_classes=[0, 1, 2, 3],
            previous_model_fn=lambda: model, state=RecordDict(), partition_id=pid,
        )  # fmt: skip
        from clients.continual.memory import update_memory

        memory, _ = update_memory(after, 20, "herding")
        assert sorted(np.bincount(memory.labels).tolist()) == [5, 5, 5, 5]  # 20 slots over 4 classes
        kept.append((data, memory))
    total = {k: sums[0][k] + sums[1][k] for k in sums[0]}
    _, head = ICaRL.head_from_statistics(
        total, {}, 0, arrays=to_arrays(model), old=[0, 1], new=[2, 3], options=ICaRL.Options()
    )
    for c in range(4):
        phi = np.concatenate(
            [features_of(model, d.x[m.indices[m.labels == c]], torch.device("cpu")) for d, m in kept]
        )
        phi /= np.linalg.norm(phi, axis=1, keepdims=True)
        mean = phi.mean(axis=0)
        np.testing.assert_allclose(head["class-means"][c], mean / np.linalg.norm(mean), rtol=1e-6, atol=1e-9)
    assert head["counts"][:4].tolist() == [10, 10, 10, 10] and head["counts"][4:].sum() == 0
    logits = ICaRL.evaluation_logits(model, torch.from_numpy(_client(2).x), head)
    assert logits.shape == (24, 10) and bool((logits[:, 4:] <= -1e8).all())  # classes without a mean
    assert Memory.load(RecordDict()).indices.size == 0


def test_icarl_scores_the_end_of_each_task_by_nearest_means(project) -> None:
    """The end-of-task rows (tasks.csv) use the class means, so they differ from the last round's row,
    which scores the network's own head on the same model."""
    import csv

    run_dir, metrics = smoke_run(project, "icarl", **{"continual.method": "icarl"})
    rounds = list(csv.DictReader((run_dir / "rounds.csv").open()))
    tasks = list(csv.DictReader((run_dir / "tasks.csv").open()))
    last_round = [r for r in rounds if r["task"] == "1"][-1]  # tasks numbered from 1 in the files
    assert float(tasks[0]["balanced_accuracy"]) != pytest.approx(float(last_round["balanced_accuracy"]))
    assert metrics["final_balanced_accuracy"] == pytest.approx(float(tasks[-1]["balanced_accuracy"]))


@pytest.mark.parametrize("engine", [{"engine.workers": 2}, {"engine.name": "ray"}])
def test_the_statistics_exchange_gives_the_same_run_on_every_engine(project, engine: dict) -> None:
    """The end-of-task exchange travels as Flower EVALUATE messages: worker processes and Ray deliver
    them like train messages, and the summed statistics do not depend on who answered first."""
    name = "-".join(f"{k}-{v}" for k, v in engine.items())
    _, reference = smoke_run(project, f"icarl-ref-{name}", **{"continual.method": "icarl"})
    _, other = smoke_run(
        project,
        f"icarl-{name}",
        **{"continual.method": "icarl", **engine},
    )
    for key, value in reference.items():
        if isinstance(value, float):
            assert other[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert other[key] == value, key


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"evaluation": {"adjustment": "posthoc_la"}}, "evaluation.adjustment='posthoc_la'"),
        ({"crt": {"rounds": 1}}, "crt.rounds=1"),
    ],
)
def test_icarl_refuses_what_nearest_means_would_ignore(override: dict, match: str) -> None:
    from fedtail.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        build_config({"continual": {"method": "icarl"}, **override})
