"""CReFF's client part (Shang et al., 2022, "Federated Learning on Heterogeneous and Long-Tailed Data
via Classifier Re-Training with Federated Features", IJCAI; official code shangxinyi/CReFF-FL).

Before local training, on the received global model, the client computes for every class c it holds
the gradient of the cross-entropy with respect to the classifier's weight and bias, the real-feature
gradient g_c = grad_{W,b} CE(W f(x) + b, c) over a random batch of at most ``real_batch_size`` of its
samples of class c, averaged over ``gradient_repeats`` draws (the paper's eq. 6; official code
``Local.compute_gradient``: 32 samples, 10 repeats). The features f are the received backbone's in
evaluation mode (batch norm on its running statistics) and the classifier (W, b) is the one the server
re-trained on the federated features in the previous round, sent with the round (round 1: a random
one), as in the official code. The gradients go up with the update; local training is plain.

The official code augments the real batch with differentiable Siamese augmentation (DSA) before the
gradient; fedtail has no augmentation for every modality, so the batch is used as it is.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from clients.continual import ContinualMethod
from clients.local import step_seed
from clients.terms import LossTerm
from fedtail.config import FedtailConfig
from fedtail.models import array_from_numpy, array_to_numpy
from fedtail.registry import CONTINUAL

CLASSIFIER = "creff-classifier"  # train message: the server's re-trained classifier (weight, bias)
GRADIENTS = "creff-gradients"  # train reply: classes, and per class the weight and bias gradients
_SEED_TAG = 0xC4EF


def classifier_gradients(
    features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the mean cross-entropy of a linear classifier, in closed form, per group.

    ``features`` (G, n, d) are G groups of n samples, all of group g labeled ``labels[g]``; ``weight``
    (K, d) and ``bias`` (K,). With P = softmax(F W^T + b) - onehot(label), the mean CE's gradients are
    P^T F / n and the mean of P's rows: (G, K, d) and (G, K). Differentiable in ``features`` (the
    server's gradient matching optimises the features through it); equal to ``torch.autograd.grad``
    of ``cross_entropy`` (tested)."""
    probs = torch.softmax(features @ weight.T + bias, dim=-1)
    onehot = torch.nn.functional.one_hot(labels, weight.shape[0]).to(probs.dtype)
    residual = probs - onehot[:, None, :]
    n = features.shape[1]
    return torch.einsum("gnk,gnd->gkd", residual, features) / n, residual.mean(dim=1)


def _alters_classifier_on_server(method: type[ContinualMethod]) -> bool:
    """Whether the continual method changes the model on the server at the end of a task (WA)."""
    return method.end_task_on_server.__func__ is not ContinualMethod.end_task_on_server.__func__


class CReFFTerm(LossTerm):
    """Per-class real-feature gradients of the received model's re-trained classifier, sent up."""

    @classmethod
    def check_config(cls, cfg: FedtailConfig) -> str | None:
        name = f"strategy.name={cfg.strategy.name!r}"
        if cfg.model.classifier != "linear":
            head = cfg.model.classifier
            return f"{name} re-trains a linear classifier, but model.classifier={head!r}: use linear"
        if cfg.crt.rounds:
            return (
                f"{name} re-trains the classifier on the server every round; crt.rounds={cfg.crt.rounds} "
                "would re-train it again on the clients: set crt.rounds: 0"
            )
        method = CONTINUAL.get(cfg.continual.method)
        if method.statistics_rounds(cfg) or _alters_classifier_on_server(method):
            return (
                f"{name} evaluates its own re-trained classifier, which would replace the classifier "
                f"continual.method={cfg.continual.method!r} builds on the server: use another continual "
                "method or strategy"
            )
        return None

    def begin(self, model: nn.Module, lr: float, x: torch.Tensor, y: torch.Tensor) -> None:
        record = self.ctx.message.get(CLASSIFIER)
        if record is None or len(y) == 0:
            return
        device = self.ctx.device
        weight = torch.from_numpy(array_to_numpy(record["weight"]).copy()).to(device)
        bias = torch.from_numpy(array_to_numpy(record["bias"]).copy()).to(device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            feats = torch.cat([model.features(xb.to(device)) for xb in x.split(4096)])
        model.train(was_training)
        o = self.options
        ctx = self.ctx
        rng = np.random.default_rng(
            step_seed(ctx.job.config.seed, ctx.task, ctx.global_round, ctx.partition_id, _SEED_TAG)
        )
        labels = y.numpy()
        classes = np.unique(labels)
        grads_w, grads_b = [], []
        for c in classes:
            where = np.flatnonzero(labels == c)
            picks = [rng.permutation(where)[: o.real_batch_size] for _ in range(o.gradient_repeats)]
            label = torch.tensor([int(c)], device=device)
            gw = torch.zeros_like(weight)
            gb = torch.zeros_like(bias)
            with torch.no_grad():
                for pick in picks:
                    chosen = feats[torch.from_numpy(pick).to(device)][None]
                    w, b = classifier_gradients(chosen, label, weight, bias)
                    gw += w[0] / len(picks)
                    gb += b[0] / len(picks)
            grads_w.append(gw.cpu().numpy())
            grads_b.append(gb.cpu().numpy())
        self.ctx.reply[GRADIENTS] = ArrayRecord(
            {
                "classes": array_from_numpy(classes.astype(np.int64)),
                "weight": array_from_numpy(np.stack(grads_w)),
                "bias": array_from_numpy(np.stack(grads_b)),
            }
        )
