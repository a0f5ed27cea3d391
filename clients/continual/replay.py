"""Experience replay with a class-balanced exemplar memory: each round's new-task samples are trained
together with the exemplars the client kept of its old classes.

The memory follows iCaRL's management (Rebuffi et al., "iCaRL: Incremental Classifier and Representation
Learning", CVPR 2017, Sec. 2.3-2.4): a fixed total of ``memory_size`` exemplars per client, ``m = K / t``
per old class, chosen by herding in the feature space of the global model at the end of the previous
task (the server sends it; for a class of task t-1, that is the model its task ended with), or
uniformly at random (the strong "tiny episodic memory" baseline of Chaudhry et al. 2019). Training is
plain: the objective sees new samples and exemplars alike (ER); the memory never holds the current
task's classes, so replay is the only defence against forgetting here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field

from clients.continual import ContinualMethod
from clients.continual.memory import Memory, update_memory
from fedtail.registry import CONTINUAL, PluginOptions

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig


class MemoryOptions(PluginOptions):
    """``memory_size``: exemplars per client, all old classes together; ``selection``: herding (iCaRL)
    or random."""

    memory_size: int = Field(200, ge=1, le=10_000_000)
    selection: Literal["herding", "random"] = Field("herding")


def check_memory(cfg: FedtailConfig) -> str | None:
    """A budget that cannot keep one exemplar of every class would drop whole classes."""
    size = MemoryOptions.model_validate(
        {k: v for k, v in cfg.continual.options.items() if k in MemoryOptions.model_fields}
    ).memory_size
    if size < cfg.num_classes:
        return (
            f"continual.options.memory_size={size} cannot keep one exemplar of each of the "
            f"{cfg.num_classes} classes; allowed: {cfg.num_classes} or more"
        )
    return None


@CONTINUAL.register("replay")
class Replay(ContinualMethod):
    Options = MemoryOptions
    uses_previous_model = True  # herding ranks exemplars with the end-of-task model

    acts_across_tasks = True

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        return super().check_config(cfg) or check_memory(cfg)

    def objective_classes(self) -> list[int]:
        """The classes seen so far, a grown head as in iCaRL and PyCIL: the loss does not push the rows
        of classes still to come down before their task starts."""
        return list(self.ctx.seen_classes)

    def training_data(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.memory, _ = update_memory(self.ctx, self.options.memory_size, self.options.selection)
        if not len(self.memory):
            return x, y
        data = self.ctx.data
        xm = torch.from_numpy(np.ascontiguousarray(data.x[self.memory.indices]))
        ym = torch.from_numpy(self.memory.labels)
        return torch.cat([x, xm]), torch.cat([y, ym])

    @classmethod
    def memory_footprint(cls, ctx) -> tuple[int, int]:
        memory = Memory.load(ctx.state)
        return len(memory), memory.nbytes(ctx.data.sample_bytes)
