"""BiC (Wu et al., "Large Scale Incremental Learning", CVPR 2019): bias correction of the new classes.

Stage 1 trains on the new task's samples and the exemplars of the old classes, with distillation from
the previous model on the old classes: ``L = lambda L_d + (1 - lambda) L_c``, ``lambda = n_old / n_seen``,
``L_d`` the tempered KD of eq. 2 (T 2); the teacher is the previous model *with its bias layer*
(`teacher_logits`), as in the paper and PyCIL's ``bic.py``. A small class-balanced validation split is
held out of the stage-1 data: per class ``split_ratio`` of the exemplars each old class keeps, and as
many samples of each new class (PyCIL's ``val_samples_per_class``).

Stage 2 fits a single two-parameter bias layer on the new classes' logits,
``q_k = alpha o_k + beta`` for the task's classes and ``q_k = o_k`` for the old ones (eq. 4; one layer
for the newest classes, as the paper has), by cross-entropy on the validation split with the network
frozen; the corrected logits are what is evaluated after the task.

Federated: each client holds out its own split (from its exemplar memory and its new-class samples);
stage 2 minimises the cross-entropy pooled over every client's split, the objective the paper minimises
on one validation set, by ``bias_rounds`` end-of-task exchanges of Newton's method: the server sends
(alpha, beta), each client returns the gradient and Hessian of its split's summed loss there (two and
four numbers), the server takes the Newton step on the sums. The loss is convex in (alpha, beta), so
this converges in a few exchanges to the pooled optimum; averaging locally fitted pairs instead (FedAvg)
was measured to overcorrect, since each client's split holds only the few classes it has.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from clients.continual import Head
from clients.continual.lwf import old_class_distillation
from clients.continual.memory import Memory, update_memory
from clients.continual.replay import MemoryOptions, Replay
from fedtail.registry import CONTINUAL

ALPHA, BETA, WEIGHT, CORRECTED = "alpha", "beta", "weight", "corrected"
GRADIENT, HESSIAN, LOSS = "gradient", "hessian", "loss"


def parameters(head: Head) -> tuple[float, float]:
    """(alpha, beta) of a head; the identity (1, 0) for an empty one (before the first Newton step)."""
    if ALPHA not in head:
        return 1.0, 0.0
    return float(head[ALPHA][0]), float(head[BETA][0])


def bias_correct(
    logits: torch.Tensor, corrected: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Eq. 4: ``alpha o_k + beta`` on the columns in ``corrected`` (bool per class), ``o_k`` elsewhere."""
    return torch.where(corrected, alpha * logits + beta, logits)


def validation_per_class(memory_per_class: int, split_ratio: float) -> int:
    """Validation samples per class: ``split_ratio`` of the exemplars a class keeps (PyCIL:
    ``int(split_ratio * memory_size / known_classes)``), at least one when a class keeps two or more."""
    if memory_per_class < 2:
        return 0
    return max(1, int(split_ratio * memory_per_class))


def bias_loss_terms(
    logits: torch.Tensor, y: torch.Tensor, corrected: torch.Tensor, alpha: float, beta: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Gradient (2,), Hessian (2, 2) and value of the *summed* cross-entropy of the corrected logits
    (already masked to the seen classes) over ``y``, at (alpha, beta): what a client adds to the pooled
    stage-2 objective. The loss is convex in (alpha, beta) (log-sum-exp of an affine map)."""
    logits = logits.double()

    def loss(theta: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(bias_correct(logits, corrected, theta[0], theta[1]), y, reduction="sum")

    theta = torch.tensor([float(alpha), float(beta)], dtype=torch.float64, requires_grad=True)
    value = loss(theta)
    (grad,) = torch.autograd.grad(value, theta)
    hess = torch.autograd.functional.hessian(loss, theta.detach())
    return grad.numpy(), hess.numpy(), float(value.detach())


def newton_step(
    theta: np.ndarray, grad: np.ndarray, hess: np.ndarray, n: float, max_step: float = 1.0
) -> np.ndarray:
    """One Newton step on the mean loss (gradient and Hessian summed over ``n`` samples), with a small
    ridge for a flat direction and the step's length capped (a trust region: far from the optimum the
    quadratic model overshoots)."""
    step = np.linalg.solve(hess / n + 1e-6 * np.eye(2), grad / n)
    length = float(np.linalg.norm(step))
    if length > max_step:
        step *= max_step / length
    return theta - step


@CONTINUAL.register("bic")
class BiC(Replay):
    class Options(MemoryOptions):
        """Replay's memory options; ``temperature`` T of the distillation (2); ``split_ratio``: share of
        each class's exemplars held out for stage 2 (0.1); ``bias_rounds``: Newton steps of stage 2,
        one end-of-task exchange each (8)."""

        temperature: float = Field(2.0, gt=0.0, le=100.0)
        split_ratio: float = Field(0.1, gt=0.0, lt=1.0)
        bias_rounds: int = Field(8, ge=1, le=1000)

    @classmethod
    def statistics_rounds(cls, cfg) -> int:
        return cls.Options.model_validate(cfg.continual.options).bias_rounds

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.old = sorted(set(ctx.seen_classes) - set(ctx.task_classes))
        self.kd_lambda = len(self.old) / max(len(ctx.seen_classes), 1)

    # ---- the validation split ----------------------------------------------------------------------
    def split(self, memory: Memory) -> tuple[np.ndarray, np.ndarray]:
        """``(keep, held)``: which exemplars of ``memory`` stay for stage 1 (bool) and the positions in the
        client's data of the validation split (exemplars and new-class samples): the same every round of
        the task and at its end (seeded by run, task and client)."""
        from clients.local import step_seed

        ctx = self.ctx
        if not len(memory):
            return np.ones(0, dtype=bool), np.zeros(0, dtype=np.int64)
        per_class = self.options.memory_size // len(memory.classes)
        v = validation_per_class(per_class, self.options.split_ratio)
        rng = np.random.default_rng(step_seed(ctx.job.config.seed, ctx.task, ctx.partition_id, 0xB1C))
        keep = np.ones(len(memory), dtype=bool)
        held = []
        for c in memory.classes:
            where = np.flatnonzero(memory.labels == c)
            if where.size >= 2:
                out = rng.choice(where, size=min(v, where.size - 1), replace=False)
                keep[out] = False
                held.append(memory.indices[out])
        index = ctx.sample_index if ctx.sample_index is not None else np.arange(len(ctx.data.y))
        labels = ctx.data.y[index]
        for c in ctx.received(ctx.task_classes):  # a client absent from the task holds none of it
            where = index[labels == c]
            if where.size >= 2:
                held.append(rng.choice(where, size=min(v, where.size - 1), replace=False))
        return keep, np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)

    # ---- stage 1 ------------------------------------------------------------------------------------
    def training_data(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory, _ = update_memory(self.ctx, self.options.memory_size, self.options.selection)
        self.memory = memory
        if not len(memory):
            return x, y
        keep, held = self.split(memory)
        data = self.ctx.data
        index = self.ctx.sample_index if self.ctx.sample_index is not None else np.arange(len(x))
        new = torch.from_numpy(~np.isin(index, held))
        xm = torch.from_numpy(np.ascontiguousarray(data.x[memory.indices[keep]]))
        ym = torch.from_numpy(memory.labels[keep])
        return torch.cat([x[new], xm]), torch.cat([y[new], ym])

    def objective_weight(self) -> float:
        return 1.0 - self.kd_lambda

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.evaluation_logits_from(self.ctx.previous_model(x), self.ctx.previous_head or {})

    def extra_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        term = old_class_distillation(
            self.ctx, self.old, logits, x, self.options.temperature, teacher=self.teacher_logits
        )
        return None if term is None else self.kd_lambda * term

    # ---- stage 2 ------------------------------------------------------------------------------------
    def task_statistics(self, head: Head, exchange: int) -> Head:
        """Gradient, Hessian and value of this client's summed stage-2 loss at the head's (alpha, beta)
        (the identity at the first exchange), and its split's size; zeros when it holds no split."""
        ctx = self.ctx
        memory, _ = update_memory(ctx, self.options.memory_size, self.options.selection)
        held = self.split(memory)[1] if self.old else np.zeros(0, dtype=np.int64)
        if not held.size:
            return {GRADIENT: np.zeros(2), HESSIAN: np.zeros((2, 2)), LOSS: np.zeros(1), WEIGHT: np.zeros(1)}
        alpha, beta = parameters(head) if exchange else (1.0, 0.0)  # exchange 0: the last task's head
        num_classes = ctx.job.config.num_classes
        seen = torch.zeros(num_classes, dtype=torch.bool)
        seen[ctx.seen_classes] = True
        corrected = torch.zeros(num_classes, dtype=torch.bool)
        corrected[ctx.task_classes] = True
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(ctx.data.x[held])).to(ctx.device)
            logits = ctx.model(x).cpu().masked_fill(~seen, -1e9)
        grad, hess, loss = bias_loss_terms(logits, torch.from_numpy(ctx.data.y[held]), corrected, alpha, beta)
        return {GRADIENT: grad, HESSIAN: hess, LOSS: np.array([loss]), WEIGHT: np.array([float(held.size)])}

    @classmethod
    def head_from_statistics(cls, sums, head, exchange, *, arrays, old, new, options):
        """A Newton step from the head's (alpha, beta) on the pooled loss; the identity at the first
        task (nothing to correct) or when no client holds a split."""
        n = float(sums[WEIGHT][0])
        if not old or n <= 0:
            return arrays, {}
        start = parameters(head) if exchange else (1.0, 0.0)  # exchange 0 receives the last task's head
        theta = newton_step(np.array(start), sums[GRADIENT], sums[HESSIAN], n)
        out = {ALPHA: theta[:1], BETA: theta[1:], CORRECTED: np.asarray(new, dtype=np.int64)}
        return arrays, {**out, LOSS: sums[LOSS] / n}

    @staticmethod
    def evaluation_logits_from(logits: torch.Tensor, head: Head) -> torch.Tensor:
        if not head:
            return logits
        corrected = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        corrected[torch.as_tensor(np.array(head[CORRECTED]), dtype=torch.int64, device=logits.device)] = True
        alpha = torch.as_tensor(head[ALPHA][0], dtype=logits.dtype, device=logits.device)
        beta = torch.as_tensor(head[BETA][0], dtype=logits.dtype, device=logits.device)
        return bias_correct(logits, corrected, alpha, beta)

    @classmethod
    def evaluation_logits(cls, model: nn.Module, x: torch.Tensor, head: Head) -> torch.Tensor:
        return cls.evaluation_logits_from(model(x), head)
