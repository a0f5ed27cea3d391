"""Experience replay with a class-balanced exemplar memory: each round's new-task samples are trained
together with the exemplars the client kept of its old classes.

The memory follows iCaRL's management (Rebuffi et al., "iCaRL: Incremental Classifier and Representation
Learning", CVPR 2017, Sec. 2.3-2.4): a fixed total of ``memory_size`` exemplars per client, ``m = K / t``
per old class, chosen by herding in the feature space of the model at the end of the class's task, or
uniformly at random (the strong "tiny episodic memory" baseline of Chaudhry et al. 2019). Training is
plain: the objective sees new samples and exemplars alike (ER); the memory never holds the current
task's classes, so replay is the only defence against forgetting here.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from clients.continual import ContinualMethod
from clients.continual.memory import Memory, update_memory
from fedtail.registry import CONTINUAL, PluginOptions


class MemoryOptions(PluginOptions):
    """``memory_size``: exemplars per client, all old classes together; ``selection``: herding (iCaRL)
    or random."""

    memory_size: int = Field(200, ge=1, le=10_000_000)
    selection: Literal["herding", "random"] = Field("herding")


@CONTINUAL.register("replay")
class Replay(ContinualMethod):
    Options = MemoryOptions
    uses_previous_model = True  # herding ranks exemplars with the end-of-task model

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
