"""FedoSSL: federated open-world semi-supervised learning, ORCA's objective with an uncertainty-aware
suppressed loss and a calibration module that aligns the clients' novel-class indices (Zhang et al.,
"Towards Unbiased Training in Federated Open-world Semi-supervised Learning", ICML 2023; official code
cugzj/FedoSSL: ``fedossl_cifar.py`` / ``fedossl_cinic.py`` for the client's ``train`` and the server's
loop, ``models/resnet_s.py`` for the clustering, ``utils.py`` for ``MarginLoss`` and ``entropy``).

Open world: classes without any label (``partition.novel_classes``) reach the clients only through
their unlabeled parts; the model's outputs cover every class and the server scores novel classes after
Hungarian matching, so the outputs a novel class lands on need not be its id.

Each step sees a batch of B labeled samples (x_i, y_i) and mu B unlabeled ones u_j in two views, the
softmax p (view 1) and p' (view 2), the features z, z' and the logits f(.). With ``s`` the scale and
``u`` the uncertainty, the local objective of the official ``train`` is

    L = L_margin + L_pair - H(mean_b p_b) - eta L_reg + [r > 5] lambda_c L_cluster + [r > 7] L_pseudo

* adaptive margin (ORCA): L_margin = CE(f(x) + s min(u, 0.5) onehot(y), y), ``MarginLoss(m=-u)``
  with s = 10, u = 1 - mean_j max_c p_jc over the client's unlabeled samples, re-estimated with the
  current local model before every local epoch (the official ``test``'s ``mean_uncert``). The margin
  is negative (the target logit is raised), which slows the seen classes' learning while the model is
  uncertain; ``margin_scale`` < 0 makes it a positive, harder margin. The loop's objective scores these
  logits (`adjust_logits`), so with ``train.objective=ce`` the labeled term is the official one. The
  official model is a SimCLR-pretrained ResNet-18 (only layer4 and its cosine head, scale 10, train),
  whose confidence soon lowers u; a model trained from scratch starts at the cap (u = 0.5, +5 on the
  target logit), learns little from its labels and collapses (fedtail's open-world digits benchmark,
  3 seeds: a constant prediction, all accuracy 0.10), where ``margin_scale: 0`` does not (0.63 at
  seed 0), so the default is 0, no margin; ``margin_scale: 10`` is the published setting.
* pairwise similarity (ORCA): each sample b gets a partner pi(b): a labeled sample another labeled
  sample of its class drawn at random (itself when it is its class's only one), an unlabeled sample
  its nearest neighbour in the batch by the cosine of the view-1 features (second of the top two);
  L_pair = -mean_b log <p_b, p'_pi(b)> (``BCELoss`` against 1, log clamped at -100).
* entropy regulariser: H(mean_b p_b) over the whole batch, maximised (weight 1).
* uncertainty-aware suppressed loss: with N_k the number of the client's unlabeled samples whose
  view-1 prediction was k in the previous local epoch and N_max = max_k N_k, the class weights are
  w_k = beta^(1 - N_k / N_max) (beta for every class while N_max = 0), beta = 0.2, and

      L_reg = 1 / (mu B) sum_j w_{k_j} ||p_j - p~_j||_1 / C,   k_j = argmax p_j,

  p~_j being p_j (no gradient) with entry k_j set to 1, i.e. w_{k_j} (1 - p_{j k_j}) / C. Classes the
  model predicts most (those several clients hold, which aggregation favours) get the largest weight,
  and the loss enters with a minus sign: their samples' confidence is suppressed most, so they do not
  outrun the classes a single client holds; every round. Read from ``fedossl_cinic.py`` (data-driven
  N_k, ``- 2 * L_reg1``); both released scripts compute L_reg but leave it commented out of the loss
  (the CIFAR one with ``+ 2 * (L_reg1 + L_reg2)`` and hard-coded N_k), so ``suppress_weight: 0`` is
  the released code.
* calibration (the server's global clustering): with the global centroids c_1..c_C that every train
  message carries, t_b = softmax(normalize(z_b) c^T / T), T = 0.1, and the cluster loss
  L_cluster = -mean_b sum_k t_bk log t'_pi(b)k (partner of the pairwise loss, view 2), weight 0.5 from
  round 6 (official ``global_round > 4``, counted from 0); from round 8 (``> 6``) the unlabeled samples
  whose cluster confidence max_k t_jk exceeds 0.95 train the classifier towards their cluster:
  L_pseudo = CE(f(u_j), argmax_k t_jk) over those samples (0 when there is none). Since every client
  assigns to the same centroids, the clients' novel-class outputs agree on one index per cluster.

After its round a client clusters a memory of its last 1,024 normalised features (both views, every
sample of the last steps) into 32 local centroids by Orchestra's Sinkhorn-balanced k-means (5
iterations, Sinkhorn lambda 25, 10 iterations) and sends them (`LOCAL`), with its labeled samples'
per-class mean features of the last epoch (`SUMS`). The server (`FedoSSLServer.calibrate`) trains the
global centroids, warm-started from the last round's, for 500 SGD steps (lr 0.01, momentum 0.9, weight
decay 1e-4, rows renormalised after each) to match softmax(normalize(Z) c^T / T) to the Sinkhorn
assignment of Z c^T over the union Z of all clients' local centroids (cosine similarity of the rows),
then aligns them with the labeled classes: each seen class, in order, takes the free centroid most
similar to the mean of the clients' labeled means (``set_labeled_feature_centroids``); the other
centroids fill the novel classes' rows in index order.

Federated / fedtail readings:
* view 1 of a labeled sample is the batch as stored (the loop's, which the objective scores); view 2
  and both unlabeled views are ``semisup.weak`` draws (the official two draws of its weak CIFAR
  transform), all four in the step's one forward pass (view 2 through `extra_inputs`).
* u and N_k are the client's own: u over its unlabeled samples of this round (the official scores the
  whole unlabeled set), N_k carried across rounds in the client's state (the official keeps them per
  client across rounds too; zeros at the start).
* the feature memory is this round's (the official keeps it across rounds, which matters only when a
  round produces fewer than 1,024 features: then the round's are clustered, into at most as many
  centroids as it has rows); the local clustering's initial rows are drawn from a seeded generator.
* seen classes for the alignment are those with labeled samples in the round (this task's, in a
  continual run); the official greedy takes a seen class's top-2 centroid when its top-1 is taken (and
  fails when both are); here the most similar free one, the same wherever the official is defined.
* the global centroids start from the seeded U(-1/sqrt(D), 1/sqrt(D)) of ``nn.Linear``'s init.
* the server part receives each aggregated client's `LOCAL` record (`ServerPart.update`'s replies,
  by partition id) and clusters their union after every round; the centroids (checkpointed with the
  strategy's state) go out with the next round's train messages.
* without novel classes (a closed-world config) every class is seen and the method is ORCA with the
  suppressed loss on it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from pydantic import Field

from clients.semisup import SemiSupervised, ServerPart, UnlabeledLoss, UnlabeledStep, received_pass
from fedtail.models import array_from_numpy, array_to_numpy
from fedtail.registry import SEMISUP, PluginOptions

if TYPE_CHECKING:
    from clients.local import LocalContext

SECOND = "fedossl-second"  # extra input: view 2 of the labeled batch, then of the unlabeled batch
PREDICTED = "fedossl-predicted"  # client state: N_k, the last epoch's view-1 predictions per class
SUMS = "sums:fedossl"  # reply: per-class mean labeled features of the last epoch, and which are present
LOCAL = "fedossl-local-centroids"  # reply: the client's local centroids (for the server's clustering)
CENTROIDS = "fedossl-centroids"  # train message: the aligned global centroids (C, D)
SINKHORN_LAMBDA = 25.0  # the official ``sknopp`` default
LOCAL_SINKHORN_ITERS, GLOBAL_SINKHORN_ITERS = 10, 100
CLUSTERING_KEY = 0xF0  # key of the local clustering's seed beside (seed, task, round, client)
EPS = 1e-8  # the official ``entropy``'s clamp


class FedoSSLOptions(PluginOptions):
    """The official code's settings (``fedossl_cifar.py``, ``models/resnet_s.py``)."""

    margin_scale: float = Field(
        0.0,
        ge=-100.0,
        le=100.0,
        description="s: the target logit is raised by s u (negative: lowered); official: 10.",
    )
    max_uncertainty: float = Field(0.5, ge=0.0, le=10.0, description="Cap on u in the margin.")
    beta: float = Field(0.2, gt=0.0, le=1.0, description="Base of the suppressed loss's class weights.")
    suppress_weight: float = Field(2.0, ge=0.0, le=100.0, description="eta of the suppressed loss.")
    temperature: float = Field(0.1, gt=0.0, le=10.0, description="T of the cluster assignment.")
    cluster_weight: float = Field(0.5, ge=0.0, le=100.0, description="Weight of the cluster loss.")
    cluster_from_round: int = Field(6, ge=1, le=100_000, description="First global round (from 1) of it.")
    pseudo_threshold: float = Field(0.95, gt=0.0, lt=1.0, description="Cluster confidence to pseudo-label.")
    pseudo_weight: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the cluster pseudo-labels.")
    pseudo_from_round: int = Field(8, ge=1, le=100_000, description="First global round (from 1) of them.")
    local_centroids: int = Field(32, ge=1, le=10_000, description="Local centroids per client (N_local).")
    memory_size: int = Field(1024, ge=1, le=1_000_000, description="Features the local clustering reads.")
    local_iters: int = Field(5, ge=1, le=1000, description="Iterations of the local clustering.")
    global_steps: int = Field(500, ge=1, le=100_000, description="SGD steps of the global clustering.")
    global_lr: float = Field(0.01, gt=0.0, le=10.0, description="Learning rate of the global clustering.")


# --- the losses ---------------------------------------------------------------------------------------------


def margin_logits(logits: torch.Tensor, y: torch.Tensor, uncertainty: float, scale: float) -> torch.Tensor:
    """The official ``MarginLoss(m=-u, s)``'s logits: s u added to each target logit."""
    return logits + scale * uncertainty * F.one_hot(y, logits.shape[1]).to(logits.dtype)


def mean_uncertainty(probs: torch.Tensor) -> float:
    """u = 1 - the mean of the samples' largest softmax probability (the official ``mean_uncert``)."""
    return float(1.0 - probs.max(dim=1).values.mean()) if len(probs) else 0.0


def labeled_partners(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each labeled sample, another of its class drawn uniformly (itself when it is alone)."""
    n = len(y)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=y.device)
    scores = torch.rand(n, n, generator=generator).to(y.device)
    same = (y.unsqueeze(0) == y.unsqueeze(1)) & ~torch.eye(n, dtype=torch.bool, device=y.device)
    partner = torch.where(same, scores, torch.full_like(scores, -1.0)).argmax(dim=1)
    return torch.where(same.any(dim=1), partner, torch.arange(n, device=y.device))


def unlabeled_partners(features: torch.Tensor, n_labeled: int) -> torch.Tensor:
    """For each unlabeled row (after the first ``n_labeled``), the second of its two most cosine-similar
    rows of the whole batch (the first is itself), as the official ``topk(unlabel_cosine_dist, 2)``."""
    z = F.normalize(features.detach(), dim=1)
    sim = z[n_labeled:] @ z.T
    if sim.shape[1] < 2:
        return torch.arange(n_labeled, n_labeled + len(sim), device=z.device)
    return sim.topk(2, dim=1).indices[:, 1]


def pairwise_loss(probs: torch.Tensor, probs2: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """ORCA's pairwise objective: BCE of <p_b, p'_partner(b)> against 1, the log clamped at -100."""
    sim = (probs * probs2[partners]).sum(dim=1).clamp(0.0, 1.0)
    return -torch.log(sim).clamp_min(-100.0).mean()


def batch_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(mean_b p_b), with the official clamp at 1e-8."""
    mean = probs.mean(dim=0).clamp_min(EPS)
    return -(mean * torch.log(mean)).sum()


def suppression_weights(predicted: torch.Tensor, beta: float) -> torch.Tensor:
    """w_k = beta^(1 - N_k / N_max); beta for every class while no prediction was counted."""
    top = predicted.max()
    if top <= 0:
        return torch.full(predicted.shape, beta, dtype=torch.float64, device=predicted.device)
    return beta ** (1.0 - predicted.double() / top.double())


def suppressed_loss(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_reg = mean_j w_{k_j} ||p_j - p~_j||_1 / C with p~_j = p_j (no gradient) but 1 at k_j = argmax p_j,
    i.e. w_{k_j} (1 - p_{j k_j}) / C."""
    if len(probs) == 0:
        return probs.sum() * 0.0
    k = probs.detach().argmax(dim=1)
    gap = 1.0 - probs.gather(1, k.unsqueeze(1)).squeeze(1)
    return (weights[k].to(probs.dtype) * gap).mean() / probs.shape[1]


def cluster_probs(features: torch.Tensor, centroids: torch.Tensor, temperature: float) -> torch.Tensor:
    """t = softmax(normalize(z) c^T / T): the soft assignment to the global centroids."""
    return torch.softmax(F.normalize(features, dim=1) @ centroids.T / temperature, dim=1)


def cluster_loss(t1: torch.Tensor, t2: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """-mean_b sum_k t_bk log t'_partner(b)k (the official ``L_cluster``)."""
    return -(t1 * torch.log(t2[partners])).sum(dim=1).mean()


def cluster_pseudo_loss(
    logits: torch.Tensor, t: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, cluster labels, mask): CE of the logits towards the cluster of the samples whose cluster
    confidence exceeds ``threshold``, averaged over them (0 when none does)."""
    confidence, labels = t.detach().max(dim=1)
    mask = confidence > threshold
    if not mask.any():
        return logits.sum() * 0.0, labels, mask.to(logits.dtype)
    return F.cross_entropy(logits[mask], labels[mask]), labels, mask.to(logits.dtype)


# --- the clustering -----------------------------------------------------------------------------------------


def sinkhorn(scores: torch.Tensor, lamd: float = SINKHORN_LAMBDA, max_iters: int = 100) -> torch.Tensor:
    """Balanced soft assignments (N, K) of scores (N, K), as the official ``sknopp``: softmax(lamd
    scores) scaled towards uniform row and column sums, checked every 10 iterations (stop below 1e-2)."""
    with torch.no_grad():
        n, k = scores.shape
        probs = F.softmax(scores * lamd, dim=1).T
        r = torch.ones((k, 1), dtype=probs.dtype, device=probs.device) / k
        c = torch.ones((n, 1), dtype=probs.dtype, device=probs.device) / n
        err = torch.tensor(1e3)
        for it in range(max_iters):
            r = (1.0 / k) / (probs @ c)
            c_new = (1.0 / n) / (r.T @ probs).T
            if it % 10 == 0:
                err = torch.nansum(torch.abs(c / c_new - 1))
            c = c_new
            if err < 1e-2:
                break
        probs = probs * c.squeeze()
        probs = probs.T * r.squeeze()
        return probs * n


def local_clustering(
    memory: torch.Tensor, init: torch.Tensor, iters: int, generator: torch.Generator
) -> torch.Tensor:
    """Orchestra's local clustering (official ``local_clustering``): from the rows ``init`` of the
    normalised feature memory, ``iters`` rounds of Sinkhorn-balanced assignment and normalised means (an
    empty cluster takes a random row)."""
    with torch.no_grad():
        centroids = memory[init].clone()
        for _ in range(iters):
            choice = sinkhorn(memory @ centroids.T, max_iters=LOCAL_SINKHORN_ITERS).argmax(dim=1)
            for index in range(len(centroids)):
                selected = memory[choice == index]
                if len(selected) == 0:
                    selected = memory[torch.randint(len(memory), (1,), generator=generator)]
                centroids[index] = F.normalize(selected.mean(dim=0), dim=0)
    return centroids


def global_clustering(
    points: torch.Tensor, centroids: torch.Tensor, temperature: float, steps: int, lr: float
) -> torch.Tensor:
    """The official ``global_clustering``: SGD (momentum 0.9, weight decay 1e-4) on the centroids so that
    softmax(normalize(Z) c^T / T) matches the Sinkhorn assignment of Z c^T (mean row cosine), the rows
    renormalised after every step."""
    c = centroids.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([c], lr=lr, momentum=0.9, weight_decay=1e-4)
    z = F.normalize(points, dim=1)
    for _ in range(steps):
        with torch.no_grad():
            target = sinkhorn(points @ c.T, max_iters=GLOBAL_SINKHORN_ITERS)
        optimizer.zero_grad()
        probs = F.softmax(z @ c.T / temperature, dim=1)
        loss = -F.cosine_similarity(target, probs, dim=-1).mean()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            c.copy_(F.normalize(c, dim=1))
    return c.detach()


def align_centroids(centroids: np.ndarray, labeled: np.ndarray, seen: list[int]) -> np.ndarray:
    """The official ``set_labeled_feature_centroids``: each seen class in order takes the free centroid
    most cosine-similar to its labeled mean; the rest fill the other classes' rows in index order."""
    k = len(centroids)
    unit = labeled[seen] / np.maximum(np.linalg.norm(labeled[seen], axis=1, keepdims=True), 1e-12)
    sim = unit @ centroids.T
    taken: list[int] = []
    for row in sim:
        order = np.argsort(-row, kind="stable")
        taken.append(int(next(i for i in order if i not in taken)))
    out = np.empty_like(centroids)
    out[seen] = centroids[taken]
    rest = [c for c in range(k) if c not in set(seen)]
    out[rest] = centroids[[i for i in range(k) if i not in set(taken)]]
    return out


class FedoSSLServer(ServerPart):
    """The calibration module: keeps the global centroids and the round's labeled means, and sends the
    centroids with every train message once there are any."""

    def update(self, sums: dict[str, dict[str, np.ndarray]], replies: list[tuple[int, dict]]) -> None:
        got = sums.get(SUMS)
        if got is None:
            return
        self.state = {
            **self.state,
            "labeled": np.asarray(got["labeled"], dtype=np.float64),
            "present": np.asarray(got["present"], dtype=np.float64),
        }
        local = [array_to_numpy(records[LOCAL]["centroids"]) for _, records in replies if LOCAL in records]
        if local:
            self.calibrate(np.concatenate(local))

    def calibrate(self, local_centroids: np.ndarray) -> None:
        """Global clustering of the union of the clients' local centroids (one row each), warm-started
        from the last centroids, then aligned with the labeled classes of the round."""
        o = self.options
        points = torch.as_tensor(np.asarray(local_centroids), dtype=torch.float32)
        k, d = self.cfg.num_classes, points.shape[1]
        start = self.state.get("centroids")
        if start is None or start.shape != (k, d):
            generator = torch.Generator().manual_seed(self.cfg.seed)
            bound = 1.0 / math.sqrt(d)
            start = (torch.rand(k, d, generator=generator) * 2 - 1) * bound
        start = torch.as_tensor(np.asarray(start), dtype=torch.float32)
        centroids = global_clustering(points, start, o.temperature, o.global_steps, o.global_lr).numpy()
        present = self.state.get("present")
        if present is not None and present.any():
            seen = np.flatnonzero(present > 0).tolist()
            centroids = align_centroids(centroids, self.state["labeled"], seen)
        self.state = {**self.state, "centroids": centroids.astype(np.float32)}

    def records(self) -> dict[str, ArrayRecord]:
        if "centroids" not in self.state:
            return {}
        return {CENTROIDS: ArrayRecord({"centroids": array_from_numpy(self.state["centroids"])})}


@SEMISUP.register("fedossl")
class FedoSSL(SemiSupervised):
    """ORCA's margin, pairwise and entropy terms, the suppressed loss, and the cluster terms against
    the server's global centroids."""

    Options = FedoSSLOptions
    views: ClassVar[tuple[str, ...]] = ("weak",)
    server = FedoSSLServer

    def __init__(self, ctx: LocalContext, options: FedoSSLOptions) -> None:
        from clients.local import view_augmentation  # the loop's module imports this package

        super().__init__(ctx, options)
        cfg = ctx.job.config
        record = ctx.message.get(CENTROIDS)
        self.centroids = (
            None
            if record is None
            else torch.from_numpy(array_to_numpy(record["centroids"]).copy()).to(ctx.device)
        )
        self.margin_y: torch.Tensor | None = None
        self.uncertainty = 0.0
        self.calls, self.per_epoch = 0, 0
        self.weak = view_augmentation(cfg, "weak")

    def begin(self, index: np.ndarray) -> None:
        ctx, c = self.ctx, self.num_classes
        self.x_unlabeled = ctx.data.x_unlabeled[index]
        self._estimate_uncertainty()
        stored = self.stored(PREDICTED, "counts", (c,))
        self.previous = torch.from_numpy(np.zeros(c) if stored is None else stored).to(ctx.device)
        self.counts = torch.zeros(c, dtype=torch.float64, device=ctx.device)
        self.weights = suppression_weights(self.previous, self.options.beta)
        self.memory: torch.Tensor | None = None
        self.labeled_sum: torch.Tensor | None = None  # (C, D), from the first step's features
        self.labeled_count = torch.zeros(c, dtype=torch.float64, device=ctx.device)

    def _estimate_uncertainty(self) -> None:
        probs = received_pass(self.ctx, self.x_unlabeled)
        self.uncertainty = min(mean_uncertainty(probs), self.options.max_uncertainty)

    def _new_epoch(self) -> None:
        """The official ``train`` is one epoch: u from the current model, N_k from the epoch just done."""
        self._estimate_uncertainty()
        self.previous, self.counts = self.counts, torch.zeros_like(self.counts)
        self.weights = suppression_weights(self.previous, self.options.beta)
        self.labeled_count.zero_()
        if self.labeled_sum is not None:
            self.labeled_sum.zero_()

    def extra_inputs(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor,
        views: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        if self.per_epoch and self.calls and self.calls % self.per_epoch == 0:
            self._new_epoch()
        self.calls += 1
        self.margin_y = y
        self.partners = labeled_partners(y, generator)
        unlabeled = views["weak"]
        stored = torch.from_numpy(self.ctx.data.x_unlabeled[index.cpu().numpy()])  # a second weak draw
        stored = stored.to(unlabeled.device, unlabeled.dtype)
        return {SECOND: torch.cat([self.weak(x, generator), self.weak(stored, generator)])}

    def adjust_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The adaptive margin on this step's labeled samples (SMOTE's synthetic rows after them keep
        their logits); none in a round without the unlabeled stream."""
        y = self.margin_y
        if y is None or len(y) == 0:
            return logits
        n = len(y)
        adjusted = margin_logits(logits[:n], y, self.uncertainty, self.options.margin_scale)
        return adjusted if len(logits) == n else torch.cat([adjusted, logits[n:]])

    def loss(self, step: UnlabeledStep) -> UnlabeledLoss:
        o = self.options
        if not self.per_epoch:
            self.per_epoch = max(step.total_steps // self.ctx.job.config.train.epochs, 1)
        labeled, weak, second = step.labeled, step.views["weak"], step.views[SECOND]
        n_l = len(labeled.x)
        f1 = torch.cat([labeled.features, weak.features])
        z1 = torch.cat([labeled.logits[:n_l], weak.logits])
        p1, p2 = torch.softmax(z1, dim=1), torch.softmax(second.logits, dim=1)
        partners = torch.cat([self.partners, unlabeled_partners(f1, n_l)])
        loss = pairwise_loss(p1, p2, partners) - batch_entropy(p1)
        p_u = p1[n_l:]
        if o.suppress_weight > 0:
            loss = loss - o.suppress_weight * suppressed_loss(p_u, self.weights)
        labels = p_u.detach().argmax(dim=1)
        mask = torch.zeros(len(p_u), dtype=p_u.dtype, device=p_u.device)
        rnd = self.ctx.global_round
        if self.centroids is not None and rnd >= min(o.cluster_from_round, o.pseudo_from_round):
            t1 = cluster_probs(f1, self.centroids, o.temperature)
            if rnd >= o.cluster_from_round:
                t2 = cluster_probs(second.features, self.centroids, o.temperature)
                loss = loss + o.cluster_weight * cluster_loss(t1, t2, partners)
            if rnd >= o.pseudo_from_round:
                pseudo, labels, mask = cluster_pseudo_loss(weak.logits, t1[n_l:], o.pseudo_threshold)
                loss = loss + o.pseudo_weight * pseudo
        with torch.no_grad():
            self.counts += torch.bincount(p_u.argmax(dim=1), minlength=self.num_classes).double()
            rows = F.normalize(torch.cat([f1, second.features]).detach(), dim=1)
            memory = rows if self.memory is None else torch.cat([self.memory, rows])
            self.memory = memory[-o.memory_size :]
            if self.labeled_sum is None:
                self.labeled_sum = torch.zeros(
                    self.num_classes, f1.shape[1], dtype=torch.float64, device=f1.device
                )
            if n_l:
                y = labeled.y[:n_l]
                self.labeled_sum.index_add_(0, y, labeled.features.detach().double())
                self.labeled_count += torch.bincount(y, minlength=self.num_classes).double()
        return UnlabeledLoss(loss, labels, mask)

    def end(self, steps: int) -> None:
        ctx, o = self.ctx, self.options
        self.store(PREDICTED, counts=self.counts.cpu().numpy())
        if self.labeled_sum is not None:
            present = self.labeled_count > 0
            means = self.labeled_sum / self.labeled_count.clamp_min(1.0).unsqueeze(1)
            ctx.reply[SUMS] = ArrayRecord(
                {
                    "labeled": array_from_numpy(means.cpu().numpy()),
                    "present": array_from_numpy(present.double().cpu().numpy()),
                }
            )
        if self.memory is not None and len(self.memory):
            cfg = ctx.job.config
            seed = np.random.SeedSequence(
                [cfg.seed, ctx.task, ctx.global_round, ctx.partition_id, CLUSTERING_KEY]
            )
            generator = torch.Generator().manual_seed(int(seed.generate_state(1)[0]))
            n = min(o.local_centroids, len(self.memory))
            init = torch.randperm(len(self.memory), generator=generator)[:n].to(self.memory.device)
            centroids = local_clustering(self.memory.float(), init, o.local_iters, generator)
            ctx.reply[LOCAL] = ArrayRecord({"centroids": array_from_numpy(centroids.cpu().numpy())})
