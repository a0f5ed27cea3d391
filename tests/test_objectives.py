"""Local rebalancing objectives: each one's defining math on a tiny case (by hand in numpy, and against
scikit-learn where it has the same quantity), whose class counts they use, and that each trains."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from sklearn.utils.class_weight import compute_class_weight
from torch.nn import functional as F

from clients import local
from clients.local import LocalContext, train_local
from fedtail.config import ConfigError, build_config
from fedtail.models import build_model
from fedtail.protocol import Job
from fedtail.registry import OBJECTIVES

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [0.0, 1.0, 0.0], [1.0, -2.0, 0.5]])
Y = torch.tensor([0, 2, 1, 1])
GLOBAL = np.array([50, 5, 1])
LOCAL = np.array([3, 1, 0])


def _ctx(
    objective: str, options: dict | None = None, net: torch.nn.Module | None = None, **sections: dict
) -> LocalContext:
    train = {"objective": objective, "options": options or {}, "epochs": 5, "batch_size": 8, "lr": 0.05}
    train.update(sections.pop("train", {}))
    if objective == "ldam":
        sections.setdefault("model", {"classifier": "cosine"})
    cfg = build_config({"train": train, **sections})
    model = net or build_model("mlp", (3,), 10, 4, 0, classifier=cfg.model.classifier)
    frozen = copy.deepcopy(model)
    return LocalContext(
        job=Job(cfg, Path("."), Path(".")),
        partition_id=0,
        task=0,
        global_round=1,
        task_classes=[0, 1, 2],
        seen_classes=[0, 1, 2],
        class_prior=GLOBAL / GLOBAL.sum(),
        class_counts=LOCAL,
        model=model,
        global_model_fn=lambda: frozen,
        state=RecordDict(),
        device=torch.device("cpu"),
        global_counts=GLOBAL,
        train_counts=LOCAL,
    )


def _loss(objective: str, **options) -> float:
    obj = OBJECTIVES.get(objective)(_ctx(objective, options))
    obj.begin()
    return float(obj.loss(LOGITS, Y, torch.zeros(4, 1)))


def _nll(probs: np.ndarray) -> np.ndarray:
    """-log p_y per sample from a (batch, classes) probability table."""
    return -np.log(probs[np.arange(len(Y)), Y.numpy()])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_balanced_softmax_is_count_weighted_softmax() -> None:
    """Ren et al. 2020, eq. 4: p_j = n_j e^{z_j} / sum_k n_k e^{z_k}."""
    z = LOGITS.double().numpy()
    probs = GLOBAL * np.exp(z) / (GLOBAL * np.exp(z)).sum(1, keepdims=True)
    assert _loss("balanced_softmax") == pytest.approx(_nll(probs).mean(), rel=1e-5)
    local = LOCAL * np.exp(z) / (LOCAL * np.exp(z)).sum(1, keepdims=True)  # class 2 absent: no mass
    ok = Y.numpy() != 2
    obj = OBJECTIVES.get("balanced_softmax")(_ctx("balanced_softmax", {"counts": "local"}))
    obj.begin()
    got = obj.loss(LOGITS[ok], Y[ok], torch.zeros(3, 1))
    assert float(got) == pytest.approx(-np.log(local[ok, Y.numpy()[ok]]).mean(), rel=1e-5)


def test_logit_adjustment_adds_tau_log_prior() -> None:
    """Menon et al. 2021, eq. 10: CE(z + tau log pi); tau = 1 is Balanced Softmax, tau = 0 is CE."""
    z, prior = LOGITS.double().numpy(), GLOBAL / GLOBAL.sum()
    assert _loss("logit_adjusted", tau=0.5) == pytest.approx(
        _nll(_softmax(z + 0.5 * np.log(prior))).mean(), rel=1e-5
    )
    assert _loss("logit_adjusted", tau=1.0) == pytest.approx(_loss("balanced_softmax"), rel=1e-6)
    assert _loss("logit_adjusted", tau=0.0) == pytest.approx(float(F.cross_entropy(LOGITS, Y)), rel=1e-6)


def test_focal_loss_down_weights_easy_examples() -> None:
    """Lin et al. 2017, eq. 5: -(1 - p_t)^gamma log p_t; gamma = 0 is CE."""
    p = _softmax(LOGITS.double().numpy())[np.arange(4), Y.numpy()]
    assert _loss("focal", gamma=2.0) == pytest.approx(np.mean(-((1 - p) ** 2) * np.log(p)), rel=1e-5)
    assert _loss("focal", gamma=0.0) == pytest.approx(float(F.cross_entropy(LOGITS, Y)), rel=1e-6)
    w = GLOBAL.sum() / (3 * GLOBAL)
    w = w / w.mean()  # mean 1 over the classes: the loss keeps CE's scale
    expected = np.mean(-w[Y.numpy()] * (1 - p) ** 2 * np.log(p))
    assert _loss("focal", gamma=2.0, alpha="inverse") == pytest.approx(expected, rel=1e-5)


def test_inverse_frequency_weights_are_scikit_learns_balanced_weights() -> None:
    labels = np.repeat([0, 1, 2], GLOBAL)
    sk = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=labels)
    obj = OBJECTIVES.get("weighted_ce")(_ctx("weighted_ce"))
    obj.begin()
    np.testing.assert_allclose(obj.weight.numpy(), sk, rtol=1e-6)
    ce = F.cross_entropy(LOGITS, Y, reduction="none").double().numpy()
    w = sk[Y.numpy()]
    assert _loss("weighted_ce") == pytest.approx((w * ce).sum() / w.sum(), rel=1e-5)
    local = OBJECTIVES.get("weighted_ce")(_ctx("weighted_ce", {"counts": "local"}))
    local.begin()  # absent class 2 weighs 0; the present two as scikit-learn weighs them
    np.testing.assert_allclose(
        local.weight.numpy(),
        [*compute_class_weight("balanced", classes=np.array([0, 1]), y=np.array([0, 0, 0, 1])), 0.0],
        rtol=1e-6,
    )


def test_class_balanced_weights_are_inverse_effective_numbers() -> None:
    """Cui et al. 2019, eq. 5: w_c proportional to (1 - beta) / (1 - beta^n_c), summing to C."""
    beta = 0.9
    effective = (1 - beta**GLOBAL) / (1 - beta)
    w = (1 / effective) / (1 / effective).sum() * 3
    ce = F.cross_entropy(LOGITS, Y, reduction="none").double().numpy()
    assert _loss("class_balanced", beta=beta) == pytest.approx(np.mean(w[Y.numpy()] * ce), rel=1e-5)
    assert _loss("class_balanced", beta=0.0) == pytest.approx(float(F.cross_entropy(LOGITS, Y)), rel=1e-6)
    near_one = OBJECTIVES.get("class_balanced")(_ctx("class_balanced", {"beta": 0.999999}))
    near_one.begin()  # beta -> 1: inverse frequency
    inverse = (1 / GLOBAL) / (1 / GLOBAL).sum() * 3
    np.testing.assert_allclose(near_one.weight.numpy(), inverse, rtol=1e-3)
    local = OBJECTIVES.get("class_balanced")(_ctx("class_balanced", {"beta": beta, "counts": "local"}))
    local.begin()  # this round's counts [3, 1, 0]: the absent class weighs 0, the two present sum to 2
    e = (1 - beta ** np.array([3, 1])) / (1 - beta)
    np.testing.assert_allclose(local.weight.numpy(), [*((1 / e) / (1 / e).sum() * 2), 0.0], rtol=1e-6)
    p = _softmax(LOGITS.double().numpy())[np.arange(4), Y.numpy()]
    focal = np.mean(w[Y.numpy()] * -((1 - p) ** 2) * np.log(p))
    assert _loss("class_balanced", beta=beta, loss="softmax_focal", gamma=2.0) == pytest.approx(
        focal, rel=1e-5
    )


def test_ldam_margins_and_deferred_reweighting() -> None:
    """Cao et al. 2019, eq. 13 and Algorithm 1, as the official code computes them: m_j = C n_j^-1/4 with
    max m = max_m, loss CE(s (cos - m_y 1_y)) with class-balanced weights (beta 0.9999) from 80 % of the
    rounds on. The model's cosine head outputs s cos, so LOGITS here play s cos."""
    s, max_m = 30.0, 0.5
    m = GLOBAL**-0.25
    m = m * max_m / m.max()
    z = LOGITS.double().numpy()
    shifted = z - s * m[None, :] * np.eye(3)[Y.numpy()]
    nll = _nll(_softmax(shifted))

    def ldam(global_round: int, **options) -> float:
        ctx = _ctx("ldam", options, federation={"rounds_per_task": 10})
        ctx.global_round = global_round
        obj = OBJECTIVES.get("ldam")(ctx)
        obj.begin()
        return float(obj.loss(LOGITS, Y, torch.zeros(4, 1)))

    assert ldam(8) == pytest.approx(nll.mean(), rel=1e-5)  # rounds 1..8 of 10: no re-weighting
    beta = 0.9999
    w = (1 - beta) / (1 - beta**GLOBAL)
    w = w / w.sum() * 3
    wy = w[Y.numpy()]
    assert ldam(9) == pytest.approx((wy * nll).sum() / wy.sum(), rel=1e-5)  # rounds 9, 10: DRW
    assert ldam(10, drw_start=1.0) == pytest.approx(nll.mean(), rel=1e-5)  # LDAM without DRW


def test_ldam_steps_the_learning_rate_down_with_drw() -> None:
    """The official code multiplies the learning rate by 0.01 at the epoch DRW starts."""

    def scale(global_round: int, **options) -> float:
        ctx = _ctx("ldam", options, federation={"rounds_per_task": 10})
        ctx.global_round = global_round
        obj = OBJECTIVES.get("ldam")(ctx)
        obj.begin()
        return obj.lr_scale()

    assert scale(8) == 1.0 and scale(9) == 0.01 and scale(9, drw_lr_scale=1.0) == 1.0
    assert OBJECTIVES.get("ce")(_ctx("ce")).lr_scale() == 1.0


def test_the_objectives_lr_scale_reaches_the_optimizer(monkeypatch) -> None:
    seen = []
    real = local.make_optimizer
    monkeypatch.setattr(local, "make_optimizer", lambda m, job, lr=None: seen.append(lr) or real(m, job, lr))
    net = build_model("mlp", (3,), 3, 4, 0, classifier="cosine")
    ctx = _ctx("ldam", {"drw_start": 0.0}, net=net, federation={"rounds_per_task": 10})
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    local.train_local(ctx, x, np.array([0, 1, 2, 0, 1, 2, 0, 1]))
    assert seen == [pytest.approx(0.05 * 0.01)]


def test_ldam_needs_the_cosine_classifier() -> None:
    with pytest.raises(ConfigError, match="model.classifier=cosine"):
        build_config({"train": {"objective": "ldam"}})
    assert build_config({"train": {"objective": "ldam"}, "model": {"classifier": "cosine"}})


@pytest.mark.parametrize(
    ("objective", "options", "message"),
    [
        ("focal", {"gamma": -1.0}, "gamma"),
        ("class_balanced", {"beta": 1.0}, "beta"),
        ("logit_adjusted", {"counts": "both"}, "counts"),
        ("balanced_softmax", {"tau": 1.0}, "tau"),
    ],
)
def test_bad_objective_options_are_refused_before_work(objective: str, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"train": {"objective": objective, "options": options}})


@pytest.mark.parametrize(
    "objective", ["weighted_ce", "class_balanced", "focal", "balanced_softmax", "logit_adjusted", "ldam"]
)
def test_each_objective_trains_a_long_tailed_toy_problem(objective: str) -> None:
    """Three separable classes, 40 / 8 / 2 samples: every objective fits them; the round's counts are
    the training labels'."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [40, 8, 2]).astype(np.int64)
    x = (rng.normal(size=(50, 3)) * 0.3 + np.eye(3)[y] * 3).astype(np.float32)
    torch.manual_seed(0)
    classifier = "cosine" if objective == "ldam" else "linear"
    net = build_model("mlp", (3,), 10, 16, 0, classifier=classifier)
    ctx = _ctx(objective, net=net, model={"classifier": classifier}, train={"epochs": 20})
    ctx.train_counts, ctx.global_counts = None, np.bincount(y, minlength=10)
    train_local(ctx, x, y)
    np.testing.assert_array_equal(ctx.train_counts[:3], [40, 8, 2])
    with torch.no_grad():
        pred = ctx.model(torch.from_numpy(x)).argmax(1).numpy()
    assert (pred == y).mean() == 1.0


def _tail_recall(objective: str, options: dict | None = None, sampler: str = "shuffle", **train) -> float:
    """Recall of the rarest class on a balanced probe after training on overlapping long-tailed data
    (400 / 40 / 10 samples), from the same initial model and batch order for every objective."""
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [1.2, 0.0], [0.0, 1.2]])
    y = np.repeat([0, 1, 2], [400, 40, 10]).astype(np.int64)
    x = (rng.normal(size=(450, 2)) + centres[y]).astype(np.float32)
    probe_y = np.repeat([0, 1, 2], 500)
    probe_x = (rng.normal(size=(1500, 2)) + centres[probe_y]).astype(np.float32)
    classifier = "cosine" if objective == "ldam" else "linear"
    model = build_model("mlp", (2,), 10, 16, 0, classifier=classifier)
    sections = {
        "model": {"classifier": classifier},
        "federation": {"rounds_per_task": 1},
        "train": {"epochs": 40, "batch_size": 32, "sampler": sampler, **train},
    }
    ctx = _ctx(objective, options, net=model, **sections)
    ctx.global_counts = np.bincount(y, minlength=10)
    train_local(ctx, x, y)
    with torch.no_grad():
        pred = ctx.model(torch.from_numpy(probe_x))[:, :3].argmax(1).numpy()
    return float(np.mean(pred[probe_y == 2] == 2))


@pytest.mark.parametrize(
    ("objective", "options"),
    [
        ("weighted_ce", {}),
        ("class_balanced", {"beta": 0.999}),
        ("balanced_softmax", {}),
        ("logit_adjusted", {}),
        ("focal", {"alpha": "inverse"}),
        ("ldam", {"drw_start": 0.0}),
    ],
)
def test_rebalancing_objectives_recognise_the_tail_class_more_than_ce(objective: str, options: dict) -> None:
    """What they are for: on overlapping classes, CE sacrifices the rare class; each rebalancing loss
    recovers much more of it than CE (LDAM with the same cosine head compared against its own CE)."""
    baseline = _tail_recall("ce") if objective != "ldam" else _tail_recall_cosine_ce()
    assert _tail_recall(objective, options) > baseline + 0.2


def _tail_recall_cosine_ce() -> float:
    """CE on the cosine head: LDAM with zero margins and no re-weighting is exactly that."""
    return _tail_recall("ldam", {"max_m": 1e-9, "drw_start": 1.0})


def test_a_federation_sends_clients_the_global_counts(project: Path, tmp_path: Path) -> None:
    """The server's class counts reach the clients: a global-count objective trains every client."""
    import csv

    from fedtail import pipeline
    from tests.conftest import smoke_config

    cfg = smoke_config(
        project,
        **{"train.objective": "class_balanced", "output.runs_dir": str(tmp_path), "output.run_id": "cb"},
    )
    staged = pipeline.stage(cfg, project)
    run_dir = pipeline.simulate(cfg, staged, pipeline.partition(cfg, staged, project), tmp_path / "cb")
    with (run_dir / "rounds.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["num_failed"] == "0" and int(r["num_sampled"]) > 0 for r in rows)
