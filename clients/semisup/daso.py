"""DASO: distribution-aware semantics-oriented pseudo-labels, blending the classifier's pseudo-labels with
similarity-based ones by how often each class is predicted (Oh et al., "DASO: Distribution-Aware
Semantics-Oriented Pseudo-label for Imbalanced Semi-Supervised Learning", CVPR 2022; official code
ytaek-oh/daso), on FixMatch.

Prototypes are the per-class means of a balanced queue of labeled features (at most ``queue_size`` a
class). For a weak view with features z, the semantic pseudo-label is q_sem = softmax(cos(z, prototypes)
/ T_proto) and the linear one q = softmax(logits). With m the class distribution of the previous
pseudo-labels, nu_c = m_c^(1/T_dist) / max_c m_c^(1/T_dist) (eq. 5, normalised by the sum, then the
maximum), the pseudo-label blends (eq. 6)

    q_hat = (1 - nu_k) q + nu_k q_sem,    k = argmax q,

so classes the model over-predicts (the head) lean on the semantic pseudo-label and the rest keep the
linear one; FixMatch's threshold then applies to q_hat. The semantic alignment loss (eq. 7) trains the
strong view's similarities towards q_sem: -sum q_sem log softmax(cos(z_strong, prototypes) / T_proto),
averaged over the batch, weighted by ``psa_weight``.

Federated reading: the queue starts each round from the received model's features of the client's
labeled samples and takes each step's labeled features (the official code enqueues an EMA model's);
a class without labels on the client keeps a zero prototype, as the official queue starts. m is the
histogram of the client's final pseudo-labels of its previous round (the official code re-estimates it
every 100 steps), kept in the client's state; until there is one the client runs plain FixMatch, the
paper's pre-training stage. Defaults are the official code's: T_proto 0.05, T_dist 1.0 (its configs
use 1.5 when the labeled and unlabeled imbalance agree, 0.3 otherwise), psa_weight 1, queue 256, tau 0.95.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from clients.semisup import (
    ConfidenceOptions,
    SemiSupervised,
    UnlabeledLoss,
    UnlabeledStep,
    consistency_loss,
    received_pass,
)
from fedtail.registry import SEMISUP

PL_DIST = "daso-pl-dist"  # client state: the class distribution of the previous round's pseudo-labels


def blend_weights(pl_dist: torch.Tensor, dist_temp: float) -> torch.Tensor:
    """nu_c: the pseudo-label distribution sharpened by 1 / T_dist, normalised, divided by its maximum."""
    sharpened = pl_dist.clamp_min(0) ** (1.0 / dist_temp)
    sharpened = sharpened / sharpened.sum().clamp_min(1e-12)
    return sharpened / sharpened.max().clamp_min(1e-12)


def semantic_scores(features: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """cos(features, prototypes) / T_proto, (N, C); a zero prototype scores 0 (the official queue's start)."""
    return F.cosine_similarity(features.unsqueeze(1), prototypes.unsqueeze(0), dim=2) / temperature


class DASOOptions(ConfidenceOptions):
    """FixMatch's threshold and weight, and DASO's official settings."""

    proto_temp: float = Field(0.05, gt=0.0, le=100.0, description="T_proto of the semantic pseudo-label.")
    dist_temp: float = Field(1.0, gt=0.0, le=100.0, description="T_dist sharpening the blend weights.")
    psa_weight: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the semantic alignment loss.")
    queue_size: int = Field(256, ge=1, le=100_000, description="Labeled features kept per class.")


@SEMISUP.register("daso")
class DASO(SemiSupervised):
    """FixMatch on pseudo-labels blended with prototype similarities, by the pseudo-label distribution."""

    Options = DASOOptions

    def begin(self, index: np.ndarray) -> None:
        ctx, c = self.ctx, self.num_classes
        stored = self.stored(PL_DIST, "dist", (c,))
        self.pl_dist = None if stored is None else torch.tensor(stored, device=ctx.device)
        self.counts = torch.zeros(c, dtype=torch.int64, device=ctx.device)
        index_l = ctx.sample_index if ctx.sample_index is not None else np.arange(len(ctx.data.y))
        x, y = ctx.data.x[index_l], ctx.data.y[index_l]
        feats = received_pass(ctx, x, features=True) if len(x) else None
        dim = ctx.model.classifier.in_features if feats is None else feats.shape[1]
        self.queue = [torch.zeros(0, dim, device=ctx.device) for _ in range(c)]
        if feats is not None:
            self._enqueue(feats, torch.from_numpy(np.asarray(y, dtype=np.int64)).to(ctx.device))

    def _enqueue(self, feats: torch.Tensor, y: torch.Tensor) -> None:
        size = self.options.queue_size
        for k in torch.unique(y).tolist():
            self.queue[k] = torch.cat([self.queue[k], feats[y == k].detach()])[-size:]

    def prototypes(self) -> torch.Tensor:
        return torch.stack(
            [q.mean(dim=0) if len(q) else torch.zeros(q.shape[1], device=q.device) for q in self.queue]
        )

    def loss(self, step: UnlabeledStep) -> UnlabeledLoss:
        o = self.options
        weak, strong = step.views["weak"], step.views["strong"]
        if len(step.labeled.y):
            self._enqueue(step.labeled.features, step.labeled.y[: len(step.labeled.features)])
        psa = weak.logits.sum() * 0.0
        with torch.no_grad():
            probs = torch.softmax(weak.logits.detach().float(), dim=1)
            if self.pl_dist is not None:  # after the pre-training round: blend in the semantic pseudo-label
                protos = self.prototypes()
                q_sem = torch.softmax(semantic_scores(weak.features.detach(), protos, o.proto_temp), dim=1)
                nu = blend_weights(self.pl_dist, o.dist_temp)[probs.argmax(dim=1)].unsqueeze(1)
                probs = (1 - nu) * probs + nu * q_sem
            confidence, labels = probs.max(dim=1)
            mask = (confidence >= o.threshold).float()
            self.counts += torch.bincount(labels, minlength=self.num_classes)
        if self.pl_dist is not None and o.psa_weight > 0:
            sim_strong = semantic_scores(strong.features, protos, o.proto_temp)
            psa = o.psa_weight * -(q_sem * F.log_softmax(sim_strong, dim=1)).sum(dim=1).mean()
        loss = o.lambda_u * consistency_loss(strong.logits, labels, mask) + psa
        return UnlabeledLoss(loss, labels, mask)

    def end(self, steps: int) -> None:
        total = self.counts.sum()
        if total > 0:
            dist = (self.counts.double() / total).cpu().numpy()
            self.store(PL_DIST, dist=dist)
