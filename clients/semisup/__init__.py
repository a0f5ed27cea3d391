"""Semi-supervised local updates: how a client's unlabeled samples enter its local training, registered
by name in `fedtail.registry.SEMISUP` (config ``semisup.method``; one module per method).

The training loop (`clients.local.train_local`) draws a seeded stream of unlabeled batches beside the
labeled one, ``semisup.mu`` unlabeled samples per labeled one, passes the labeled batch and the method's
`SemiSupervised.views` of the unlabeled batch (``weak``, ``strong``: the `clients.augment` plug-ins the
config names) through the model in one forward pass, and adds the method's `SemiSupervised.loss` to the
objective's, the continual method's and the strategy's terms. What the method returns names the
pseudo-labels it used, so the loop counts, per class, how many were used and how many were right
against the unlabeled samples' hidden labels, which stay on the client and serve evaluation only
(`PseudoLabelCounts`, summed over clients into rounds.csv).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord
from pydantic import Field
from torch import nn

from fedtail.models import array_from_numpy, array_to_numpy
from fedtail.registry import PluginOptions

if TYPE_CHECKING:
    from clients.local import LocalContext
    from clients.terms import Step
    from fedtail.config import FedtailConfig

PSEUDO_LABELS = "sums:pseudo-labels"
"""The reply record of the round's pseudo-label counts (`PseudoLabelCounts`); records named ``sums:...``
are summed over the round's clients by the server (`strategies.base.summed_records`)."""

PLAIN = "plain"
"""The view of an unlabeled batch as stored, without augmentation (Arazo et al.'s pseudo-label view)."""

COUNTS = ("seen", "used_true", "predicted", "correct")
"""Per class, over the round's unlabeled batches (sample visits): samples of the class seen, those of
them given a pseudo-label, pseudo-labels of the class used, and those that were right."""


@dataclass(frozen=True)
class View:
    """One augmented view of the unlabeled batch, through the model: its inputs, features and logits."""

    x: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor


@dataclass(frozen=True)
class UnlabeledStep:
    """One local step as a semi-supervised method sees it.

    ``labeled``: the labeled batch (`clients.terms.Step`; may be empty on a client without labels).
    ``index``: each unlabeled sample's position in the client's unlabeled part (``ClientData.x_unlabeled``,
    every task's), the key of per-sample state. ``views``: the method's `SemiSupervised.views`, by name.
    ``step`` / ``total_steps``: progress through the round (0-based; a warm-up or ramp reads it).
    ``augment(view, x)``: a further ``weak`` / ``strong`` view of any inputs (the labeled batch's, for a
    method that also augments labeled samples), drawn from the same seeded stream as the views.
    """

    labeled: Step
    index: torch.Tensor
    views: dict[str, View]
    step: int
    total_steps: int
    augment: Callable[[str, torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class UnlabeledLoss:
    """A method's unlabeled term: the loss, and the pseudo-label of each unlabeled sample with its weight
    (0: not used; FixMatch's confidence mask, SoftMatch's soft weight), for the pseudo-label counts."""

    loss: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor


class ServerPart:
    """A semi-supervised method's server part (`SemiSupervised.server`): what the whole federation's
    unlabeled data says, which no client sees alone.

    After each round, `update` reads the round's ``sums:`` reply records summed over its clients (the
    method's client part sends them through ``ctx.reply``) and each aggregated client's other reply
    records, in partition order (what cannot be summed: FedoSSL's local centroids, clustered together
    on the server); `records` are sent with every train message
    (the client reads them from ``ctx.message``). ``state`` holds numpy arrays only and is checkpointed with
    the strategy's state, so a resumed run sends what it would have sent."""

    def __init__(self, cfg: FedtailConfig, options: PluginOptions) -> None:
        self.cfg = cfg
        self.options = options
        self.state: dict[str, np.ndarray] = {}

    def update(
        self, sums: dict[str, dict[str, np.ndarray]], replies: list[tuple[int, dict[str, Any]]]
    ) -> None:
        """Fold one round's client statistics into ``state``: ``sums`` summed over the clients,
        ``replies`` as (partition id, records) of each aggregated client, by partition id."""

    def records(self) -> dict[str, ArrayRecord]:
        """Records every train message carries beside the model (none by default)."""
        return {}


class SemiSupervised:
    """Base class of a semi-supervised method; the hooks default to the supervised-only baseline.

    Class attributes say what the loop must provide: ``uses_unlabeled`` (the unlabeled part takes part in
    training at all), ``views`` (the views of each unlabeled batch the forward pass includes: ``weak`` /
    ``strong``, the config's augmentations, or `PLAIN`; empty: no unlabeled stream), ``server`` (a
    `ServerPart` that estimates federation-wide statistics each round). `modules` are the method's own
    layers (a second head, a twin network), part of the global model: sent, trained, averaged and
    checkpointed with it, never used by evaluation. Settings are ``semisup.options``, typed as
    ``self.options``.
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions
    uses_unlabeled: ClassVar[bool] = True
    views: ClassVar[tuple[str, ...]] = ("weak", "strong")
    reveals_labels: ClassVar[bool] = False
    """The all-labels upper bound: every client's unlabeled samples are loaded as labeled (their true
    labels), for training, the objective's counts and the server's class prior alike."""
    server: ClassVar[type[ServerPart] | None] = None

    @classmethod
    def modules(
        cls, cfg: FedtailConfig, input_shape: tuple[int, ...], feature_dim: int
    ) -> dict[str, nn.Module]:
        """The method's own modules, built (seeded) with the model as ``model.extra[name]``; none by
        default, so the model's arrays are the plain model's."""
        return {}

    def module(self, name: str) -> nn.Module:
        """One of the method's `modules`, as the client received it."""
        return self.ctx.model.extra[name]

    def labeled_weight(self) -> float:
        """Factor on the labeled loss (the objective's, before the other terms): 1 by default."""
        return 1.0

    def adjust_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The labeled logits the objective scores (after the strategy's adjustment), e.g. SimPro's
        logit adjustment by its estimated class prior; unchanged by default."""
        return logits

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        """Why the method cannot run with ``cfg`` (checked with the config, before any work), or None."""
        return None

    def __init__(self, ctx: LocalContext, options: PluginOptions) -> None:
        self.ctx = ctx
        self.options = options
        self.num_classes = ctx.job.config.num_classes

    def stored(self, key: str, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """A writable copy of array ``name`` of the client-state record ``key`` when it has ``shape``
        (state of another shape, e.g. from another partition, is not reused), else None."""
        record = self.ctx.state.get(key)
        if record is None or name not in record:
            return None
        value = array_to_numpy(record[name])
        return value.copy() if value.shape == tuple(shape) else None

    def store(self, key: str, **arrays: np.ndarray | torch.Tensor) -> None:
        """Keep ``arrays`` as the client-state record ``key`` (checkpointed with the run)."""
        self.ctx.state[key] = ArrayRecord(
            {
                name: array_from_numpy(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a)
                for name, a in arrays.items()
            }
        )

    def begin(self, index: np.ndarray) -> None:
        """Before the first step, with the positions of the round's unlabeled samples in the client's
        unlabeled part (this task's)."""

    def extra_inputs(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor,
        views: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """Inputs beyond the views that the step's forward pass must include, built from the labeled batch
        ``x``, ``y``, the unlabeled samples' positions ``index`` (in the client's unlabeled part, as
        `UnlabeledStep.index`) and its views, drawing from ``generator`` (e.g. mixup of labeled and
        unlabeled samples); they reach `loss` as views of their names. Default: none."""
        return {}

    def loss(self, step: UnlabeledStep) -> UnlabeledLoss | None:
        """The unlabeled term of one step; None for nothing."""
        return None

    def end(self, steps: int) -> None:
        """After the last step: keep per-client state in ``ctx.state``."""


class ConfidenceOptions(PluginOptions):
    """The FixMatch family's shared settings."""

    threshold: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence a pseudo-label needs (tau).")
    lambda_u: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the unlabeled loss.")


def received_pass(ctx: LocalContext, x: np.ndarray, features: bool = False) -> torch.Tensor:
    """The model as the client received it on ``x``, before any local step: its softmax (N, C), or with
    ``features`` its features. Eval mode and no gradient, so the pass leaves BatchNorm statistics as
    they were."""
    model = ctx.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        inputs = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(ctx.device)
        out = model.features(inputs) if features else torch.softmax(model(inputs).float(), dim=1)
    model.train(was_training)
    return out


def consistency_loss(logits_strong: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FixMatch's unlabeled loss: the masked cross-entropy of the strong view against the weak view's
    hard pseudo-labels, averaged over the whole unlabeled batch (masked samples count as zeros)."""
    if labels.numel() == 0:
        return logits_strong.sum() * 0.0
    ce = torch.nn.functional.cross_entropy(logits_strong, labels, reduction="none")
    return (ce * mask).mean()


class PseudoLabelCounts:
    """Per-class pseudo-label counts of one round (`COUNTS`), accumulated on the batches' device (no
    synchronisation per step) and read once at the end."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(len(COUNTS), num_classes, dtype=torch.int64, device=device)

    def add(self, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        """One batch: the samples' hidden labels, their pseudo-labels and weights (> 0: used)."""
        used = mask > 0
        c = self.num_classes
        self.counts[0] += torch.bincount(hidden, minlength=c)
        self.counts[1] += torch.bincount(hidden[used], minlength=c)
        self.counts[2] += torch.bincount(labels[used], minlength=c)
        self.counts[3] += torch.bincount(labels[used & (labels == hidden)], minlength=c)

    def as_arrays(self) -> dict[str, np.ndarray]:
        counts = self.counts.cpu().numpy()
        return {name: counts[i] for i, name in enumerate(COUNTS)}


def pseudo_label_columns(
    counts: dict[str, np.ndarray] | None, num_classes: int, tail: list[int] | None = None
) -> dict[str, float]:
    """rounds.csv's pseudo-label columns from the round's counts summed over clients: overall, over the
    ``tail`` classes (`fedtail.metrics.class_groups`' tail) and per class precision (right / used
    pseudo-labels of the class), recall (right / unlabeled samples of the class) and the share used
    (unlabeled samples given a pseudo-label / seen). NaN where nothing was counted."""
    nan = float("nan")

    def ratio(a: float, b: float) -> float:
        return float(a) / float(b) if b > 0 else nan

    if counts is None:
        zeros = np.zeros(num_classes)
        counts = {name: zeros for name in COUNTS}
    seen, used, predicted, correct = (np.asarray(counts[n], dtype=np.float64) for n in COUNTS)
    out = {
        "pl_used": ratio(used.sum(), seen.sum()),
        "pl_precision": ratio(correct.sum(), predicted.sum()),
    }
    rows = list(tail or [])
    out["tail_pl_precision"] = ratio(correct[rows].sum(), predicted[rows].sum()) if rows else nan
    out["tail_pl_recall"] = ratio(correct[rows].sum(), seen[rows].sum()) if rows else nan
    for c in range(num_classes):
        out[f"pl_precision_{c}"] = ratio(correct[c], predicted[c])
        out[f"pl_recall_{c}"] = ratio(correct[c], seen[c])
        out[f"pl_used_{c}"] = ratio(used[c], seen[c])
    return out
