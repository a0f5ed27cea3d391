"""DER++: dark experience replay (Buzzega et al., "Dark Experience for General Continual Learning: a Strong,
Simple Baseline", NeurIPS 2020).

A buffer filled by reservoir sampling over the stream of training samples keeps each sample with the
logits the network gave it when it was stored ("dark knowledge"). Every step adds two replay terms to the
objective (eq. 6): ``alpha * ||h(x') - z'||^2`` on one buffer batch (matching the stored logits) and
``beta * CE(h(x''), y'')`` on another (the stored labels). ``alpha`` 0.1 and ``beta`` 0.5 sit in the
paper's search grid; the buffer's size is ``memory_size`` samples per client.

Federated: each client keeps its own reservoir across rounds and tasks in its persistent state (sample
indices into its data, labels, logits and the count of samples seen); the stored logits are those of the
client's local model at the step the sample went in, as in the paper's single-learner stream.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord
from pydantic import Field
from torch.nn import functional as F

from clients.continual import ContinualMethod
from clients.continual.memory import Memory
from fedtail.registry import CONTINUAL, PluginOptions

SEEN_KEY = "derpp"


def reservoir_slots(num_seen: int, batch: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Reservoir sampling (Vitter 1985, algorithm R) for ``batch`` new stream items after ``num_seen``:
    the buffer slot each goes to, or -1 for none. The i-th item overall fills slot i while the buffer has
    room, then replaces a uniformly drawn slot with probability ``size / (i + 1)``."""
    slots = np.full(batch, -1, dtype=np.int64)
    for k in range(batch):
        i = num_seen + k
        if i < size:
            slots[k] = i
        else:
            j = int(rng.integers(0, i + 1))
            if j < size:
                slots[k] = j
    return slots


@CONTINUAL.register("derpp")
class DERpp(ContinualMethod):
    acts_across_tasks = True

    class Options(PluginOptions):
        """``memory_size``: buffer samples per client; ``alpha``: logit-matching weight; ``beta``: the
        buffer's label loss weight."""

        memory_size: int = Field(200, ge=1, le=10_000_000)
        alpha: float = Field(0.1, ge=0.0, le=100.0)
        beta: float = Field(0.5, ge=0.0, le=100.0)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        from clients.local import step_seed

        state = ctx.state
        self.memory = Memory.load(state)
        self.num_seen = int(state[SEEN_KEY]["seen"]) if SEEN_KEY in state else 0
        self.changed = False
        seed = step_seed(ctx.job.config.seed, ctx.task, ctx.global_round, ctx.partition_id, 0xDE2)
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def training_data(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.ctx.sample_index  # position in x -> index in the client's data
        self.data_index = self.ctx.data.positions(self.ctx.task_classes) if index is None else index
        return x, y

    def _replay_batch(self, n: int) -> tuple[torch.Tensor, np.ndarray]:
        pick = torch.randint(len(self.memory), (n,), generator=self.generator).numpy()
        x = torch.from_numpy(np.ascontiguousarray(self.ctx.data.x[self.memory.indices[pick]]))
        return x.to(self.ctx.device), pick

    def extra_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        if not len(self.memory) or not len(x):
            return None
        model, n, dev = self.ctx.model, len(x), self.ctx.device
        xb, pick = self._replay_batch(n)
        stored = torch.from_numpy(self.memory.logits[pick]).to(dev)
        loss = self.options.alpha * F.mse_loss(model(xb), stored)
        xb, pick = self._replay_batch(n)
        labels = torch.from_numpy(self.memory.labels[pick]).to(dev)
        return loss + self.options.beta * F.cross_entropy(model(xb), labels)

    def after_step(self, logits: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        """Reservoir-insert the step's real samples with the logits they were trained with."""
        keep = index.cpu().numpy() < len(self.data_index)  # SMOTE's synthetic samples have no index
        positions = index.cpu().numpy()[keep]
        if not positions.size:
            return
        size = self.options.memory_size
        slots = reservoir_slots(self.num_seen, positions.size, size, self.rng)
        self.num_seen += positions.size
        if (slots < 0).all():
            return
        memory = self.memory
        filled = max(len(memory), int(slots.max()) + 1)
        indices = np.zeros(filled, dtype=np.int64)
        labels = np.zeros(filled, dtype=np.int64)
        stored = np.zeros((filled, logits.shape[1]), dtype=np.float32)
        if len(memory):
            indices[: len(memory)], labels[: len(memory)] = memory.indices, memory.labels
            stored[: len(memory)] = memory.logits
        values = logits.cpu().numpy()[keep]
        for k, slot in enumerate(slots):  # in stream order: a later item wins a slot drawn twice
            if slot >= 0:
                indices[slot] = self.data_index[positions[k]]
                labels[slot] = int(self.ctx.data.y[indices[slot]])
                stored[slot] = values[k]
        self.memory = Memory(indices, labels, stored)
        self.changed = True

    def end_round(self) -> None:
        self.ctx.state[SEEN_KEY] = ConfigRecord({"seen": self.num_seen})
        if self.changed:
            self.memory.save(self.ctx.state)

    @classmethod
    def memory_footprint(cls, ctx) -> tuple[int, int]:
        memory = Memory.load(ctx.state)
        return len(memory), memory.nbytes(ctx.data.sample_bytes)
