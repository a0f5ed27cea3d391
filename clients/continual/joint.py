"""Joint training: every round trains on all of the client's samples of every class seen so far.

The upper bound of class-incremental learning (e.g. Rebuffi et al. 2017, iCaRL, Sec. 4; "Joint" in
Buzzega et al. 2020): nothing is forgotten because nothing is given up. Its memory is all the client's
data of the old classes, which it reports as such.
"""

from __future__ import annotations

import numpy as np
import torch

from clients.continual import ContinualMethod
from fedtail.registry import CONTINUAL, PluginOptions


@CONTINUAL.register("joint")
class Joint(ContinualMethod):
    class Options(PluginOptions):
        """Joint training has no settings: ``continual.options`` must be empty."""

    def training_data(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = self.ctx.data.for_classes(self.ctx.received(self.ctx.seen_classes))
        return torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(ys)

    def objective_classes(self) -> list[int]:
        """The classes seen so far (a grown head): no loss on the rows of classes still to come."""
        return list(self.ctx.seen_classes)

    @classmethod
    def memory_footprint(cls, ctx) -> tuple[int, int]:
        """Every sample of the old classes: Joint keeps all of them."""
        old = ctx.received(sorted(set(ctx.seen_classes) - set(ctx.task_classes)))
        n = int(np.isin(ctx.data.y, old).sum())
        return n, n * (ctx.data.sample_bytes + 8)
