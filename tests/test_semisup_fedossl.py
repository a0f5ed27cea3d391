"""FedoSSL (`clients.semisup.fedossl`): each loss on a hand-computable case and against a literal copy of
the official code (cugzj/FedoSSL, placed below as the reference), the server part's clustering and
alignment on a tiny case, and the method in the training loop (finite, seeded, the cluster terms once
the server sends centroids)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from flwr.app import ArrayRecord

from clients.local import train_local
from clients.semisup import PSEUDO_LABELS
from clients.semisup.fedossl import (
    CENTROIDS,
    LOCAL,
    PREDICTED,
    SUMS,
    FedoSSLOptions,
    FedoSSLServer,
    align_centroids,
    batch_entropy,
    cluster_loss,
    cluster_probs,
    cluster_pseudo_loss,
    global_clustering,
    labeled_partners,
    local_clustering,
    margin_logits,
    mean_uncertainty,
    pairwise_loss,
    sinkhorn,
    suppressed_loss,
    suppression_weights,
    unlabeled_partners,
)
from fedtail.config import build_config
from fedtail.models import array_from_numpy, array_to_numpy
from tests.test_semisup import _context, _params

# --- the official code, copied (utils.py, fedossl_cifar.py / fedossl_cinic.py `train`, resnet_s.py) ------
# Only what the copy cannot run as released is changed, each marked "changed:".


class OfficialMarginLoss(nn.Module):
    def __init__(self, m=0.2, weight=None, s=10):
        super().__init__()
        self.m = m
        self.s = s
        self.weight = weight

    def forward(self, x, target):
        index = torch.zeros_like(x, dtype=torch.bool)  # changed: uint8 (torch.where wants a bool mask now)
        index.scatter_(1, target.data.view(-1, 1), 1)
        x_m = x - self.m * self.s
        output = torch.where(index, x_m, x)
        return F.cross_entropy(output, target, weight=self.weight)


def official_entropy(x):
    EPS = 1e-8
    x_ = torch.clamp(x, min=EPS)
    b = x_ * torch.log(x_)
    if len(b.size()) == 2:
        return -b.sum(dim=1).mean()
    elif len(b.size()) == 1:
        return -b.sum()


def official_pairs_and_bce(feat, prob, prob2, target):
    """The official ``train``'s partner search and ``bce_loss`` (batch_size = all rows)."""
    bce = nn.BCELoss()
    feat_detach = feat.detach()
    feat_norm = feat_detach / torch.norm(feat_detach, 2, 1, keepdim=True)
    cosine_dist = torch.mm(feat_norm, feat_norm.t())
    labeled_len = len(target)
    pos_pairs = []
    target_np = target.cpu().numpy()
    for i in range(labeled_len):
        target_i = target_np[i]
        idxs = np.where(target_np == target_i)[0]
        if len(idxs) == 1:
            pos_pairs.append(idxs[0])
        else:
            selec_idx = np.random.choice(idxs, 1)
            while selec_idx == i:
                selec_idx = np.random.choice(idxs, 1)
            pos_pairs.append(int(selec_idx))
    unlabel_cosine_dist = cosine_dist[labeled_len:, :]
    vals, pos_idx = torch.topk(unlabel_cosine_dist, 2, dim=1)
    pos_idx = pos_idx[:, 1].cpu().numpy().flatten().tolist()
    pos_pairs.extend(pos_idx)
    batch_size = len(prob)
    pos_prob = prob2[pos_pairs, :]
    pos_sim = torch.bmm(prob.view(batch_size, 1, -1), pos_prob.view(batch_size, -1, 1)).squeeze()
    ones = torch.ones_like(pos_sim)
    return pos_pairs, bce(pos_sim, ones)


def official_l_reg(reg_prob, p_weight):
    """``fedossl_cinic.py``'s ``L_reg1`` (its ``copy.deepcopy`` of a detached tensor as ``clone``)."""
    copy_reg_prob1 = reg_prob.detach().clone()
    reg_label1 = np.argmax(copy_reg_prob1.cpu().numpy(), axis=1)
    for idx, (label, oprob) in enumerate(zip(reg_label1, copy_reg_prob1, strict=True)):  # noqa: B007
        copy_reg_prob1[idx][label] = 1
    L1_loss = nn.L1Loss()
    L_reg1 = 0.0
    for idx, (ooutput, otarget, label) in enumerate(zip(reg_prob, copy_reg_prob1, reg_label1, strict=True)):  # noqa: B007
        L_reg1 = L_reg1 + L1_loss(reg_prob[idx], copy_reg_prob1[idx]) * p_weight[label]
    return L_reg1 / len(reg_label1)


def official_p_weight(last_unlabel_num, beta=0.2):
    Nk = last_unlabel_num
    Nmax = max(last_unlabel_num)
    if Nmax > 0:
        return [beta ** (1 - Nk[i] / Nmax) for i in range(len(Nk))]
    return [beta for i in range(len(Nk))]


def official_cluster_terms(feat, feat2, output, centroids_weight, T, pos_pairs, labeled_len):
    """The official ``L_cluster`` and ``unlabel_ce_loss`` (``MarginLoss(m=0)``)."""
    C = centroids_weight.detach().clone().T
    Z1 = F.normalize(feat, dim=1)
    Z2 = F.normalize(feat2, dim=1)
    cP1 = Z1 @ C
    cZ2 = Z2 @ C
    tP1 = F.softmax(cP1 / T, dim=1)
    confidence_cluster_pred, cluster_pred = tP1.max(1)
    tP2 = F.softmax(cZ2 / T, dim=1)
    threshold = 0.95
    confidence_mask = confidence_cluster_pred[labeled_len:] > threshold
    confidence_mask = torch.nonzero(confidence_mask)
    confidence_mask = torch.squeeze(confidence_mask)
    cluster_pos_prob = tP2[pos_pairs, :]
    logcluster_pos_prob = torch.log(cluster_pos_prob)
    L_cluster = -torch.sum(tP1 * logcluster_pos_prob, dim=1).mean()
    unlabel_ce = OfficialMarginLoss(m=0)
    unlabel_ce_loss = unlabel_ce(
        output[labeled_len:].index_select(0, confidence_mask),
        cluster_pred[labeled_len:].index_select(0, confidence_mask),
    )
    return L_cluster, unlabel_ce_loss


def official_sknopp(cZ, lamd=25, max_iters=100):
    with torch.no_grad():
        N_samples, N_centroids = cZ.shape
        probs = F.softmax(cZ * lamd, dim=1).T
        r = torch.ones((N_centroids, 1), device=probs.device) / N_centroids
        c = torch.ones((N_samples, 1), device=probs.device) / N_samples
        inv_N_centroids = 1.0 / N_centroids
        inv_N_samples = 1.0 / N_samples
        err = 1e3
        for it in range(max_iters):
            r = inv_N_centroids / (probs @ c)
            c_new = inv_N_samples / (r.T @ probs).T
            if it % 10 == 0:
                err = torch.nansum(torch.abs(c / c_new - 1))
            c = c_new
            if err < 1e-2:
                break
        probs *= c.squeeze()
        probs = probs.T
        probs *= r.squeeze()
        return probs * N_samples


def official_local_clustering(Z, init_rows, N_local):
    """``local_clustering`` on the memory Z (changed: the initial rows are given, not np.random.choice)."""
    with torch.no_grad():
        centroids = Z[init_rows].clone()
        local_iters = 5
        for it in range(local_iters):  # noqa: B007
            assigns = official_sknopp(Z @ centroids.T, max_iters=10)
            choice_cluster = torch.argmax(assigns, dim=1)
            for index in range(N_local):
                selected = torch.nonzero(choice_cluster == index).squeeze()
                selected = torch.index_select(Z, 0, selected)
                if selected.shape[0] == 0:
                    selected = Z[torch.randint(len(Z), (1,))]
                centroids[index] = F.normalize(selected.mean(dim=0), dim=0)
    return centroids


class OfficialServer(nn.Module):
    """The global model's clustering part (``resnet_s.py``)."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.centroids = nn.Linear(dim, num_classes, bias=False)
        self.T = 0.1

    def global_clustering(self, Z1, nG=1.0, nL=1.0, total_rounds=500):  # changed: total_rounds an argument
        optimizer = torch.optim.SGD(self.centroids.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        for round_idx in range(total_rounds):  # noqa: B007
            with torch.no_grad():
                SK_assigns = official_sknopp(self.centroids(Z1))
            optimizer.zero_grad()
            probs1 = F.softmax(self.centroids(F.normalize(Z1, dim=1)) / self.T, dim=1)
            cos_loss = F.cosine_similarity(SK_assigns, probs1, dim=-1).mean()
            loss = -cos_loss
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                self.centroids.weight.copy_(F.normalize(self.centroids.weight.data.clone(), dim=1))


def official_set_labeled_feature_centroids(C, labeled_feature_centroids, labeled_num, num_classes):
    """``set_labeled_feature_centroids`` (changed: ``labeled_num`` and the class count are arguments,
    not 6 and 10; C and the labeled centroids are passed in rather than read from the model)."""
    assignment = [999 for _ in range(labeled_num)]
    not_assign_list = [i for i in range(num_classes)]
    C = C.detach().clone()
    labeled_feature_centroids = labeled_feature_centroids[:labeled_num].detach().clone()
    copy_C = copy.deepcopy(C)
    C_norm = C
    labeled_norm = labeled_feature_centroids / torch.norm(labeled_feature_centroids, 2, 1, keepdim=True)
    cosine_dist = torch.mm(labeled_norm, C_norm.t())
    vals, pos_idx = torch.topk(cosine_dist, 2, dim=1)
    pos_idx_1 = pos_idx[:, 0].cpu().numpy().flatten().tolist()
    pos_idx_2 = pos_idx[:, 1].cpu().numpy().flatten().tolist()
    for idx in range(labeled_num):
        if pos_idx_1[idx] not in assignment:
            assignment[idx] = pos_idx_1[idx]
            not_assign_list.remove(assignment[idx])
        else:
            assignment[idx] = pos_idx_2[idx]
            not_assign_list.remove(assignment[idx])
    for idx in range(num_classes):
        if idx < labeled_num:
            C[idx] = copy_C[assignment[idx]]
        else:
            C[idx] = copy_C[not_assign_list[idx - labeled_num]]
    return C


# --- the losses ------------------------------------------------------------------------------------------


def test_adaptive_margin_adds_s_u_to_the_target_logit_as_the_official_margin_loss() -> None:
    logits, y = torch.tensor([[0.0, 0.0]]), torch.tensor([0])
    assert F.cross_entropy(margin_logits(logits, y, 0.1, 10.0), y).item() == pytest.approx(
        math.log(1 + math.exp(-1.0))
    )
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    ours = F.cross_entropy(margin_logits(logits, y, 0.3, 10.0), y)
    torch.testing.assert_close(ours, OfficialMarginLoss(m=-0.3)(logits, y))
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    assert mean_uncertainty(probs) == pytest.approx(1 - 0.75)


def test_pairwise_loss_and_entropy_by_hand() -> None:
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert pairwise_loss(p, p, torch.tensor([0, 1])).item() == pytest.approx(math.log(2) / 2)
    assert pairwise_loss(p, p, torch.tensor([1, 0])).item() == pytest.approx(math.log(2))  # <e0, (.5,.5)>
    assert batch_entropy(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(math.log(2))
    assert batch_entropy(torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_partners_and_pairwise_loss_match_the_official_code() -> None:
    torch.manual_seed(1)
    n_l, n_u, c = 4, 7, 5
    feat, logits, logits2 = torch.randn(n_l + n_u, 8), torch.randn(n_l + n_u, c), torch.randn(n_l + n_u, c)
    y = torch.tensor([0, 1, 2, 3])  # one sample a class: each labeled sample is its own partner
    prob, prob2 = torch.softmax(logits, 1), torch.softmax(logits2, 1)
    pairs, bce = official_pairs_and_bce(feat, prob, prob2, y)
    ours = torch.cat([labeled_partners(y, torch.Generator().manual_seed(0)), unlabeled_partners(feat, n_l)])
    assert ours.tolist() == [int(p) for p in pairs]
    torch.testing.assert_close(pairwise_loss(prob, prob2, ours), bce)
    torch.testing.assert_close(batch_entropy(prob), official_entropy(prob.mean(0)))


def test_labeled_partners_are_another_sample_of_the_class_seeded() -> None:
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    for seed in range(20):
        partners = labeled_partners(y, torch.Generator().manual_seed(seed))
        assert (y[partners] == y).all()
        assert partners[2] == 2  # alone in its class
        assert all(int(partners[i]) != i for i in (0, 1, 3, 4, 5))
    again = [labeled_partners(y, torch.Generator().manual_seed(3)).tolist() for _ in range(2)]
    assert again[0] == again[1]


def test_suppressed_loss_by_hand_and_against_the_official_loop() -> None:
    weights = suppression_weights(torch.tensor([4.0, 2.0, 0.0]), 0.2)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.2**0.5, 0.2], dtype=torch.float64))
    assert suppression_weights(torch.zeros(3), 0.2).tolist() == pytest.approx([0.2] * 3)  # nothing counted
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    expected = (1.0 * 0.3 / 3 + 0.2 * 0.4 / 3) / 2
    assert suppressed_loss(probs, weights).item() == pytest.approx(expected)
    torch.manual_seed(2)
    logits = torch.randn(9, 5, requires_grad=True)
    counts = [30.0, 12.0, 0.0, 5.0, 1.0]
    reference = official_l_reg(torch.softmax(logits, 1), official_p_weight(counts))
    ours = suppressed_loss(torch.softmax(logits, 1), suppression_weights(torch.tensor(counts), 0.2))
    torch.testing.assert_close(ours, reference.float())
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(
        official_l_reg(torch.softmax(logits, 1), official_p_weight(counts)), logits
    )
    torch.testing.assert_close(g_ours, g_ref.float())


def test_cluster_terms_match_the_official_code() -> None:
    torch.manual_seed(3)
    n_l, n_u, d, c = 3, 8, 6, 4
    centroids = F.normalize(torch.randn(c, d), dim=1)
    feat = torch.randn(n_l + n_u, d)
    feat[n_l : n_l + 4] = centroids[1] * 5 + 0.01 * torch.randn(4, d)  # confident: cluster 1
    feat2, output = torch.randn(n_l + n_u, d), torch.randn(n_l + n_u, c)
    partners = torch.cat([torch.arange(n_l), unlabeled_partners(feat, n_l)])
    ref_cluster, ref_pseudo = official_cluster_terms(
        feat, feat2, output, centroids, 0.1, partners.tolist(), n_l
    )
    t1, t2 = cluster_probs(feat, centroids, 0.1), cluster_probs(feat2, centroids, 0.1)
    torch.testing.assert_close(cluster_loss(t1, t2, partners), ref_cluster)
    pseudo, labels, mask = cluster_pseudo_loss(output[n_l:], t1[n_l:], 0.95)
    torch.testing.assert_close(pseudo, ref_pseudo)
    assert mask[:4].tolist() == [1.0] * 4 and (labels[:4] == 1).all()
    none, _, empty = cluster_pseudo_loss(output[n_l:], torch.full((n_u, c), 1 / c), 0.95)
    assert none.item() == 0.0 and empty.sum() == 0  # the official code's mean over nothing is NaN


# --- the clustering --------------------------------------------------------------------------------------


def test_sinkhorn_and_local_clustering_match_the_official_code() -> None:
    torch.manual_seed(4)
    scores = torch.randn(40, 5)
    torch.testing.assert_close(sinkhorn(scores), official_sknopp(scores))
    torch.testing.assert_close(sinkhorn(scores, max_iters=10), official_sknopp(scores, max_iters=10))
    groups = F.normalize(torch.randn(4, 8), dim=1)
    memory = F.normalize(groups.repeat_interleave(16, 0) + 0.05 * torch.randn(64, 8), dim=1)
    init = torch.tensor([0, 16, 32, 48])
    ours = local_clustering(memory, init, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, official_local_clustering(memory, init, 4))
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(4))


def test_global_clustering_matches_the_official_code() -> None:
    torch.manual_seed(5)
    points = F.normalize(torch.randn(24, 6), dim=1)
    official = OfficialServer(6, 3)
    start = official.centroids.weight.detach().clone()
    official.global_clustering(points, total_rounds=60)
    ours = global_clustering(points, start, 0.1, 60, 0.01)
    torch.testing.assert_close(ours, official.centroids.weight.detach(), rtol=1e-4, atol=1e-5)


def test_alignment_puts_each_seen_class_on_its_centroid_as_the_official_code() -> None:
    rng = np.random.default_rng(6)
    centroids = rng.normal(size=(5, 4))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    labeled = centroids[[3, 0, 4]] + 0.05 * rng.normal(size=(3, 4))  # seen classes 0, 1, 2
    labeled = np.vstack([labeled, np.zeros((2, 4))])
    ours = align_centroids(centroids, labeled, [0, 1, 2])
    reference = official_set_labeled_feature_centroids(
        torch.tensor(centroids), torch.tensor(labeled), 3, 5
    ).numpy()
    np.testing.assert_allclose(ours, reference)
    np.testing.assert_allclose(ours[:3], centroids[[3, 0, 4]])
    np.testing.assert_allclose(ours[3:], centroids[[1, 2]])  # novel rows: the free ones in index order
    moved = align_centroids(centroids, np.vstack([labeled[:1], 0 * labeled[:1], labeled[1:2]]), [0, 2])
    np.testing.assert_allclose(moved[[0, 2]], centroids[[3, 0]])  # novel ids need not be the last ones
    np.testing.assert_allclose(moved[[1, 3, 4]], centroids[[1, 2, 4]])


def _server(num_classes: int = 3) -> FedoSSLServer:
    cfg = build_config(
        {
            "semisup": {"method": "fedossl"},
            "partition": {"labeled_fraction": 0.5},
            "dataset": {"classes": list(range(num_classes))},
            "tasks": {"classes_per_task": None},
        }
    )
    return FedoSSLServer(cfg, FedoSSLOptions())


def test_the_server_part_clusters_the_local_centroids_and_aligns_the_seen_classes() -> None:
    """Three directions (120 degrees apart), each held by several clients' local centroids; the labeled
    means of seen classes 0 and 2 point at two of them. The calibrated centroids assign each direction's
    points to one row of its own: the direction of class 0's labeled mean to row 0, class 2's to row 2,
    the third, the novel class's, to row 1. (The official objective matches assignments, so the
    centroids partition the points without being their means.)"""
    server = _server()
    assert server.records() == {}
    angles = np.radians([0.0, 120.0, 240.0])
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    rng = np.random.default_rng(7)
    points = np.repeat(directions, 8, axis=0) + 0.02 * rng.normal(size=(24, 2))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    labeled = np.array([directions[1] * 3.0, [0.0, 0.0], directions[2] * 0.5])  # sums of clients' means
    server.update({SUMS: {"labeled": labeled, "present": np.array([2.0, 0.0, 1.0])}}, [])
    server.calibrate(points)
    centroids = server.state["centroids"]
    assert centroids.shape == (3, 2) and all(isinstance(v, np.ndarray) for v in server.state.values())
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    assigned = (points @ centroids.T).argmax(axis=1)
    assert assigned.tolist() == [1] * 8 + [0] * 8 + [2] * 8
    sent = array_to_numpy(server.records()[CENTROIDS]["centroids"])
    np.testing.assert_array_equal(sent, centroids)
    again = _server()
    again.update({SUMS: {"labeled": labeled, "present": np.array([2.0, 0.0, 1.0])}}, [])
    again.calibrate(points)
    np.testing.assert_array_equal(again.state["centroids"], centroids)  # seeded: the same every run


# --- the training loop -----------------------------------------------------------------------------------


def _fedossl(n_labeled: int = 20, n_unlabeled: int = 60, centroids=None, rnd: int = 1, state=None, **options):
    ctx, data = _context("fedossl", n_labeled, n_unlabeled, options=options)
    ctx.global_round = rnd
    if centroids is not None:
        ctx.message[CENTROIDS] = ArrayRecord({"centroids": array_from_numpy(centroids)})
    if state is not None:
        ctx.state[PREDICTED] = state
    loss, n = train_local(ctx, data.x, data.y)
    return ctx, loss, n


def test_fedossl_trains_seeded_and_sends_its_clustering_statistics() -> None:
    first, loss, n = _fedossl()
    again, loss2, _ = _fedossl()
    assert math.isfinite(loss) and loss == loss2 and n == 80
    assert all(torch.equal(a, b) for a, b in zip(_params(first), _params(again), strict=True))
    counts = array_to_numpy(first.state[PREDICTED]["counts"])
    steps_per_epoch = math.ceil(20 / 8)
    assert counts.sum() == steps_per_epoch * 56  # N_k of the last epoch: each step's mu B = 56 samples
    local = array_to_numpy(first.reply[LOCAL]["centroids"])
    assert local.shape == (32, 16)
    np.testing.assert_allclose(np.linalg.norm(local, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(local, array_to_numpy(again.reply[LOCAL]["centroids"]))
    present = array_to_numpy(first.reply[SUMS]["present"])
    assert present.tolist() == [1.0] * 10  # 20 labeled samples, two of each class
    assert array_to_numpy(first.reply[SUMS]["labeled"]).shape == (10, 16)
    assert array_to_numpy(first.reply[PSEUDO_LABELS]["used_true"]).sum() == 0  # no centroids: no labels


def test_each_term_moves_the_model() -> None:
    base, _, _ = _fedossl()
    for options in ({"margin_scale": 10.0}, {"suppress_weight": 0.0}):  # the margin is off by default
        other, _, _ = _fedossl(**options)
        assert any(not torch.equal(a, b) for a, b in zip(_params(base), _params(other), strict=True))
    counted = ArrayRecord({"counts": array_from_numpy(np.arange(10, dtype=np.float64))})
    carried, _, _ = _fedossl(state=counted)  # the previous round's N_k weight the first epoch
    assert any(not torch.equal(a, b) for a, b in zip(_params(base), _params(carried), strict=True))


def test_the_cluster_terms_follow_the_servers_centroids_from_their_rounds() -> None:
    centroids = F.normalize(torch.randn(10, 16, generator=torch.Generator().manual_seed(8)), dim=1).numpy()
    before, _, _ = _fedossl(rnd=5)
    early, _, _ = _fedossl(centroids=centroids, rnd=5)  # before round 6 the centroids are not used
    assert all(torch.equal(a, b) for a, b in zip(_params(before), _params(early), strict=True))
    plain, _, _ = _fedossl(rnd=8)
    clustered, loss, _ = _fedossl(centroids=centroids, rnd=8, pseudo_threshold=0.2)
    again, loss2, _ = _fedossl(centroids=centroids, rnd=8, pseudo_threshold=0.2)
    assert math.isfinite(loss) and loss == loss2
    assert any(not torch.equal(a, b) for a, b in zip(_params(plain), _params(clustered), strict=True))
    used = array_to_numpy(clustered.reply[PSEUDO_LABELS]["used_true"]).sum()
    assert used > 0  # confident cluster assignments are the pseudo-labels


def test_a_client_without_labels_trains_on_the_unlabeled_terms() -> None:
    ctx, loss, n = _fedossl(n_labeled=0)
    assert n == 60 and math.isfinite(loss)
    assert array_to_numpy(ctx.reply[SUMS]["present"]).sum() == 0


def test_the_server_clusters_the_union_of_the_clients_local_centroids_after_a_round() -> None:
    """The calibration runs from `ServerPart.update`: every aggregated client's local centroids, by
    partition id, are clustered together (summed records could not be separated)."""
    angles = np.radians([0.0, 120.0, 240.0])
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    rng = np.random.default_rng(3)
    points = np.repeat(directions, 4, axis=0) + 0.02 * rng.normal(size=(12, 2))
    points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    labeled = np.array([directions[1] * 2.0, [0.0, 0.0], directions[2]])
    sums = {SUMS: {"labeled": labeled, "present": np.array([2.0, 0.0, 1.0])}}
    replies = [(pid, {LOCAL: ArrayRecord({"centroids": array_from_numpy(points[pid::2])})}) for pid in (0, 1)]
    server = _server()
    server.update(sums, replies)
    reference = _server()
    reference.update(sums, [])
    reference.calibrate(np.concatenate([points[0::2], points[1::2]]))
    np.testing.assert_array_equal(server.state["centroids"], reference.state["centroids"])
    assert CENTROIDS in server.records()
