"""SimPro: FixMatch whose logits are adjusted by class priors estimated from the unlabeled data, for
unlabeled class distributions that differ from the labeled one (Du et al., "SimPro: A Simple
Probabilistic Framework Towards Realistic Long-Tailed Semi-Supervised Learning", ICML 2024; official
code LeapLabTHU/SimPro, ``SimPro/train.py``).

The model's own logits f(x) stay balanced (the evaluated classifier); each loss adds a log prior:

    labeled:    L_x = CE(f(x) + tau log pi_all, y) / r
    pseudo-label of u:  q = softmax(f(weak(u)) + tau log pi_u),   used when max q >= threshold
    unlabeled:  L_u = mean_b 1(max q_b >= threshold) CE_soft(f(strong(u_b)) + tau log pi_all, q_b)

with r the unlabeled / labeled batches-per-epoch ratio. After each epoch (the E-step's statistics), the
M-step's estimates move by an EMA with momentum ``ema_u``: pi_u towards the sum of the used soft
pseudo-labels d over (sum d + 1), pi_all towards the labeled counts n_l plus d, normalised. pi_u starts
uniform and pi_all at the labeled distribution.

Federated reading: an epoch is a round. Every client sends d and n_l (the labeled visits) summed over
its steps as ``sums:simpro``; the server part sums them over the round's clients and updates both
priors for the whole federation, which every train message carries (before the first update the
client uses the uniform pi_u and the server's labeled prior). The official code trains two strong
views per unlabeled sample and both views of each labeled sample; here the loop's one strong view and
the labeled batch as stored. Defaults are the official CIFAR-10 script's: tau 2, threshold 0.95,
ema_u 0.9.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from pydantic import Field

from clients.semisup import SemiSupervised, ServerPart, UnlabeledLoss, UnlabeledStep
from fedtail.models import array_from_numpy, array_to_numpy
from fedtail.registry import SEMISUP, PluginOptions

if TYPE_CHECKING:
    from clients.local import LocalContext
    from fedtail.config import FedtailConfig

SUMS = "sums:simpro"  # reply: per class, used soft pseudo-label mass and labeled visits of the round
PRIORS = "simpro-priors"  # train message: the federation's pi_u and pi_all


class SimProOptions(PluginOptions):
    """The official code's settings."""

    tau: float = Field(2.0, ge=0.0, le=10.0, description="Strength of the logit adjustment (tau).")
    threshold: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence a pseudo-label needs.")
    ema_u: float = Field(0.9, ge=0.0, lt=1.0, description="EMA momentum of the prior estimates.")


def adjustment(prior: torch.Tensor, tau: float) -> torch.Tensor:
    """tau log pi, as the official ``compute_adjustment_by_py``: log(pi^tau + 1e-12)."""
    return torch.log(prior**tau + 1e-12)


def updated_priors(
    pi_u: np.ndarray, pi_all: np.ndarray, used: np.ndarray, labeled: np.ndarray, ema: float
) -> tuple[np.ndarray, np.ndarray]:
    """One M-step: pi_u towards d / (sum d + 1), pi_all towards (n_l + d) normalised, by EMA."""
    estimated = used / (used.sum() + 1.0)
    forward = labeled + used
    pi_u = ema * pi_u + (1 - ema) * estimated
    pi_all = ema * pi_all + (1 - ema) * forward / max(forward.sum(), 1e-12)
    return pi_u, pi_all


class SimProServer(ServerPart):
    """Keeps the federation's pi_u and pi_all and sends them with every train message."""

    def update(self, sums: dict[str, dict[str, np.ndarray]], replies: list) -> None:
        got = sums.get(SUMS)
        if got is None:
            return
        used = np.asarray(got["used"], dtype=np.float64)
        labeled = np.asarray(got["labeled"], dtype=np.float64)
        c = len(used)
        pi_u = self.state.get("pi_u", np.full(c, 1.0 / c))
        pi_all = self.state.get("pi_all", labeled / max(labeled.sum(), 1e-12))
        pi_u, pi_all = updated_priors(pi_u, pi_all, used, labeled, self.options.ema_u)
        self.state = {"pi_u": pi_u, "pi_all": pi_all}

    def records(self) -> dict[str, ArrayRecord]:
        if not self.state:
            return {}
        return {PRIORS: ArrayRecord({k: array_from_numpy(v) for k, v in self.state.items()})}


@SEMISUP.register("simpro")
class SimPro(SemiSupervised):
    """FixMatch with labeled and unlabeled logits adjusted by the federation's estimated priors."""

    Options = SimProOptions
    server = SimProServer

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        if cfg.train.objective != "ce":
            return (
                f"semisup.method='simpro' adjusts the labeled logits by its own prior estimate; "
                f"train.objective={cfg.train.objective!r} would adjust them twice; allowed: ce"
            )
        return None

    def __init__(self, ctx: LocalContext, options: SimProOptions) -> None:
        super().__init__(ctx, options)
        c, device = self.num_classes, ctx.device
        record = ctx.message.get(PRIORS)
        if record is not None:
            pi_u, pi_all = (array_to_numpy(record[k]).copy() for k in ("pi_u", "pi_all"))
        else:
            prior = np.asarray(ctx.class_prior, dtype=np.float64)
            pi_u, pi_all = np.full(c, 1.0 / c), prior / max(prior.sum(), 1e-12)
        self.adj_u = adjustment(torch.as_tensor(pi_u, dtype=torch.float32, device=device), options.tau)
        self.adj = adjustment(torch.as_tensor(pi_all, dtype=torch.float32, device=device), options.tau)
        self.used = torch.zeros(c, dtype=torch.float64, device=device)
        self.labeled = torch.zeros(c, dtype=torch.float64, device=device)
        self.ratio = 1.0

    def begin(self, index: np.ndarray) -> None:
        cfg = self.ctx.job.config
        bs = cfg.train.batch_size
        n_l = len(self.ctx.sample_index) if self.ctx.sample_index is not None else len(self.ctx.data.y)
        u_batches = -(-len(index) // min(cfg.semisup.mu * bs, max(len(index), 1)))
        l_batches = -(-n_l // bs)
        self.ratio = u_batches / l_batches if l_batches else 1.0

    def labeled_weight(self) -> float:
        return 1.0 / self.ratio

    def adjust_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.adj.to(logits.dtype)

    def loss(self, step: UnlabeledStep) -> UnlabeledLoss:
        o = self.options
        weak, strong = step.views["weak"], step.views["strong"]
        with torch.no_grad():
            q = torch.softmax(weak.logits.detach().float() + self.adj_u, dim=1)
            confidence, labels = q.max(dim=1)
            mask = (confidence >= o.threshold).float()
            self.used += (q * mask.unsqueeze(1)).sum(dim=0).double()
            y = step.labeled.y[: len(step.labeled.x)]
            self.labeled += torch.bincount(y, minlength=self.num_classes).double()
        soft_ce = -(q * F.log_softmax(strong.logits.float() + self.adj, dim=1)).sum(dim=1)
        return UnlabeledLoss((soft_ce * mask).mean(), labels, mask)

    def end(self, steps: int) -> None:
        self.ctx.reply[SUMS] = ArrayRecord(
            {
                "used": array_from_numpy(self.used.cpu().numpy()),
                "labeled": array_from_numpy(self.labeled.cpu().numpy()),
            }
        )
