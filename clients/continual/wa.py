"""Weight Aligning (Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental Learning",
CVPR 2020).

After a task, the classifier's rows of the new classes have larger norms than the old ones (the new
classes had all their data, the old ones only exemplars), which biases predictions towards them. WA
rescales the new classes' weight vectors so that their mean norm equals the old classes':
``W_new <- gamma W_new``, ``gamma = mean_old ||w_i|| / mean_new ||w_j||`` (eq. 6-7); biases are left as
they are (as PyCIL's implementation does). The paper's weight clipping of the classifier is left out,
as in PyCIL's ``wa.py``. Training keeps discrimination with an exemplar memory and
knowledge distillation from the previous model, ``L = (1 - lambda) L_CE + lambda L_KD``, ``lambda =
C_old / C_seen`` (eq. 4; T 2), as in PyCIL's ``wa.py``.

Federated: the clients replay their memory (`clients.continual.replay`: class-balanced, herding) and
distil from the end-of-previous-task global model; the server aligns the aggregated global model once a
task's rounds are done (`end_task_on_server`), so the aligned model is what is evaluated and what the next
task starts from and distils from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord
from pydantic import Field

from clients.continual import linear_head_problem
from clients.continual.lwf import old_class_distillation
from clients.continual.replay import MemoryOptions, Replay
from fedtail.models import array_from_numpy, array_to_numpy
from fedtail.registry import CONTINUAL

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig

WEIGHT = "classifier.weight"


def weight_align(weight: np.ndarray, old: list[int], new: list[int]) -> tuple[np.ndarray, float]:
    """``weight`` (classes x features) with the rows of ``new`` scaled by gamma (eq. 6-7); returns it
    and gamma (1.0 when there are no old classes)."""
    if not old or not new:
        return weight, 1.0
    norms = np.linalg.norm(weight.astype(np.float64), axis=1)
    gamma = float(norms[old].mean() / max(norms[new].mean(), 1e-12))
    out = weight.copy()
    out[new] = (weight[new].astype(np.float64) * gamma).astype(weight.dtype)
    return out, gamma


@CONTINUAL.register("wa")
class WeightAligning(Replay):
    class Options(MemoryOptions):
        """Replay's memory options, and ``temperature``: T of the distillation term (2)."""

        temperature: float = Field(2.0, gt=0.0, le=100.0)

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        return super().check_config(cfg) or linear_head_problem(
            cfg, "aligns the norms of a linear classifier's rows"
        )

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.old = sorted(set(ctx.seen_classes) - set(ctx.task_classes))
        self.kd_lambda = len(self.old) / max(len(ctx.seen_classes), 1)

    def objective_weight(self) -> float:
        return 1.0 - self.kd_lambda

    def extra_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        term = old_class_distillation(self.ctx, self.old, logits, x, self.options.temperature)
        return None if term is None else self.kd_lambda * term

    @classmethod
    def end_task_on_server(cls, arrays: ArrayRecord, old: list[int], new: list[int]) -> ArrayRecord:
        weight, _ = weight_align(array_to_numpy(arrays[WEIGHT]), old, new)
        out = ArrayRecord(dict(arrays.items()))
        out[WEIGHT] = array_from_numpy(weight)
        return out
