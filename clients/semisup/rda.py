"""RDA: reciprocal distribution alignment between the main classifier and a reverse (complementary)
classifier, with no confidence threshold and no class prior (Duan et al., "RDA: Reciprocal Distribution
Alignment for Robust Semi-supervised Learning", ECCV 2022; official code NJUyued/RDA4RobustSSL,
``models/rda/rda.py`` and ``consistency_loss_rda`` in ``models/rda/rda_utils.py``).

Beside the main head f, a reverse head g (the official ``ReverseCLS``: one linear layer on the backbone's
features z, its outputs used as logits) learns which class a sample is *not*. For each labeled (x, y) a
complementary label ybar is drawn uniformly from the C - 1 classes other than y:

    L_r = 1/B sum_b H(ybar_b, softmax(g(z_b))).

For an unlabeled u with weak / strong views, p = softmax(f(weak u)) and p^r = softmax(g(z_weak)), both
without gradient. The two distributions pbar and pbar^r are the means over the last 128 batches of the
batches' mean p and mean p^r (ring buffers of 128 rows; the current batch is written before aligning,
as in the official code). Each head's prediction is aligned by what the other head says:

    main:     p~   = Normalize(p   * Normalize(1 - pbar^r) / pbar)
    reverse:  p~^r = Normalize(p^r * Normalize(1 - pbar)   / pbar^r)

so a class the main head over-predicts (large pbar) or the reverse head rarely rules out (small
1 - pbar^r) is turned down, and symmetrically for the reverse head. The unlabeled losses, over all mu B
samples (RDA has no threshold: every pseudo-label is used),

    L_cd = 1/(mu B) sum_b H(argmax p~_b, softmax(f(strong u_b)))       (hard pseudo-label, main head)
    L_ca = 1/(mu B) sum_b H(p~^r_b, softmax(g(z_strong,b)))            (soft target, reverse head)

and the whole objective L = L_s + L_r + lambda_u (L_cd + L_ca); L_s is the configured objective's, the
rest is this method's term. Gradients of L_r and L_ca reach the backbone through z, as in the official
code. The reverse head is applied to the features of the loop's one forward pass (the labeled batch's
and the views'), so it costs no second pass of the backbone.

As the official code, ``Normalize`` (its ``normalize_d``) divides by the sum over the whole array it is
given, so the reverse head's soft targets p~^r are normalised over the whole batch: each row sums to
about 1/(mu B), which makes L_ca about mu B times smaller than with one distribution per sample;
``sample_targets: true`` normalises each target on its own instead. (Normalising the 128-row buffers
before their column mean only scales the ratio, which the final normalisation cancels, so the ratio is
taken of the column means.) Complementary labels are drawn from a seeded generator (the official code
uses numpy's global one), so a round is deterministic and a resumed run draws the same labels.

Federated reading: the reverse head is one of the method's `modules`, part of the global model (sent,
trained, FedAvg-averaged, checkpointed) and never used in evaluation. Each client keeps its own ring
buffers, their write position and fill count in its state across rounds (and resume), so "the last 128
batches" are the client's last 128. The official buffers start as rows of ones, so for its first 128
steps the means are padded with ones, which damps the alignment; a client takes a few steps a round,
so that padding would last most of a federated run: here pbar and pbar^r are the means of the batches
written so far (at most 128), and ``ones_start: true`` restores the official ones-padded buffers. The
official code evaluates an EMA model (ema_m 0.999); here the averaged global model is evaluated.
Defaults are the official ones: lambda_u (``ulb_loss_ratio``) 1, 128 batches, softmax temperature 1;
its uratio 7 is ``semisup.mu``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clients.semisup import SemiSupervised, UnlabeledLoss, UnlabeledStep
from fedtail.registry import SEMISUP, PluginOptions

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig

REVERSE = "reverse"  # the method's module: the reverse (complementary) head
BUFFERS = "rda-distributions"  # client state: the two ring buffers of batch means, position, fill count
COMPLEMENTARY_KEY = 0x4DA  # key of the complementary labels' seed (with run seed, task, round, client)


class RDAOptions(PluginOptions):
    """The official code's settings."""

    lambda_u: float = Field(1.0, ge=0.0, le=100.0, description="Weight of L_cd + L_ca (ulb_loss_ratio).")
    batches: int = Field(
        128, ge=1, le=100_000, description="Batches whose mean predictions form the two distributions."
    )
    ones_start: bool = Field(
        False,
        description="Start the buffers at rows of ones and average all rows, as the official code "
        "(false: average the batches written so far).",
    )
    sample_targets: bool = Field(
        False,
        description="Normalise each reverse soft target on its own (the official code normalises over "
        "the batch).",
    )


def complementary_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """One label per sample drawn uniformly from the classes other than its own (the official code's
    ``np.random.choice`` over ``all classes - {y}``): y plus an offset in 1..C-1, modulo C. The draw is on
    the CPU from ``generator`` so it is the same on every device."""
    offsets = torch.randint(1, num_classes, (len(y),), generator=generator)
    return (y + offsets.to(y.device)) % num_classes


def normalize(x: torch.Tensor) -> torch.Tensor:
    """The official ``normalize_d``: ``x`` over the sum of all its entries."""
    return x / x.sum().clamp_min(1e-12)


def reciprocal_alignment(
    probs: torch.Tensor,
    probs_reverse: torch.Tensor,
    distri: torch.Tensor,
    distri_reverse: torch.Tensor,
    sample_targets: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p~, p~^r): the main and reverse predictions, (N, C), aligned by the two distributions pbar =
    ``distri`` and pbar^r = ``distri_reverse`` (C,); normalised over the whole batch as the official
    code, or row by row with ``sample_targets``."""
    main = probs * (normalize(1 - distri_reverse) / distri.clamp_min(1e-12))
    reverse = probs_reverse * (normalize(1 - distri) / distri_reverse.clamp_min(1e-12))
    if sample_targets:
        reverse = reverse / reverse.sum(dim=1, keepdim=True).clamp_min(1e-12)
    else:
        reverse = normalize(reverse)
    return normalize(main), reverse


def rda_losses(
    logits_strong: torch.Tensor,
    reverse_strong: torch.Tensor,
    aligned: torch.Tensor,
    aligned_reverse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_cd, L_ca): hard cross-entropy of the main head's strong logits against argmax p~, and soft
    cross-entropy of the reverse head's strong logits against p~^r, each averaged over the batch."""
    loss_cd = F.cross_entropy(logits_strong, aligned.argmax(dim=1))
    loss_ca = -(aligned_reverse * F.log_softmax(reverse_strong, dim=1)).sum(dim=1).mean()
    return loss_cd, loss_ca


class RingBuffer:
    """The last ``len(rows)`` batch means of one head's predictions: `push` writes at ``position`` and
    advances it modulo the size; ``filled`` counts the rows written (at most the size)."""

    def __init__(self, rows: torch.Tensor, position: int, filled: int) -> None:
        self.rows = rows
        self.position = position
        self.filled = filled

    @classmethod
    def empty(cls, size: int, num_classes: int, device: torch.device, ones: bool = False) -> RingBuffer:
        """No batch written yet; ``ones``: the rows start at ones (the official ``torch.ones((128, C))``)."""
        fill = torch.ones if ones else torch.zeros
        return cls(fill(size, num_classes, dtype=torch.float32, device=device), 0, 0)

    def push(self, probs: torch.Tensor) -> None:
        self.rows[self.position] = probs.detach().float().mean(dim=0)
        self.position = (self.position + 1) % len(self.rows)
        self.filled = min(self.filled + 1, len(self.rows))

    def mean(self, padded: bool = False) -> torch.Tensor:
        """The mean of the rows written so far, or with ``padded`` of all rows (the unwritten ones as
        they started: the official ones)."""
        return self.rows.mean(dim=0) if padded else self.rows[: max(self.filled, 1)].mean(dim=0)


@SEMISUP.register("rda")
class RDA(SemiSupervised):
    """Threshold-free pseudo-labels of the main head and soft targets of a reverse head trained on
    complementary labels, each aligned by the other's running distribution."""

    Options = RDAOptions

    @classmethod
    def modules(
        cls, cfg: FedtailConfig, input_shape: tuple[int, ...], feature_dim: int
    ) -> dict[str, nn.Module]:
        return {REVERSE: nn.Linear(feature_dim, cfg.num_classes)}

    def begin(self, index: np.ndarray) -> None:
        from clients.local import step_seed

        ctx, c, size = self.ctx, self.num_classes, self.options.batches
        seed = step_seed(ctx.job.config.seed, ctx.task, ctx.global_round, ctx.partition_id, COMPLEMENTARY_KEY)
        self.generator = torch.Generator().manual_seed(seed)
        main = self.stored(BUFFERS, "main", (size, c))
        reverse = self.stored(BUFFERS, "reverse", (size, c))
        counters = self.stored(BUFFERS, "counters", (2,))  # position, filled
        if main is None or reverse is None or counters is None:
            self.main = RingBuffer.empty(size, c, ctx.device, self.options.ones_start)
            self.reverse = RingBuffer.empty(size, c, ctx.device, self.options.ones_start)
        else:
            pos, filled = (int(v) for v in counters)
            as_tensor = functools.partial(torch.tensor, dtype=torch.float32, device=ctx.device)
            self.main = RingBuffer(as_tensor(main), pos, filled)
            self.reverse = RingBuffer(as_tensor(reverse), pos, filled)

    def loss(self, step: UnlabeledStep) -> UnlabeledLoss:
        o, head = self.options, self.module(REVERSE)
        weak, strong = step.views["weak"], step.views["strong"]
        features = step.labeled.features  # the real labeled samples (SMOTE's synthetic rows have none)
        reverse_labeled = head(features)
        if len(features):
            y = step.labeled.y[: len(features)]
            loss_r = F.cross_entropy(
                reverse_labeled, complementary_labels(y, self.num_classes, self.generator)
            )
        else:  # a client without labels: no complementary labels to learn from
            loss_r = reverse_labeled.sum() * 0.0
        reverse_weak = head(weak.features)
        reverse_strong = head(strong.features)
        with torch.no_grad():
            probs = torch.softmax(weak.logits.detach().float(), dim=1)
            probs_reverse = torch.softmax(reverse_weak.detach().float(), dim=1)
            self.main.push(probs)
            self.reverse.push(probs_reverse)
            distri, distri_reverse = self.main.mean(o.ones_start), self.reverse.mean(o.ones_start)
            aligned, aligned_reverse = reciprocal_alignment(
                probs, probs_reverse, distri, distri_reverse, o.sample_targets
            )
        loss_cd, loss_ca = rda_losses(strong.logits, reverse_strong, aligned, aligned_reverse)
        labels = aligned.argmax(dim=1)
        mask = torch.ones(len(labels), dtype=strong.logits.dtype, device=labels.device)
        return UnlabeledLoss(loss_r + o.lambda_u * (loss_cd + loss_ca), labels, mask)

    def end(self, steps: int) -> None:
        self.store(
            BUFFERS,
            main=self.main.rows,
            reverse=self.reverse.rows,
            counters=np.array([self.main.position, self.main.filled], dtype=np.int64),
        )
