"""RDA (`clients.semisup.rda`): the reciprocal alignment and its two losses on a hand-computed case and
against a literal copy of the official ``consistency_loss_rda``, the complementary labels, the 128-batch
ring buffers across a round boundary, and local training with the reverse head."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clients.local import LocalContext, step_seed, train_local
from clients.semisup import PSEUDO_LABELS, UnlabeledStep, View
from clients.semisup.rda import (
    BUFFERS,
    COMPLEMENTARY_KEY,
    RDA,
    REVERSE,
    RDAOptions,
    RingBuffer,
    complementary_labels,
    rda_losses,
    reciprocal_alignment,
)
from clients.terms import Step
from fedtail.models import array_to_numpy
from tests.test_semisup import _context as semisup_context

# --- the official code, copied literally as the reference (NJUyued/RDA4RobustSSL) -----------------------


def _official_ce_loss(
    logits: torch.Tensor, targets: torch.Tensor, use_hard_labels: bool = True, reduction: str = "none"
) -> torch.Tensor:
    """``train_utils.ce_loss``."""
    if use_hard_labels:
        return F.cross_entropy(logits, targets, reduction=reduction)
    log_pred = F.log_softmax(logits, dim=-1)
    return torch.sum(-targets * log_pred, dim=1)


def _official_normalize_d(x: torch.Tensor) -> torch.Tensor:
    """``models/rda/rda_utils.normalize_d``."""
    x_sum = torch.sum(x)
    x = x / x_sum
    return x.detach()


def _official_consistency_loss_rda(
    logits_x_ulb_w_reverse: torch.Tensor,
    logits_x_ulb_s_reverse: torch.Tensor,
    logits_w: torch.Tensor,
    logits_s: torch.Tensor,
    distri: torch.Tensor,
    distri_reverse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``models/rda/rda_utils.consistency_loss_rda`` (its ``ce`` branch, T = 1); also returns max_idx."""
    logits_w = logits_w.detach()
    logits_x_ulb_w_reverse = logits_x_ulb_w_reverse.detach()
    pseudo_label = torch.softmax(logits_w, dim=-1)
    pseudo_label_reverse = torch.softmax(logits_x_ulb_w_reverse, dim=-1)
    distri_ = torch.ones_like(distri) - distri
    distri_ = _official_normalize_d(distri_)
    pseudo_label_reverse_da = _official_normalize_d(
        pseudo_label_reverse * (torch.mean(distri_, dim=0) / torch.mean(distri_reverse, dim=0))
    )
    distri_reverse_ = torch.ones_like(distri_reverse) - distri_reverse
    distri_reverse_ = _official_normalize_d(distri_reverse_)
    pseudo_label_da = _official_normalize_d(
        pseudo_label * (torch.mean(distri_reverse_, dim=0) / torch.mean(distri, dim=0))
    )
    max_probs, max_idx = torch.max(pseudo_label_da, dim=-1)
    loss_cd = _official_ce_loss(logits_s, max_idx, use_hard_labels=True, reduction="none")
    loss_ca = _official_ce_loss(logits_x_ulb_s_reverse, pseudo_label_reverse_da, use_hard_labels=False)
    return loss_ca.mean(), loss_cd.mean(), max_idx


# --- the alignment and the losses -----------------------------------------------------------------------


def test_reciprocal_alignment_and_both_losses_by_hand() -> None:
    """pbar = (0.7, 0.3), pbar^r = (0.4, 0.6). Main: p (0.6, 0.4) * (0.6, 0.4) / (0.7, 0.3) flips the
    pseudo-label to class 1. Reverse: p^r (0.5, 0.5) * (0.3, 0.7) / (0.4, 0.6) = (0.375, 0.5833),
    normalised (9/23, 14/23). L_cd = -ln 0.75 for strong logits (0, ln 3); L_ca = ln 2 for (0, 0)."""
    distri = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    distri_reverse = torch.tensor([[0.5, 0.5], [0.3, 0.7]])
    probs, probs_reverse = torch.tensor([[0.6, 0.4]]), torch.tensor([[0.5, 0.5]])
    aligned, aligned_reverse = reciprocal_alignment(
        probs, probs_reverse, distri.mean(dim=0), distri_reverse.mean(dim=0)
    )
    main = torch.tensor([0.6 * 0.6 / 0.7, 0.4 * 0.4 / 0.3])
    torch.testing.assert_close(aligned[0], main / main.sum())
    assert aligned.argmax(dim=1).tolist() == [1] and probs.argmax(dim=1).tolist() == [0]
    torch.testing.assert_close(aligned_reverse[0], torch.tensor([9 / 23, 14 / 23]))
    loss_cd, loss_ca = rda_losses(
        torch.tensor([[0.0, math.log(3)]]), torch.tensor([[0.0, 0.0]]), aligned, aligned_reverse
    )
    assert loss_cd.item() == pytest.approx(-math.log(0.75))
    assert loss_ca.item() == pytest.approx(math.log(2))


def test_alignment_and_losses_match_the_official_consistency_loss_rda() -> None:
    """Random logits, 128-row buffers partly still at their official start (ones), read as
    ``ones_start`` reads them (the mean of all rows): the same pseudo-labels, L_cd and L_ca (the soft
    targets normalised over the whole batch, as ``normalize_d``)."""
    gen = torch.Generator().manual_seed(3)
    n, c = 6, 3
    logits_w, logits_s, rev_w, rev_s = (torch.randn(n, c, generator=gen) * 2 for _ in range(4))
    main, reverse = (RingBuffer.empty(128, c, torch.device("cpu"), ones=True) for _ in range(2))
    for _ in range(40):
        main.push(torch.softmax(torch.randn(5, c, generator=gen), dim=1))
        reverse.push(torch.softmax(torch.randn(5, c, generator=gen), dim=1))
    distri, distri_reverse = main.rows, reverse.rows
    assert bool((distri[40:] == 1).all())
    ref_ca, ref_cd, ref_labels = _official_consistency_loss_rda(
        rev_w, rev_s, logits_w, logits_s, distri, distri_reverse
    )
    means = main.mean(padded=True), reverse.mean(padded=True)
    aligned, aligned_reverse = reciprocal_alignment(
        torch.softmax(logits_w, dim=1), torch.softmax(rev_w, dim=1), *means
    )
    loss_cd, loss_ca = rda_losses(logits_s, rev_s, aligned, aligned_reverse)
    assert aligned.argmax(dim=1).tolist() == ref_labels.tolist()
    torch.testing.assert_close(loss_cd, ref_cd)
    torch.testing.assert_close(loss_ca, ref_ca)
    assert aligned_reverse.sum().item() == pytest.approx(1.0)  # the whole batch sums to 1, not each row
    _, per_sample = reciprocal_alignment(
        torch.softmax(logits_w, dim=1), torch.softmax(rev_w, dim=1), *means, True
    )
    torch.testing.assert_close(per_sample.sum(dim=1), torch.ones(n))
    torch.testing.assert_close(per_sample, aligned_reverse / aligned_reverse.sum(dim=1, keepdim=True))


# --- complementary labels --------------------------------------------------------------------------------


def test_complementary_labels_are_never_the_true_label_uniform_and_seeded() -> None:
    y = torch.arange(3000) % 5
    first = complementary_labels(y, 5, torch.Generator().manual_seed(7))
    again = complementary_labels(y, 5, torch.Generator().manual_seed(7))
    other = complementary_labels(y, 5, torch.Generator().manual_seed(8))
    assert not (first == y).any() and torch.equal(first, again) and not torch.equal(first, other)
    for k in range(5):  # the other four classes, about equally often
        counts = torch.bincount(first[y == k], minlength=5)
        assert counts[k] == 0 and (counts[torch.arange(5) != k] > 100).all()
    binary = complementary_labels(torch.tensor([0, 1, 1, 0]), 2, torch.Generator().manual_seed(0))
    assert binary.tolist() == [1, 0, 0, 1]


# --- the ring buffers across rounds ---------------------------------------------------------------------


def test_ring_buffer_averages_the_last_128_batch_means() -> None:
    """Before it is full, the mean of the batches written (``ones_start``: padded with the official
    ones); after 130 batches, the mean of the last 128 batch means either way."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.softmax(torch.randn(4, 3, generator=gen), dim=1) for _ in range(130)]
    cpu = torch.device("cpu")
    buffer, ones = RingBuffer.empty(128, 3, cpu), RingBuffer.empty(128, 3, cpu, ones=True)
    torch.testing.assert_close(buffer.mean(), torch.zeros(3))  # nothing written: no alignment to read
    for probs in batches[:10]:
        buffer.push(probs)
        ones.push(probs)
    ten = torch.stack([p.mean(dim=0) for p in batches[:10]])
    torch.testing.assert_close(buffer.mean(), ten.mean(dim=0))
    torch.testing.assert_close(ones.mean(padded=True), (ten.sum(dim=0) + 118) / 128)
    for probs in batches[10:]:
        buffer.push(probs)
        ones.push(probs)
    last = torch.stack([p.mean(dim=0) for p in batches[2:]]).mean(dim=0)
    torch.testing.assert_close(buffer.mean(), last)
    torch.testing.assert_close(ones.mean(padded=True), last)
    assert (buffer.position, buffer.filled) == (130 % 128, 128)


def _context(n_labeled: int = 20, n_unlabeled: int = 60, global_round: int = 1, **semisup) -> LocalContext:
    """One digits-shaped client (64 inputs, 10 classes) whose model carries RDA's reverse head."""
    ctx, _ = semisup_context("rda", n_labeled, n_unlabeled, **semisup)
    ctx.global_round = global_round
    return ctx


def _steps(count: int, seed: int, dim: int) -> list[UnlabeledStep]:
    """Random labeled and unlabeled features (``dim`` wide: the model's) and logits."""
    gen = torch.Generator().manual_seed(seed)

    def view() -> View:
        return View(torch.zeros(6, 64), torch.randn(6, dim, generator=gen), torch.randn(6, 10, generator=gen))

    steps = []
    for k in range(count):
        labeled = Step(
            torch.zeros(4, 64), torch.arange(4), torch.randn(4, dim, generator=gen), torch.randn(4, 10)
        )
        steps.append(UnlabeledStep(labeled, torch.arange(6), {"weak": view(), "strong": view()}, k, count))
    return steps


def _round(ctx: LocalContext, steps: list[UnlabeledStep]) -> RDA:
    method = RDA(ctx, RDAOptions())
    method.begin(np.arange(6))
    for step in steps:
        method.loss(step)
    method.end(len(steps))
    return method


def test_the_buffers_continue_across_a_round_boundary_through_the_client_state() -> None:
    """70 batches in one round and 60 in the next leave the buffers of 130 batches in one go: the last
    128 batch means of the weak views' main and reverse predictions, the position at 2, 128 filled."""
    ctx = _context()
    steps = _steps(130, 5, ctx.model.feature_dim)
    whole = _round(_context(), steps)
    _round(ctx, steps[:70])
    assert array_to_numpy(ctx.state[BUFFERS]["counters"]).tolist() == [70, 70]
    ctx.global_round = 2
    split = _round(ctx, steps[70:])
    torch.testing.assert_close(split.main.rows, whole.main.rows)
    torch.testing.assert_close(split.reverse.rows, whole.reverse.rows)
    assert (split.main.position, split.main.filled) == (whole.main.position, whole.main.filled) == (2, 128)
    means = torch.stack([torch.softmax(s.views["weak"].logits, dim=1).mean(dim=0) for s in steps[2:]])
    torch.testing.assert_close(split.main.mean(), means.mean(dim=0))
    stored = array_to_numpy(ctx.state[BUFFERS]["reverse"])
    np.testing.assert_array_equal(stored, split.reverse.rows.numpy())
    fresh = RDA(ctx, RDAOptions(batches=64))  # buffers of another size are not reused
    fresh.begin(np.arange(6))
    assert (fresh.main.position, fresh.main.filled) == (0, 0) and bool((fresh.main.rows == 0).all())


def test_every_pseudo_label_is_used_and_the_loss_includes_the_reverse_ce() -> None:
    ctx = _context()
    method = RDA(ctx, RDAOptions(lambda_u=0.0))
    method.begin(np.arange(6))
    step = _steps(1, 2, ctx.model.feature_dim)[0]
    out = method.loss(step)
    assert out.mask.tolist() == [1.0] * 6 and out.labels.shape == (6,)
    seed = step_seed(ctx.job.config.seed, 0, 1, 0, COMPLEMENTARY_KEY)  # task 0, round 1, client 0
    drawn = complementary_labels(step.labeled.y, 10, torch.Generator().manual_seed(seed))
    head = ctx.model.extra[REVERSE]
    torch.testing.assert_close(out.loss, F.cross_entropy(head(step.labeled.features), drawn))
    out.loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


# --- local training ----------------------------------------------------------------------------------------


def _arrays(ctx: LocalContext) -> list[np.ndarray]:
    params = [p.detach().numpy().copy() for p in ctx.model.parameters()]
    return params + [array_to_numpy(a) for a in ctx.state[BUFFERS].values()]


def test_rda_trains_the_reverse_head_seeded() -> None:
    ctx = _context()
    before = copy.deepcopy(ctx.model.extra[REVERSE].state_dict())
    loss, n = train_local(ctx, ctx.data.x, ctx.data.y)
    again = _context()
    loss2, _ = train_local(again, again.data.x, again.data.y)
    assert math.isfinite(loss) and loss > 0 and loss == loss2 and n == 80
    after = ctx.model.extra[REVERSE].state_dict()
    assert not torch.equal(before["weight"], after["weight"])
    for a, b in zip(_arrays(ctx), _arrays(again), strict=True):
        np.testing.assert_array_equal(a, b)
    steps = 2 * math.ceil(20 / 8)
    assert array_to_numpy(ctx.state[BUFFERS]["counters"]).tolist() == [steps, steps]
    counts = {k: array_to_numpy(v) for k, v in ctx.reply[PSEUDO_LABELS].items()}
    assert counts["used_true"].sum() == counts["seen"].sum() == steps * 56  # no threshold


def test_a_client_without_labels_trains_on_the_unlabeled_losses_alone() -> None:
    ctx = _context(n_labeled=0)
    loss, n = train_local(ctx, ctx.data.x, ctx.data.y)
    assert math.isfinite(loss) and loss > 0 and n == 60
