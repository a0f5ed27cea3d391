"""iCaRL (Rebuffi et al., "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017).

Three parts, as in the paper:

* **Exemplar memory** managed by herding (Alg. 4-5): the replay memory of `clients.continual.replay`,
  a fixed ``memory_size`` per client split equally over the old classes.
* **Representation learning with distillation** (Alg. 3): the new samples and the exemplars are
  trained together; the old classes' outputs are kept at the previous model's with the paper's sigmoid
  distillation, ``sum_{y old} BCE(sigmoid(z_y), sigmoid(z^prev_y))`` per sample (here averaged over the
  batch). The paper's classification term is a per-class sigmoid loss; here it is the configured
  objective over the seen classes (cross-entropy by default, as PyCIL and most re-implementations), so
  iCaRL composes with the imbalance objectives.
* **Nearest-mean-of-exemplars classification** (Alg. 1): a sample goes to the class whose exemplars'
  mean L2-normalised feature ``mu_y`` (renormalised) is nearest to its own normalised feature.

Federated: once a task's rounds are done, every client computes the exemplars it will keep (its memory
for the next task, herded with the end-of-task global model) and returns, per class, the sum of their
normalised features and their number (`task_statistics`); the server divides the summed sums by the
summed counts, which is exactly the mean over every client's exemplars, never seeing a sample. The
end-of-task and final evaluations classify by these means (`evaluation_logits`: scores ``-||phi - mu||^2``);
within a task's rounds the network's own head is scored.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clients.continual import Head
from clients.continual.memory import features_of, update_memory
from clients.continual.replay import MemoryOptions, Replay
from fedtail.registry import CONTINUAL

MEANS, COUNTS = "feature-sums", "counts"


def sigmoid_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """iCaRL's distillation term (Alg. 3): binary cross-entropy of each old class's sigmoid output
    against the previous model's, summed over the old classes and averaged over the batch."""
    target = torch.sigmoid(teacher)
    return F.binary_cross_entropy_with_logits(student, target, reduction="sum") / max(len(student), 1)


def normalise(features: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    if isinstance(features, torch.Tensor):
        return F.normalize(features, dim=1)
    norm = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norm, 1e-12)


def nearest_mean_scores(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``-||phi(x) - mu_y||^2`` for L2-normalised features and means: the larger, the nearer (Alg. 1)."""
    phi = F.normalize(features, dim=1)
    return -torch.cdist(phi, means.to(phi.dtype)).square()


@CONTINUAL.register("icarl")
class ICaRL(Replay):
    Options = MemoryOptions

    @classmethod
    def statistics_rounds(cls, cfg) -> int:
        return 1

    @classmethod
    def check_config(cls, cfg) -> str | None:
        """Nearest-mean classification reads features, not the classifier: an evaluation-time logit
        adjustment or a classifier re-training stage would change nothing it scores."""
        if (problem := super().check_config(cfg)) is not None:
            return problem
        if cfg.evaluation.adjustment != "none":
            return (
                "continual.method='icarl' classifies by nearest class means, which evaluation.adjustment="
                f"{cfg.evaluation.adjustment!r} cannot adjust; allowed: none"
            )
        if cfg.crt.rounds:
            return (
                f"continual.method='icarl' classifies by nearest class means, so crt.rounds={cfg.crt.rounds} "
                "would retrain a classifier it never uses; allowed: 0"
            )
        return None

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        old = sorted(set(ctx.seen_classes) - set(ctx.task_classes))
        self.old_columns = torch.as_tensor(old, dtype=torch.int64, device=ctx.device) if old else None

    def extra_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        columns = self.old_columns
        if columns is None or not len(x):
            return None
        with torch.no_grad():
            teacher = self.teacher_logits(x)[:, columns]
        return sigmoid_distillation(logits[:, columns], teacher)

    def task_statistics(self, head: Head, exchange: int) -> Head:
        """Per class, the sum of the normalised end-of-task features of the exemplars this client keeps
        from now on, and their number."""
        ctx = self.ctx
        model = ctx.model
        after = dataclasses.replace(ctx, task=ctx.task + 1, task_classes=[], previous_model_fn=lambda: model)
        memory, _ = update_memory(after, self.options.memory_size, self.options.selection)
        classes = ctx.job.config.num_classes
        phi = normalise(features_of(model, ctx.data.x[memory.indices], ctx.device))
        sums = np.zeros((classes, phi.shape[1]))
        np.add.at(sums, memory.labels, phi)
        return {MEANS: sums, COUNTS: np.bincount(memory.labels, minlength=classes).astype(np.float64)}

    @classmethod
    def head_from_statistics(cls, sums, head, exchange, *, arrays, old, new, options):
        counts = sums[COUNTS]
        means = sums[MEANS] / np.maximum(counts, 1)[:, None]
        return arrays, {"class-means": normalise(means), COUNTS: counts}

    @classmethod
    def evaluation_logits(cls, model: nn.Module, x: torch.Tensor, head: Head) -> torch.Tensor:
        means = torch.as_tensor(head["class-means"], device=x.device)
        scores = nearest_mean_scores(model.features(x), means)
        missing = torch.as_tensor(head[COUNTS] == 0, device=x.device)
        return scores.masked_fill(missing, -1e9).to(torch.float32)
