"""CReFF: classifier re-training with federated features (Shang et al., 2022, "Federated Learning on
Heterogeneous and Long-Tailed Data via Classifier Re-Training with Federated Features", IJCAI; official
code shangxinyi/CReFF-FL, ``main.py``).

The clients train as in FedAvg and send, beside their update, per-class gradients of the classifier on
their real features (`clients.terms.creff`). The server keeps ``features_per_class`` federated features
per class (F ~ N(0, 1), learned across rounds, checkpointed) and each round:

1. averages the real gradients of each class over the clients that hold it (unweighted, eq. 7);
2. gradient matching (eq. 8-9): ``match_steps`` plain SGD steps at ``feature_lr`` on F minimising
   sum_c D(grad_{W,b} CE(W F_c + b, c), g_c) under the classifier the clients computed their gradients
   with, D the official ``distance_wb``: sum over the weight's rows of 1 - cos, plus 1 - cos of the bias
   gradients (cosines with 1e-6 added to the norms' product); only the classes with real gradients this
   round move;
3. re-trains a fresh linear classifier on the federated features (eq. 10): ``retrain_epochs`` epochs of
   plain SGD at ``retrain_lr``, batches of ``retrain_batch_size``, mean cross-entropy.

The model the server evaluates and saves is the FedAvg backbone with the re-trained classifier
(`evaluation_arrays`); clients keep training the plain FedAvg model, and the re-trained classifier is
what the next round's gradients and matching use. Defaults are the official code's (100 features per
class, 100 matching steps at 0.1, 300 re-training epochs at 0.01 in batches of 32).

Deviations, each for a setting the paper does not have: the classifier is re-trained on the classes
that have received real gradients so far (a class no client has yet held keeps its N(0, 1) features,
which would teach the classifier noise), so in class-incremental runs the old classes' features stay
as last matched; the gradients are computed without DSA augmentation (see the client part).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from clients.local import step_seed
from clients.terms.creff import CLASSIFIER, GRADIENTS, CReFFTerm, classifier_gradients
from fedtail.models import array_from_numpy, array_to_numpy
from fedtail.registry import STRATEGIES, PluginOptions
from strategies.base import ClientReply, FedtailStrategy

WEIGHT, BIAS = "classifier.weight", "classifier.bias"
_FEATURES_TAG, _CLASSIFIER_TAG = 0xFEA7, 0xC1A5


def distance_wb(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """The official ``distance_wb`` for a linear layer's gradients, batched over the last-but-one axis:
    sum over rows of 1 - cos(real_row, syn_row), a bias gradient (one row) included. ``real``, ``syn``:
    (..., rows, dim); returns (...,)."""
    dot = (real * syn).sum(dim=-1)
    norms = real.norm(dim=-1) * syn.norm(dim=-1) + 1e-6
    return (1.0 - dot / norms).sum(dim=-1)


def class_gradients(
    records: list[ArrayRecord],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The matching targets (eq. 7): each class's real gradients averaged over the clients that sent one
    for it, unweighted, as the official ``update_feature_syn``; (classes, weight grads, bias grads) in
    class order, or None when no client sent any."""
    sums: dict[int, list] = {}
    for record in records:
        gw, gb = array_to_numpy(record["weight"]), array_to_numpy(record["bias"])
        for i, c in enumerate(array_to_numpy(record["classes"]).tolist()):
            entry = sums.setdefault(int(c), [np.zeros_like(gw[i]), np.zeros_like(gb[i]), 0])
            entry[0] = entry[0] + gw[i]
            entry[1] = entry[1] + gb[i]
            entry[2] += 1
    if not sums:
        return None
    classes = sorted(sums)
    return (
        torch.tensor(classes, dtype=torch.int64),
        torch.from_numpy(np.stack([sums[c][0] / sums[c][2] for c in classes])),
        torch.from_numpy(np.stack([sums[c][1] / sums[c][2] for c in classes])),
    )


def match_features(
    features: torch.Tensor,
    classes: torch.Tensor,
    real_w: torch.Tensor,
    real_b: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    steps: int,
    lr: float,
) -> torch.Tensor:
    """CReFF's gradient matching (eq. 9): the federated features of ``classes`` (``features`` (C, m, d)
    rows ``classes``) after ``steps`` plain SGD steps at ``lr`` on sum_c D(g_syn_c, g_real_c); the
    other rows unchanged. ``real_w`` (len(classes), K, d) and ``real_b`` (len(classes), K) are the
    averaged real gradients under the classifier (``weight``, ``bias``)."""
    out = features.clone()
    syn = out[classes].clone().requires_grad_(True)
    for _ in range(steps):
        gw, gb = classifier_gradients(syn, classes, weight, bias)
        loss = (distance_wb(real_w, gw) + distance_wb(real_b[:, None, :], gb[:, None, :])).sum()
        (grad,) = torch.autograd.grad(loss, [syn])
        with torch.no_grad():
            syn -= lr * grad
    out[classes] = syn.detach()
    return out


def retrain_classifier(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CReFF's classifier re-training (eq. 10): plain SGD on the mean cross-entropy of ``W f + b`` over
    shuffled batches of the federated features, from (``weight``, ``bias``); the gradients in closed
    form (`classifier_gradients`: the same as autograd's, tested) and in place, which spares autograd's
    per-step cost over the official code's 300 epochs."""
    w, b = weight.clone(), bias.clone()
    n = len(labels)
    onehot = torch.nn.functional.one_hot(labels, w.shape[0]).to(features.dtype)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        shuffled, targets = features[order], onehot[order]  # one gather per epoch; batches are views
        for start in range(0, n, batch_size):
            f, t = shuffled[start : start + batch_size], targets[start : start + batch_size]
            residual = torch.softmax(torch.addmm(b, f, w.T), dim=-1).sub_(t).div_(len(f))
            w.addmm_(residual.T, f, alpha=-lr)
            b.sub_(residual.sum(dim=0), alpha=lr)
    return w, b


def linear_init(num_classes: int, dim: int, seed: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A fresh ``nn.Linear(dim, num_classes)``'s initial weight and bias (uniform in +-1/sqrt(dim)),
    seeded."""
    gen = torch.Generator().manual_seed(step_seed(*seed))
    layer = torch.nn.Linear(dim, num_classes)
    with torch.no_grad():
        bound = 1.0 / dim**0.5
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)
    return layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()


@STRATEGIES.register("creff")
class CReFFStrategy(FedtailStrategy, FedAvg):
    """FedAvg plus a classifier re-trained on federated features learned by gradient matching."""

    STATE = ("federated_features", "classifier", "matched")
    flower_options = False  # its options are fedtail's own, not Flower FedAvg's
    client_term = CReFFTerm

    class Options(PluginOptions):
        """CReFF's settings; official names: num_of_feature, match_epoch, lr_feature, crt_epoch, lr_net,
        batch_size_local_training, batch_real, and the fixed 10 repeats."""

        features_per_class: int = Field(100, ge=1, le=10_000, description="Federated features per class.")
        match_steps: int = Field(100, ge=0, le=10_000, description="Gradient-matching steps per round.")
        feature_lr: float = Field(0.1, gt=0.0, le=100.0, description="SGD step on the federated features.")
        retrain_epochs: int = Field(300, ge=1, le=10_000, description="Classifier re-training epochs.")
        retrain_lr: float = Field(0.01, gt=0.0, le=10.0, description="SGD step of the re-training.")
        retrain_batch_size: int = Field(32, ge=1, le=65_536, description="Re-training batch size.")
        real_batch_size: int = Field(32, ge=1, le=65_536, description="Real samples per class per draw.")
        gradient_repeats: int = Field(10, ge=1, le=1_000, description="Draws averaged per real gradient.")

    def __init__(self, cfg, node_of_partition, **kwargs) -> None:
        super().__init__(cfg, node_of_partition, **kwargs)
        self.options = self.Options.model_validate(cfg.strategy.options)
        self.federated_features: np.ndarray | None = None
        self.classifier: dict[str, np.ndarray] = {}
        self.matched: list[int] = []
        self._record: ArrayRecord | None = None

    def _initialise(self, arrays: ArrayRecord) -> None:
        k, d = tuple(arrays[WEIGHT].shape)
        rng = np.random.default_rng([self.cfg.seed, _FEATURES_TAG])
        m = self.options.features_per_class
        self.federated_features = rng.standard_normal((k, m, d), dtype=np.float32)
        weight, bias = linear_init(k, d, [self.cfg.seed, _CLASSIFIER_TAG, 0])
        self.classifier = {"weight": weight, "bias": bias}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.federated_features is None:
            self._initialise(arrays)
        self._record = ArrayRecord({k: array_from_numpy(v) for k, v in self.classifier.items()})
        return super().configure_train(server_round, arrays, config, grid)

    def train_records(self, partition_id: int) -> dict[str, ArrayRecord]:
        return {CLASSIFIER: self._record}

    def server_update(
        self, server_round: int, arrays: ArrayRecord | None, replies: list[ClientReply]
    ) -> ArrayRecord | None:
        averaged = class_gradients([r.records[GRADIENTS] for r in replies if GRADIENTS in r.records])
        if averaged is None or self.federated_features is None:
            return arrays
        classes, real_w, real_b = averaged
        weight = torch.from_numpy(self.classifier["weight"])
        bias = torch.from_numpy(self.classifier["bias"])
        o = self.options
        features = match_features(
            torch.from_numpy(self.federated_features),
            classes,
            real_w,
            real_b,
            weight,
            bias,
            o.match_steps,
            o.feature_lr,
        )
        self.federated_features = features.numpy()
        self.matched = sorted(set(self.matched) | set(classes.tolist()))
        matched = torch.tensor(self.matched)
        k, m, d = features.shape
        train_x = features[matched].reshape(-1, d)
        train_y = matched.repeat_interleave(m)
        gr = self.global_round(server_round)
        w0, b0 = linear_init(k, d, [self.cfg.seed, _CLASSIFIER_TAG, gr])
        gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, _CLASSIFIER_TAG, gr, 1))
        w, b = retrain_classifier(
            train_x,
            train_y,
            torch.from_numpy(w0),
            torch.from_numpy(b0),
            o.retrain_epochs,
            o.retrain_lr,
            o.retrain_batch_size,
            gen,
        )
        self.classifier = {"weight": w.numpy(), "bias": b.numpy()}
        return arrays

    def evaluation_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The FedAvg backbone with the classifier re-trained on the federated features."""
        if not self.matched or WEIGHT not in arrays:
            return arrays  # no class has been matched yet: nothing re-trained
        out = dict(arrays.items())
        for key, name in ((WEIGHT, "weight"), (BIAS, "bias")):
            dtype = np.dtype(arrays[key].dtype)
            out[key] = array_from_numpy(self.classifier[name].astype(dtype))
        return ArrayRecord(out)
