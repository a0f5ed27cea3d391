"""Elastic weight consolidation (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
networks", PNAS 2017), the regularisation baseline of continual learning.

After a task, each parameter is anchored to its value ``theta*_A`` with a stiffness given by the diagonal
of the Fisher information on that task's data: ``L(theta) = L_B(theta) + sum_i lambda/2 F_i (theta_i -
theta*_A,i)^2`` (eq. 3). F is the empirical Fisher: the mean over the task's samples of the squared
gradient of ``log p(y | x, theta*)`` at the true label, computed per sample.

Over several tasks the paper adds one such penalty per task. A sum of quadratics ``sum_t F_t (theta -
theta*_t)^2`` equals ``F (theta - a)^2 + const`` with ``F = sum_t F_t`` and ``a = sum_t F_t theta*_t / F``, so
the client keeps exactly the paper's gradient with two model-sized arrays, whatever the number of tasks.

Federated: when a client first trains in a new task, it consolidates the old classes it holds and has not
consolidated yet, at the end-of-previous-task global model the server sends (`uses_previous_model`), on
its own samples of those classes; the Fisher and the weighted anchors stay in its persistent state.

The penalty's gradient ``lambda F_i (theta_i - a_i)`` is a spring of stiffness ``lambda F_i``; SGD with
learning rate ``eta`` and momentum ``mu`` follows it only while ``eta lambda F_i < 2 (1 + mu)``; beyond
that the weights oscillate and blow up (seen on Split-digits with one client). So with SGD the stiffness
is capped at half that limit, ``(1 + mu) / eta``: the paper's penalty wherever the optimiser can follow
it, the stiffest it can follow elsewhere. lambda's default is 100; FACIL's 5,000 (Masana et al., TPAMI
2022) goes with a Fisher of batch-mean gradients, about a batch size smaller than this per-sample one.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord
from pydantic import Field
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from clients.continual import ContinualMethod
from fedtail.models import array_from_numpy, array_to_numpy
from fedtail.registry import CONTINUAL, PluginOptions

FISHER_KEY, ANCHOR_KEY, CLASSES_KEY = "ewc-fisher", "ewc-weighted-anchor", "ewc"


def empirical_fisher(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: list[int] | None = None,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of ``model`` on ``(x, y)``: the mean over samples of the squared
    per-sample gradient of the log-likelihood of the true label, parameter by parameter.

    ``classes``: the model's output space when it was trained (the classes seen by then); the likelihood
    is the softmax over those only, so the rows of classes not seen yet get no Fisher and stay free to
    learn them (a grown head, as in PyCIL). None: every output."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    cols = None if classes is None else torch.as_tensor(classes, dtype=torch.int64, device=y.device)
    if cols is not None:
        position = torch.full((int(cols.max()) + 1,), -1, dtype=torch.int64, device=y.device)
        position[cols] = torch.arange(len(cols), device=y.device)
        y = position[y]

    def nll(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(logits if cols is None else logits[:, cols], yi.unsqueeze(0))

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    was_training = model.training
    model.eval()
    for start in range(0, len(y), batch_size):
        grads = per_sample(params, x[start : start + batch_size], y[start : start + batch_size])
        for k, g in grads.items():
            fisher[k] += g.pow(2).sum(dim=0)
    model.train(was_training)
    return {k: v / max(len(y), 1) for k, v in fisher.items()}


def ewc_penalty(
    model: torch.nn.Module, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], lam: float
) -> torch.Tensor:
    """``lambda/2 sum_i F_i (theta_i - a_i)^2`` over the parameters ``fisher`` names."""
    terms = [(fisher[k] * (p - anchor[k]).pow(2)).sum() for k, p in model.named_parameters() if k in fisher]
    return 0.5 * lam * torch.stack(terms).sum()


@CONTINUAL.register("ewc")
class EWC(ContinualMethod):
    acts_across_tasks = True
    uses_previous_model = True

    class Options(PluginOptions):
        """``lam``: the penalty's strength lambda."""

        lam: float = Field(100.0, ge=0.0, le=1e9)

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.fisher, self.anchor = self._consolidate()

    def _consolidate(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | tuple[None, None]:
        ctx, state = self.ctx, self.ctx.state
        done = [int(c) for c in state[CLASSES_KEY]["classes"]] if CLASSES_KEY in state else []
        old = sorted(set(ctx.seen_classes) - set(ctx.task_classes))
        todo = [c for c in ctx.received(old) if c not in done]
        fisher = weighted = None
        if FISHER_KEY in state:
            fisher = {k: torch.from_numpy(array_to_numpy(a).copy()) for k, a in state[FISHER_KEY].items()}
            weighted = {k: torch.from_numpy(array_to_numpy(a).copy()) for k, a in state[ANCHOR_KEY].items()}
        if todo:
            x, y = ctx.data.for_classes(todo)
            if len(y):
                teacher = ctx.previous_model
                new = empirical_fisher(
                    teacher, torch.from_numpy(x).to(ctx.device), torch.from_numpy(y).to(ctx.device), old
                )
                star = {k: v.detach() for k, v in teacher.named_parameters()}
                new = {k: v.cpu() for k, v in new.items()}
                contribution = {k: new[k] * star[k].cpu() for k in new}
                if fisher is None:
                    fisher, weighted = new, contribution
                else:
                    fisher = {k: fisher[k] + new[k] for k in fisher}
                    weighted = {k: weighted[k] + contribution[k] for k in weighted}
                state[FISHER_KEY] = ArrayRecord({k: array_from_numpy(v.numpy()) for k, v in fisher.items()})
                state[ANCHOR_KEY] = ArrayRecord({k: array_from_numpy(v.numpy()) for k, v in weighted.items()})
            state[CLASSES_KEY] = ConfigRecord({"classes": sorted(done + todo)})
        if fisher is None:
            return None, None
        anchor = {
            k: torch.where(fisher[k] > 0, weighted[k] / fisher[k].clamp_min(1e-30), 0.0) for k in fisher
        }
        t = ctx.job.config.train
        if t.optimizer == "sgd" and self.options.lam > 0:  # the stiffness SGD can follow (docstring)
            cap = (1.0 + t.momentum) / (t.lr * self.options.lam)
            fisher = {k: v.clamp(max=cap) for k, v in fisher.items()}
        dev = ctx.device
        return {k: v.to(dev) for k, v in fisher.items()}, {k: v.to(dev) for k, v in anchor.items()}

    def objective_classes(self) -> list[int]:
        """The objective's loss over the new task's classes only, as in PyCIL's class-incremental EWC:
        the penalty protects the weights, and the new task's loss does not push old logits down."""
        return list(self.ctx.task_classes)

    def extra_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        if self.fisher is None or self.options.lam == 0:
            return None
        return ewc_penalty(self.ctx.model, self.fisher, self.anchor, self.options.lam)

    @classmethod
    def memory_footprint(cls, ctx) -> tuple[int, int]:
        """No samples; the Fisher diagonal and the weighted anchors, each the size of the model."""
        if FISHER_KEY not in ctx.state:
            return 0, 0
        return 0, sum(
            array_to_numpy(a).nbytes for key in (FISHER_KEY, ANCHOR_KEY) for a in ctx.state[key].values()
        )
