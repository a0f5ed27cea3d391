"""Semi-supervised local updates (`clients.semisup`): each method's defining math on a tiny case, the
pseudo-label counts summed over clients, the unlabeled stream in the training loop (one forward pass,
seeded, clients without labels) and the config rules."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from clients.local import ClientData, LocalContext, train_local
from clients.semisup import (
    COUNTS,
    PSEUDO_LABELS,
    PseudoLabelCounts,
    consistency_loss,
    pseudo_label_columns,
)
from clients.semisup.da import align
from clients.semisup.fixmatch import confident_pseudo_labels
from clients.semisup.flexmatch import SELECTED, flexible_thresholds, learning_effect
from fedtail import protocol as P
from fedtail.config import ConfigError, build_config
from fedtail.models import array_from_numpy, array_to_numpy, build_model, model_for
from fedtail.protocol import Job
from fedtail.registry import SEMISUP
from strategies.base import summed_records

# --- the methods' math ------------------------------------------------------------------------------------


def test_fixmatch_masks_by_confidence_and_averages_over_the_whole_batch() -> None:
    """FixMatch eq. 4: 1(max q >= tau) H(argmax q, p_strong), divided by mu B (masked rows count)."""
    weak = torch.tensor([[4.0, 0.0], [0.0, 0.1]])  # confident class 0; unsure
    labels, confidence, mask = confident_pseudo_labels(weak, 0.95)
    assert labels.tolist() == [0, 1] and mask.tolist() == [1.0, 0.0]
    assert confidence[0].item() == pytest.approx(math.exp(4) / (math.exp(4) + 1))
    strong = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    expected = -math.log(math.exp(1) / (math.exp(1) + math.exp(2))) / 2  # one used row over 2
    assert consistency_loss(strong, labels, mask).item() == pytest.approx(expected)


def test_flexmatch_learning_effect_with_warm_up_and_convex_mapping() -> None:
    """beta(c) = sigma(c) / max(max sigma, N - sum sigma) (eq. 11); T(c) = beta / (2 - beta) tau."""
    selected = torch.tensor([-1, -1, 0, 0, 1])  # sigma = (2, 1, 0), 2 unmarked
    beta = learning_effect(selected, 3)
    assert beta.tolist() == [1.0, 0.5, 0.0]
    assert flexible_thresholds(beta, 0.95).tolist() == pytest.approx([0.95, 0.95 / 3, 0.0])
    assert learning_effect(torch.full((4,), -1), 3).tolist() == [0.0, 0.0, 0.0]  # nothing learned yet
    warm = learning_effect(torch.tensor([0, 0, 0, 1, -1]), 2)  # most marked: max sigma rules
    assert warm.tolist() == pytest.approx([1.0, 1 / 3])


def test_distribution_alignment_moves_predictions_towards_the_prior() -> None:
    """ReMixMatch eq. 1: q~ = Normalize(q p(y) / p~(y))."""
    q = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    out = align(q, torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(out[0], torch.tensor([0.8, 0.2]))
    expected = torch.tensor([0.9 * 1.6, 0.1 * 0.4])
    torch.testing.assert_close(out[1], expected / expected.sum())
    assert torch.allclose(align(q, torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7])), q)  # aligned already


def test_softmatch_weights_are_a_truncated_gaussian_of_confidence() -> None:
    """SoftMatch eq. 7: weight 1 at or above mu_t, exp(-(p - mu)^2 / (2 sigma^2 / n_sigma^2)) below."""
    from clients.semisup.softmatch import soft_weights

    w = soft_weights(torch.tensor([0.9, 0.7, 0.5]), mu=0.7, var=0.04, n_sigma=2.0)
    assert w[:2].tolist() == [1.0, 1.0]
    assert w[2].item() == pytest.approx(math.exp(-(0.2**2) / (2 * 0.04 / 4)))


def test_pseudo_label_mixup_loss_and_regularisers() -> None:
    """Arazo et al.: lambda CE(mixed, t) + (1 - lambda) CE(mixed, t[perm]); R_A against the prior on the
    batch's mean softmax; R_H the mean entropy."""
    from clients.semisup.pseudo_label import mixup_loss, regularisers

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    perm = torch.tensor([1, 0])
    log_p = torch.log_softmax(logits, dim=1)
    ce_a = -(targets * log_p).sum(1).mean()
    ce_b = -(targets[perm] * log_p).sum(1).mean()
    assert mixup_loss(logits, targets, perm, 0.25).item() == pytest.approx((0.25 * ce_a + 0.75 * ce_b).item())
    p = torch.softmax(logits, dim=1)
    r_a, r_h = regularisers(logits, torch.tensor([0.5, 0.5]))
    assert r_a.item() == pytest.approx(-(0.5 * torch.log(p.mean(0))).sum().item())
    assert r_h.item() == pytest.approx(-(p * torch.log(p)).sum(1).mean().item())
    balanced, _ = regularisers(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0.5, 0.5]))
    assert balanced.item() == pytest.approx(math.log(2))  # its minimum: the mean prediction is the prior


def test_daso_blend_weights_and_semantic_scores() -> None:
    """DASO eq. 5: nu = m^(1/T) / sum, then / max: the most predicted class gets 1; eq. 6's semantic
    scores are cosine similarities over T_proto, 0 against an empty (zero) prototype."""
    from clients.semisup.daso import blend_weights, semantic_scores

    m = torch.tensor([0.6, 0.3, 0.1])
    torch.testing.assert_close(blend_weights(m, 1.0), torch.tensor([1.0, 0.5, 1 / 6]))
    sharp = blend_weights(m, 0.5)  # T < 1 sharpens: the tail's weight drops
    torch.testing.assert_close(sharp, torch.tensor([1.0, 0.25, 1 / 36]))
    protos = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    scores = semantic_scores(torch.tensor([[3.0, 0.0]]), protos, 0.05)
    torch.testing.assert_close(scores, torch.tensor([[20.0, 0.0, 0.0]]))


def test_curriculum_stages_and_percentile_selection() -> None:
    """Cascante-Bonilla et al.: the top delta, 2 delta, ... share of confidences, stages as equal slices
    of the run's rounds; the threshold is the (100 - x)-th percentile."""
    from clients.semisup.curriculum import curriculum_mask, stage_share

    assert [stage_share(r, 30, 0.2) for r in (1, 6, 7, 12, 13, 30)] == pytest.approx(
        [0.2, 0.2, 0.4, 0.4, 0.6, 1.0]
    )
    assert stage_share(5, 4, 0.2) == 1.0  # at most everything
    conf = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    assert curriculum_mask(conf, 0.4).tolist() == [False, True, False, True, False]
    assert curriculum_mask(conf, 1.0).all() and curriculum_mask(np.zeros(0), 0.5).size == 0


# --- pseudo-label counts ----------------------------------------------------------------------------------


def test_pseudo_label_counts_and_columns() -> None:
    counts = PseudoLabelCounts(3, torch.device("cpu"))
    hidden = torch.tensor([0, 0, 1, 2])
    labels = torch.tensor([0, 1, 1, 1])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    counts.add(hidden, labels, mask)
    arrays = counts.as_arrays()
    assert arrays["seen"].tolist() == [2, 1, 1]
    assert arrays["used_true"].tolist() == [2, 0, 1]
    assert arrays["predicted"].tolist() == [1, 2, 0]
    assert arrays["correct"].tolist() == [1, 0, 0]
    cols = pseudo_label_columns(arrays, 3)
    assert cols["pl_used"] == 0.75 and cols["pl_precision"] == pytest.approx(1 / 3)
    assert cols["pl_precision_0"] == 1.0 and cols["pl_precision_1"] == 0.0
    assert math.isnan(cols["pl_precision_2"]) and cols["pl_recall_0"] == 0.5 and cols["pl_used_2"] == 1.0


def test_server_sums_the_counts_over_clients_not_averages() -> None:
    def reply(seen: list[int]) -> dict:
        record = ArrayRecord({n: array_from_numpy(np.array(seen, dtype=np.int64)) for n in COUNTS})
        return {PSEUDO_LABELS: record, "other": ConfigRecord({"x": 1})}

    summed = summed_records([reply([1, 2]), reply([3, 0])])
    assert list(summed) == [PSEUDO_LABELS]
    assert summed[PSEUDO_LABELS]["seen"].tolist() == [4, 2]


# --- the training loop --------------------------------------------------------------------------------------


def _context(method: str, n_labeled: int, n_unlabeled: int, **semisup) -> tuple[LocalContext, ClientData]:
    """One digits-shaped client (64 inputs, 10 classes) with ``n_labeled`` / ``n_unlabeled`` samples."""
    cfg = build_config(
        {
            "semisup": {"method": method, **semisup},
            "partition": {"labeled_fraction": 0.5},
            "tasks": {"classes_per_task": None},
            "train": {"epochs": 2, "batch_size": 8},
        }
    )
    rng = np.random.default_rng(0)
    y = np.arange(n_labeled + n_unlabeled) % 10
    x = (rng.normal(size=(len(y), 64)) + y[:, None] * 0.3).astype(np.float32)
    data = ClientData(
        x=x[:n_labeled],
        y=y[:n_labeled],
        x_unlabeled=x[n_labeled:],
        y_hidden=y[n_labeled:],
        index=np.arange(n_labeled),
        index_unlabeled=np.arange(n_labeled, len(y)),
    )
    model = build_model("mlp", (64,), 10, 16, 0)
    if SEMISUP.get(method).modules(cfg, (64,), 16):  # the method's own layers join the model
        model = model_for(cfg, (64,))
    frozen = copy.deepcopy(model)
    ctx = LocalContext(
        job=Job(cfg, Path("."), Path(".")),
        partition_id=0,
        task=0,
        global_round=1,
        task_classes=list(range(10)),
        seen_classes=list(range(10)),
        class_prior=np.full(10, 0.1),
        class_counts=data.class_counts(10),
        model=model,
        global_model_fn=lambda: frozen,
        state=RecordDict(),
        device=torch.device("cpu"),
        data=data,
        sample_index=np.arange(n_labeled),
        unlabeled_index=np.arange(n_unlabeled),
        message=RecordDict({P.CONFIG: ConfigRecord()}),
    )
    return ctx, data


def _train(
    method: str, n_labeled: int = 20, n_unlabeled: int = 60, **semisup
) -> tuple[LocalContext, float, int]:
    ctx, data = _context(method, n_labeled, n_unlabeled, **semisup)
    loss, n = train_local(ctx, data.x, data.y)
    return ctx, loss, n


def _params(ctx: LocalContext) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ctx.model.parameters()]


@pytest.mark.parametrize(
    "method", ["fixmatch", "flexmatch", "da", "softmatch", "pseudo_label", "daso", "curriculum"]
)
def test_a_method_trains_on_the_unlabeled_stream_seeded(method: str) -> None:
    first, loss, n = _train(method)
    again, loss2, _ = _train(method)
    assert math.isfinite(loss) and loss == loss2
    assert all(torch.equal(a, b) for a, b in zip(_params(first), _params(again), strict=True))
    assert n == 20 + 60  # semisup.count_unlabeled: the unlabeled samples count in FedAvg's weight
    counts = {k: array_to_numpy(v) for k, v in first.reply[PSEUDO_LABELS].items()}
    steps = 2 * math.ceil(20 / 8)  # labeled epochs set the steps; each draws mu B = 56 unlabeled samples
    assert counts["seen"].sum() == steps * 56
    assert (counts["correct"] <= counts["predicted"]).all() and (counts["used_true"] <= counts["seen"]).all()


def test_supervised_only_draws_no_unlabeled_batch_and_weighs_labels_only() -> None:
    ctx, _, n = _train("none")
    assert n == 20 and PSEUDO_LABELS not in ctx.reply


def test_the_unlabeled_stream_leaves_the_labeled_stream_unchanged() -> None:
    """lambda_u = 0: the unlabeled term adds nothing; the model must equal supervised-only's up to the
    one forward pass over more rows (BatchNorm-free MLP: the same numbers)."""
    plain, _, _ = _train("none")
    silent, _, _ = _train("fixmatch", options={"lambda_u": 0.0})
    for a, b in zip(_params(plain), _params(silent), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_count_unlabeled_off_weighs_labels_only() -> None:
    _, _, n = _train("fixmatch", count_unlabeled=False)
    assert n == 20


def test_a_client_without_labels_trains_on_its_unlabeled_samples() -> None:
    ctx, loss, n = _train("fixmatch", n_labeled=0, n_unlabeled=60, options={"threshold": 0.05})
    assert n == 60 and math.isfinite(loss) and loss > 0
    before = build_model("mlp", (64,), 10, 16, 0)
    moved = [not torch.equal(a, b.detach()) for a, b in zip(_params(ctx), before.parameters(), strict=True)]
    assert any(moved)
    seen = array_to_numpy(ctx.reply[PSEUDO_LABELS]["seen"]).sum()
    assert seen == 2 * math.ceil(60 / 56) * 56  # one pass over the unlabeled part per epoch


def test_pseudo_label_keeps_soft_labels_from_the_received_model_then_the_latest() -> None:
    from clients.semisup.pseudo_label import SOFT_LABELS

    ctx, _, _ = _train("pseudo_label")
    soft = array_to_numpy(ctx.state[SOFT_LABELS]["soft"])
    assert soft.shape == (60, 10) and np.allclose(soft.sum(axis=1), 1.0, atol=1e-5)


def test_daso_pretrains_then_blends_with_the_previous_rounds_pseudo_label_distribution() -> None:
    from clients.local import train_local
    from clients.semisup.daso import PL_DIST

    ctx, data = _context("daso", 20, 60)
    train_local(ctx, data.x, data.y)
    dist = array_to_numpy(ctx.state[PL_DIST]["dist"])
    assert dist.shape == (10,) and dist.sum() == pytest.approx(1.0)
    first = _params(ctx)
    again, _ = _context("daso", 20, 60)  # the same round with a distribution in the state: blended
    again.state[PL_DIST] = ctx.state[PL_DIST]
    train_local(again, data.x, data.y)
    assert any(not torch.equal(a, b) for a, b in zip(first, _params(again), strict=True))


def test_flexmatch_keeps_its_per_sample_marks_in_the_client_state() -> None:
    ctx, _, _ = _train("flexmatch", options={"threshold": 0.15})
    marks = array_to_numpy(ctx.state[SELECTED]["selected"])
    assert marks.shape == (60,) and (marks >= 0).any() and marks.max() < 10


def test_a_semi_supervised_run_reports_its_pseudo_labels(project: Path) -> None:
    """End to end (in-process): rounds.csv's pseudo-label columns, metrics.json's summary, the plot."""
    import pandas as pd

    from tests.conftest import smoke_run

    run_dir, metrics = smoke_run(
        project, "ss", **{"semisup.method": "fixmatch", "partition.labeled_fraction": 0.3}
    )
    rounds = pd.read_csv(run_dir / "rounds.csv")
    assert {
        "pl_precision",
        "pl_used",
        "tail_pl_precision",
        "pl_precision_0",
        "pl_recall_9",
        "pl_used_4",
    } <= set(rounds.columns)
    assert ((rounds["pl_used"] >= 0) & (rounds["pl_used"] <= 1)).all()
    assert 0.0 <= metrics["final_pl_precision"] <= 1.0
    from fedtail.report import write_report

    write_report(run_dir)  # the flow's report step
    assert (run_dir / "plots" / "pseudo_labels.png").is_file()
    assert "pseudo_labels.png" in (run_dir / "report.md").read_text()


# --- config -------------------------------------------------------------------------------------------------


def test_a_method_without_an_unlabeled_part_is_refused_naming_the_fields() -> None:
    with pytest.raises(ConfigError, match=r"semisup.method='fixmatch'.*partition.labeled_fraction"):
        build_config({"semisup": {"method": "fixmatch"}})


def test_auto_augmentations_resolve_to_the_dataset_pair_with_options_filled() -> None:
    cfg = build_config({"semisup": {"method": "fixmatch"}, "partition": {"labeled_fraction": 0.1}})
    assert (cfg.semisup.weak, cfg.semisup.strong) == ("shift", "randaugment")
    assert cfg.semisup.weak_options == {"max_shift": 0.125}
    m1d = build_config(
        {
            "dataset": {"name": "mnist1d"},
            "semisup": {"method": "fixmatch"},
            "partition": {"labeled_fraction": 0.1},
        }
    )
    assert (m1d.semisup.weak, m1d.semisup.strong) == ("signal_weak", "signal_strong")


def test_an_augmentation_of_another_modality_or_a_bad_option_is_refused() -> None:
    base = {"dataset": {"name": "mnist1d"}, "partition": {"labeled_fraction": 0.1}}
    with pytest.raises(ConfigError, match=r"semisup.weak='flip_shift'.*signal.*signal_weak"):
        build_config({**base, "semisup": {"method": "fixmatch", "weak": "flip_shift"}})
    with pytest.raises(ConfigError, match=r"semisup.strong_options.*unknown option 'bogus'"):
        build_config({**base, "semisup": {"method": "fixmatch", "strong_options": {"bogus": 1}}})
    with pytest.raises(ConfigError, match=r"unknown augmentation 'nope'"):
        build_config({**base, "semisup": {"method": "fixmatch", "weak": "nope"}})
    with pytest.raises(ConfigError, match=r"option 'threshold'"):
        build_config({**base, "semisup": {"method": "fixmatch", "options": {"threshold": 1.5}}})


# --- partitions: the unlabeled part's distribution, open-world classes ----------------------------------


def test_unlabeled_counts_follow_simpro_protocol() -> None:
    from fedtail.partition import long_tail_profile, unlabeled_counts

    available = np.array([[60, 40, 30], [40, 20, 10]])  # class totals 100, 60, 40
    assert np.array_equal(unlabeled_counts(available, "rest", 10.0), available)
    uniform = unlabeled_counts(available, "uniform", 10.0)
    assert uniform.sum(axis=0).tolist() == [40, 40, 40]  # the smallest class bounds the head
    assert uniform[:, 2].tolist() == [30, 10]  # all of class 2, spread as available
    consistent = unlabeled_counts(available, "consistent", 4.0).sum(axis=0)
    assert consistent.tolist() == long_tail_profile(3, 100, 4.0).tolist()  # head 100 fits: 100, 50, 25
    reversed_ = unlabeled_counts(available, "reversed", 4.0).sum(axis=0)
    head = max(h for h in range(101) if (long_tail_profile(3, h, 4.0)[::-1] <= [100, 60, 40]).all())
    assert (
        reversed_.tolist() == long_tail_profile(3, head, 4.0)[::-1].tolist() and reversed_[2] > reversed_[0]
    )
    assert (unlabeled_counts(available, "reversed", 4.0) <= available).all()
    with pytest.raises(ValueError, match="partition.unlabeled_distribution='bogus'; allowed: rest"):
        unlabeled_counts(available, "bogus", 4.0)


def _partition(**partition):
    from fedtail.partition import partition_labels

    cfg = build_config(
        {
            "partition": {"labeled_fraction": 0.2, "imbalance_factor": 1.0, **partition},
            "tasks": {"classes_per_task": None},
        }
    )
    labels = np.repeat(np.arange(10), 100)
    return partition_labels(labels, 10, cfg), labels


def test_a_reversed_unlabeled_part_and_novel_classes_in_the_partition() -> None:
    base, labels = _partition(labeled_imbalance_factor=10.0)
    rev, _ = _partition(labeled_imbalance_factor=10.0, unlabeled_distribution="reversed")

    def per_class(result, labeled: bool) -> np.ndarray:
        idx = np.concatenate(
            [i[m == labeled] for i, m in zip(result.client_indices, result.labeled, strict=True)]
        )
        return np.bincount(labels[idx], minlength=10)

    assert np.array_equal(per_class(base, True), per_class(rev, True))  # the same labels
    u = per_class(rev, False)
    assert u[9] > u[0] and (np.diff(u) >= 0).all()  # the unlabeled tail is class 0
    assert rev.params["unlabeled_distribution"] == "reversed"
    assert sorted(np.concatenate(rev.client_indices).tolist()) == rev.kept.tolist()
    novel, _ = _partition(novel_classes=[3, 7])
    assert per_class(novel, True)[[3, 7]].tolist() == [0, 0] and per_class(novel, False)[[3, 7]].tolist() == [
        100,
        100,
    ]
    assert base.params.get("novel_classes") is None


def test_partition_rules_name_the_fields() -> None:
    with pytest.raises(ConfigError, match=r"partition.novel_classes=\[3, 3\]; allowed: distinct"):
        build_config({"partition": {"novel_classes": [3, 3]}})
    with pytest.raises(ConfigError, match=r"partition.unlabeled_distribution='uniform'.*labeled_fraction"):
        build_config({"partition": {"unlabeled_distribution": "uniform"}})


def test_sweeps_can_summarise_every_pseudo_label_and_open_world_metric() -> None:
    from fedtail.sweep import METRICS
    from server.recorder import OPEN_WORLD_COLUMNS, PSEUDO_LABEL_COLUMNS

    assert {f"final_{k}" for k in (*PSEUDO_LABEL_COLUMNS, *OPEN_WORLD_COLUMNS)} <= set(METRICS)


def test_cluster_accuracy_is_accuracy_under_the_best_label_map() -> None:
    """ORCA's / FedoSSL's novel-class score: Hungarian matching of predicted onto true labels."""
    from fedtail.metrics import cluster_accuracy, open_world_accuracies

    y = np.array([3, 3, 4, 4, 4, 5])
    assert cluster_accuracy(y, np.array([7, 7, 1, 1, 1, 2])) == 1.0  # a relabelling costs nothing
    assert cluster_accuracy(y, np.array([1, 1, 1, 1, 1, 1])) == pytest.approx(3 / 6)  # one label: one class
    assert cluster_accuracy(y, np.array([4, 3, 4, 4, 3, 5])) == pytest.approx(4 / 6)
    scores = open_world_accuracies(np.array([0, 1, 3, 3, 4]), np.array([0, 2, 4, 4, 3]), novel=[3, 4])
    assert scores["seen_accuracy"] == 0.5 and scores["novel_accuracy"] == 1.0
    assert scores["all_accuracy"] == 1.0  # over all classes the map may also send 2 to 1
    assert math.isnan(open_world_accuracies(np.array([0]), np.array([0]), novel=[3])["novel_accuracy"])


def test_an_open_world_run_reports_seen_novel_and_all_accuracy(project: Path) -> None:
    import pandas as pd

    from tests.conftest import smoke_run

    run_dir, metrics = smoke_run(
        project,
        "ow",
        **{
            "semisup.method": "fixmatch",
            "partition.labeled_fraction": 0.5,
            "partition.novel_classes": [1, 6],
        },
    )
    rounds = pd.read_csv(run_dir / "rounds.csv")
    assert {"seen_accuracy", "novel_accuracy", "all_accuracy"} <= set(rounds.columns)
    assert 0.0 <= metrics["final_all_accuracy"] <= 1.0 and 0.0 <= metrics["final_novel_accuracy"] <= 1.0
