"""The exemplar memory replay-based methods keep on each client, and how exemplars are chosen.

A client's memory lives in its persistent state (``ctx.state``, so it survives a crash and a resume like
any client state) as the *indices* of the chosen samples in the client's own data plus their labels (and,
for DER++, their stored logits). The samples themselves stay where they are: a client that keeps an
exemplar keeps its data, and a memory of indices is what makes a checkpoint of thousands of clients
cheap. The memory's reported size counts the samples it stands for (`Memory.nbytes`), not the indices.

Budget: a fixed total of ``memory_size`` samples per client, split equally over the old classes the
client holds (iCaRL's "fixed memory": ``m = K / t`` exemplars per class, Rebuffi et al. 2017, Alg. 5);
when new classes arrive, every kept class is cut to its first ``m`` exemplars (the highest-priority ones:
herding orders them), then the new old classes are filled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from fedtail.models import array_from_numpy, array_to_numpy

if TYPE_CHECKING:
    from clients.local import LocalContext

MEMORY_KEY = "continual-memory"


@dataclass(frozen=True)
class Memory:
    """Exemplars grouped by class, each class in priority order (first kept when the budget shrinks)."""

    indices: np.ndarray  # int64, into the client's labeled data (`ClientData.x` / `.y`)
    labels: np.ndarray  # int64
    logits: np.ndarray | None = None  # float32 (n, classes): DER++'s stored responses

    @classmethod
    def empty(cls) -> Memory:
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))

    @classmethod
    def load(cls, state: RecordDict) -> Memory:
        if MEMORY_KEY not in state:
            return cls.empty()
        record = state[MEMORY_KEY]
        logits = array_to_numpy(record["logits"]) if "logits" in record else None
        return cls(
            array_to_numpy(record["indices"]).astype(np.int64),
            array_to_numpy(record["labels"]).astype(np.int64),
            logits,
        )

    def save(self, state: RecordDict) -> None:
        record = ArrayRecord()
        record["indices"] = array_from_numpy(np.ascontiguousarray(self.indices, dtype=np.int64))
        record["labels"] = array_from_numpy(np.ascontiguousarray(self.labels, dtype=np.int64))
        if self.logits is not None:
            record["logits"] = array_from_numpy(np.ascontiguousarray(self.logits, dtype=np.float32))
        state[MEMORY_KEY] = record

    def __len__(self) -> int:
        return int(self.indices.size)

    @property
    def classes(self) -> list[int]:
        return sorted(set(self.labels.tolist()))

    def take(self, keep: np.ndarray) -> Memory:
        return Memory(
            self.indices[keep], self.labels[keep], None if self.logits is None else self.logits[keep]
        )

    def reduce(self, per_class: int) -> Memory:
        """Each class cut to its first ``per_class`` exemplars (iCaRL's ReduceExemplarSet)."""
        rank = np.zeros(len(self), dtype=np.int64)
        for c in self.classes:
            where = np.flatnonzero(self.labels == c)
            rank[where] = np.arange(where.size)
        return self.take(rank < per_class)

    def nbytes(self, sample_bytes: int) -> int:
        """What holding these exemplars costs: each sample's input and label (and stored logits)."""
        extra = 0 if self.logits is None else self.logits.nbytes
        return len(self) * (sample_bytes + 8) + extra


def random_exemplars(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """``min(m, n)`` distinct positions among ``n``, in random priority order (reservoir-free uniform
    choice, as in Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning")."""
    return rng.permutation(n)[: min(m, n)]


def herding(features: np.ndarray, m: int) -> np.ndarray:
    """iCaRL's herding (Rebuffi et al. 2017, Alg. 4, after Welling 2009): positions ``p_1..p_m`` of
    distinct samples, chosen greedily so that the mean of the chosen L2-normalised features stays
    closest to the class mean ``mu`` of all normalised features:
    ``p_k = argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||``."""
    phi = np.asarray(features, dtype=np.float64)
    phi = phi / np.maximum(np.linalg.norm(phi, axis=1, keepdims=True), 1e-12)
    mu = phi.mean(axis=0)
    chosen: list[int] = []
    total = np.zeros_like(mu)
    available = np.ones(len(phi), dtype=bool)
    for k in range(1, min(m, len(phi)) + 1):
        dist = np.linalg.norm(mu - (phi + total) / k, axis=1)
        dist[~available] = np.inf
        i = int(np.argmin(dist))
        chosen.append(i)
        total += phi[i]
        available[i] = False
    return np.asarray(chosen, dtype=np.int64)


@torch.no_grad()
def features_of(model: torch.nn.Module, x: np.ndarray, device: torch.device, batch: int = 1024) -> np.ndarray:
    """``model.features`` of ``x`` in eval mode, as float64 numpy; ``(0, feature width)`` for no samples,
    so per-class sums over them keep their shape."""
    was_training = model.training
    model.eval()
    out = [
        model.features(torch.from_numpy(x[i : i + batch]).to(device)).double().cpu()
        for i in range(0, max(len(x), 1), batch)  # one (empty) batch for no samples: the width
    ]
    model.train(was_training)
    return torch.cat(out).numpy()


def update_memory(ctx: LocalContext, memory_size: int, selection: str) -> tuple[Memory, list[int]]:
    """The client's memory after adding the old classes it has not stored yet; returns it and the
    classes it added (empty when nothing changed; then nothing is written to the state).

    Old classes are those of the tasks before the current one. Herding ranks a class's samples by the
    features of the model at the end of the previous task (`LocalContext.previous_model`, which the
    server sends to replay methods), so every client chooses with the same model whichever round of
    the task it is first sampled in."""
    from clients.local import step_seed

    memory = Memory.load(ctx.state)
    data = ctx.data
    old = ctx.received(sorted(set(ctx.seen_classes) - set(ctx.task_classes)))
    held = set(np.unique(data.y).tolist())
    new = [c for c in old if c in held and c not in set(memory.classes)]
    if not new:
        return memory, []
    per_class = memory_size // len(set(memory.classes) | set(new))
    memory = memory.reduce(per_class)
    cfg = ctx.job.config
    rng = np.random.default_rng(step_seed(cfg.seed, ctx.task, ctx.partition_id, 0x3E3))
    model = ctx.previous_model if selection == "herding" else None
    indices, labels = [memory.indices], [memory.labels]
    for c in new:
        where = np.flatnonzero(data.y == c)
        if selection == "herding":
            order = herding(features_of(model, data.x[where], ctx.device), per_class)
        else:
            order = random_exemplars(where.size, per_class, rng)
        indices.append(where[order])
        labels.append(np.full(order.size, c, dtype=np.int64))
    memory = Memory(np.concatenate(indices), np.concatenate(labels))
    memory.save(ctx.state)
    return memory, new
