"""CReFF (strategies.creff, clients.terms.creff): the classifier gradients, the matching target and loss,
the re-training, and what the server evaluates versus what the clients train."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from clients.local import LocalContext, train_local
from clients.terms.creff import CLASSIFIER, GRADIENTS, classifier_gradients
from fedtail import protocol as P
from fedtail.config import ConfigError, build_config
from fedtail.engines.inprocess import set_server_identity
from fedtail.models import array_from_numpy, build_model
from strategies.base import ClientReply
from strategies.creff import (
    CReFFStrategy,
    class_gradients,
    distance_wb,
    match_features,
    retrain_classifier,
)
from tests.term_context import term_context

TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32 kernels differ between machines in the last bits


def _official_distance_wb(gwr: torch.Tensor, gws: torch.Tensor) -> torch.Tensor:
    """shangxinyi/CReFF-FL, Dataset/Gradient_matching_loss.py, for a linear layer's weight and bias."""
    if gwr.dim() == 1:
        gwr, gws = gwr.reshape(1, -1), gws.reshape(1, -1)
    return torch.sum(
        1 - torch.sum(gwr * gws, dim=-1) / (torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1) + 0.000001)
    )


def test_closed_form_classifier_gradients_equal_autograds() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 5, 4, generator=gen)
    weight, bias = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    labels = torch.tensor([0, 4, 5])
    gw, gb = classifier_gradients(feats, labels, weight, bias)
    for g in range(3):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(feats[g] @ w.T + b, labels[g].repeat(5))
        ew, eb = torch.autograd.grad(loss, [w, b])
        torch.testing.assert_close(gw[g], ew, **TOL)
        torch.testing.assert_close(gb[g], eb, **TOL)


def test_matching_distance_is_the_official_distance_wb() -> None:
    gen = torch.Generator().manual_seed(1)
    real, syn = torch.randn(2, 6, 4, generator=gen), torch.randn(2, 6, 4, generator=gen)
    ours = distance_wb(real, syn)
    for g in range(2):
        torch.testing.assert_close(ours[g], _official_distance_wb(real[g], syn[g]), **TOL)
    rb, sb = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    torch.testing.assert_close(distance_wb(rb[None], sb[None]), _official_distance_wb(rb, sb), **TOL)


def _record(classes: list[int], value: float, k: int = 3, d: int = 2) -> ArrayRecord:
    m = len(classes)
    return ArrayRecord(
        {
            "classes": array_from_numpy(np.array(classes, dtype=np.int64)),
            "weight": array_from_numpy(np.full((m, k, d), value, np.float32)),
            "bias": array_from_numpy(np.full((m, k), value, np.float32)),
        }
    )


def test_matching_target_is_the_unweighted_mean_over_the_clients_holding_the_class() -> None:
    classes, gw, gb = class_gradients([_record([0, 2], 1.0), _record([2], 4.0), _record([0], 3.0)])
    assert classes.tolist() == [0, 2]
    np.testing.assert_allclose(gw[:, 0, 0].numpy(), [2.0, 2.5])  # (1 + 3) / 2, (1 + 4) / 2
    np.testing.assert_allclose(gb[:, 0].numpy(), [2.0, 2.5])
    assert class_gradients([]) is None


def test_matching_moves_the_matched_classes_towards_their_real_gradient_only() -> None:
    gen = torch.Generator().manual_seed(2)
    k, m, d = 3, 8, 4
    weight, bias = torch.randn(k, d, generator=gen), torch.randn(k, generator=gen)
    real_feats = torch.randn(1, 16, d, generator=gen) + 2.0
    real_w, real_b = classifier_gradients(real_feats, torch.tensor([1]), weight, bias)
    features = torch.randn(k, m, d, generator=gen)
    classes = torch.tensor([1])

    def loss(f: torch.Tensor) -> float:
        gw, gb = classifier_gradients(f[classes], classes, weight, bias)
        return float((distance_wb(real_w, gw) + distance_wb(real_b[:, None], gb[:, None])).sum())

    matched = match_features(features, classes, real_w, real_b, weight, bias, steps=200, lr=0.1)
    assert loss(matched) < 0.2 * loss(features)
    torch.testing.assert_close(matched[[0, 2]], features[[0, 2]], rtol=0, atol=0)
    same = match_features(features, classes, real_w, real_b, weight, bias, steps=0, lr=0.1)
    torch.testing.assert_close(same, features, rtol=0, atol=0)


def test_retraining_is_plain_sgd_on_the_mean_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(3)
    feats, labels = torch.randn(20, 4, generator=gen), torch.arange(20) % 3
    w0, b0 = torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen)
    w, b = retrain_classifier(feats, labels, w0, b0, 4, 0.1, 6, torch.Generator().manual_seed(9))
    layer = torch.nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(w0)
        layer.bias.copy_(b0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    order_gen = torch.Generator().manual_seed(9)
    for _ in range(4):
        order = torch.randperm(20, generator=order_gen)
        for start in range(0, 20, 6):
            idx = order[start : start + 6]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(layer(feats[idx]), labels[idx]).backward()
            opt.step()
    torch.testing.assert_close(w, layer.weight.detach(), **TOL)
    torch.testing.assert_close(b, layer.bias.detach(), **TOL)


def _ctx(message: RecordDict, options: dict) -> tuple[LocalContext, torch.nn.Module]:
    ctx = term_context("creff", options, message, epochs=1, batch_size=8)
    return ctx, ctx.global_model_fn()


def test_the_client_sends_each_held_class_gradient_of_the_received_classifier_on_received_features() -> None:
    """With one draw of at least the class's size, a class's gradient is the full one over its samples,
    on the received model's features (evaluation mode) and the server's classifier, not the model's."""
    rng = np.random.default_rng(0)
    y = np.repeat([1, 4], [6, 3]).astype(np.int64)
    x = rng.normal(size=(9, 3)).astype(np.float32)
    weight = rng.normal(size=(10, 8)).astype(np.float32)
    bias = rng.normal(size=10).astype(np.float32)
    message = RecordDict(
        {
            P.CONFIG: ConfigRecord(),
            CLASSIFIER: ArrayRecord({"weight": array_from_numpy(weight), "bias": array_from_numpy(bias)}),
        }
    )
    ctx, received = _ctx(message, {"gradient_repeats": 1, "real_batch_size": 64})
    train_local(ctx, x, y)
    sent = ctx.reply[GRADIENTS]
    assert sent["classes"].numpy().tolist() == [1, 4]
    with torch.no_grad():
        feats = received.eval().features(torch.from_numpy(x))
    for i, c in enumerate([1, 4]):
        own = feats[torch.from_numpy(y == c)][None]
        w, b = torch.from_numpy(weight), torch.from_numpy(bias)
        gw, gb = classifier_gradients(own, torch.tensor([c]), w, b)
        np.testing.assert_allclose(sent["weight"].numpy()[i], gw[0].numpy(), **TOL)
        np.testing.assert_allclose(sent["bias"].numpy()[i], gb[0].numpy(), **TOL)


def test_the_server_evaluates_its_retrained_classifier_and_sends_the_fedavg_model() -> None:
    set_server_identity()
    cfg = build_config(
        {
            "federation": {"num_clients": 2, "fraction_train": 1.0},
            "strategy": {"name": "creff", "options": {"match_steps": 5, "retrain_epochs": 2}},
        }
    )
    strategy = CReFFStrategy.from_config(cfg, {0: 100, 1: 101})
    model = build_model("mlp", (3,), 10, 8, 0)
    arrays = ArrayRecord({k: array_from_numpy(v.detach().numpy()) for k, v in model.state_dict().items()})

    class Nodes:
        def get_node_ids(self) -> list[int]:
            return [100, 101]

    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), Nodes()))
    sent = messages[0].content[CLASSIFIER]
    assert sent["weight"].numpy().shape == (10, 8)
    replies = [ClientReply(p, 5.0, {}, {GRADIENTS: _record([p, 2], 0.5 + p, k=10, d=8)}) for p in (0, 1)]
    out = strategy.server_update(1, arrays, replies)
    assert out is arrays  # the clients keep training the FedAvg model
    assert strategy.matched == [0, 1, 2]
    scored = strategy.evaluation_arrays(arrays)
    np.testing.assert_array_equal(scored["classifier.weight"].numpy(), strategy.classifier["weight"])
    assert not np.array_equal(scored["classifier.weight"].numpy(), arrays["classifier.weight"].numpy())
    for key in arrays:
        if not key.startswith("classifier."):
            np.testing.assert_array_equal(scored[key].numpy(), arrays[key].numpy())
    resumed = CReFFStrategy.from_config(cfg, {0: 100, 1: 101})
    resumed.load_state_dict(strategy.state_dict())
    np.testing.assert_array_equal(resumed.federated_features, strategy.federated_features)
    assert resumed.matched == strategy.matched


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"model": {"classifier": "cosine"}}, "model.classifier='cosine'"),
        ({"crt": {"rounds": 2}}, "crt.rounds=2"),
        ({"continual": {"method": "wa"}}, "continual.method='wa'"),
        ({"continual": {"method": "icarl"}}, "continual.method='icarl'"),
    ],
)
def test_creff_refuses_what_would_replace_its_classifier_naming_both(overrides: dict, named: str) -> None:
    with pytest.raises((ValueError, ConfigError), match=rf"strategy.name='creff'.*{named}"):
        build_config({"strategy": {"name": "creff"}, **overrides})
