"""FedBR (strategies.fedbr, clients.terms.fedbr): the contrastive ratio and the uniform cross-entropy, one
local step of both components replayed by hand, the first round's means and the server's pseudo-data."""

from __future__ import annotations

import copy

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from clients.local import LocalContext, train_local
from clients.terms.fedbr import (
    MEANS,
    PROJECTOR,
    PSEUDO,
    contrastive_log_ratio,
    mean_samples,
    projector,
    soft_cross_entropy,
)
from fedtail import protocol as P
from fedtail.config import build_config
from fedtail.engines.inprocess import set_server_identity
from fedtail.models import array_from_numpy, build_model
from strategies.base import ClientReply
from strategies.fedbr import FedBRStrategy, pick_pseudo_data
from tests.term_context import term_context

TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32 kernels differ between machines in the last bits
RNG = np.random.default_rng(0)
Y = np.repeat([0, 1, 2], [6, 3, 3]).astype(np.int64)
X = RNG.normal(size=(12, 3)).astype(np.float32)


def test_contrastive_ratio_is_the_official_expression() -> None:
    gen = torch.Generator().manual_seed(0)
    e1, e2, e3 = (torch.randn(5, 4, generator=gen) for _ in range(3))
    s12, s13 = torch.cosine_similarity(e1, e2, dim=1), torch.cosine_similarity(e1, e3, dim=1)
    official = torch.log(torch.exp(s12 * 2.0) / (torch.exp(s12 * 2.0) + torch.exp(s13 * 3.0)))
    torch.testing.assert_close(contrastive_log_ratio(e1, e2, e3, 2.0, 3.0), official, **TOL)
    logits = torch.randn(5, 3, generator=gen)
    uniform = torch.full((3,), 1 / 3)
    expected = -(torch.log_softmax(logits, 1) * uniform).sum(1).mean()
    torch.testing.assert_close(soft_cross_entropy(logits, uniform), expected, **TOL)


def test_pseudo_samples_are_means_of_random_samples() -> None:
    x = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    rng, same = np.random.default_rng(3), np.random.default_rng(3)
    means = mean_samples(x, 4, 5, rng)
    picks = same.integers(0, 10, size=(4, 5))
    np.testing.assert_allclose(means, x[picks].mean(axis=1))
    chosen = pick_pseudo_data([np.zeros((3, 2)), np.ones((3, 2))], 50, np.random.default_rng(0))
    assert chosen.shape == (50, 2) and 0 < chosen[:, 0].sum() < 50  # drawn from both clients


def _ctx(message: RecordDict, strategy: str = "fedbr") -> LocalContext:
    return term_context(
        strategy,
        message=message,
        sections={"tasks": {"classes_per_task": None}},
        global_round=2,
        epochs=1,
        batch_size=64,
        momentum=0.0,
        max_grad_norm=None,
        lr=0.1,
    )


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_the_first_round_is_plain_local_training_and_sends_means() -> None:
    plain = _ctx(RecordDict({P.CONFIG: ConfigRecord()}), strategy="fedavg")
    ours = _ctx(RecordDict({P.CONFIG: ConfigRecord()}))
    train_local(plain, X, Y)
    train_local(ours, X, Y)
    for key, value in _state(plain.model).items():
        np.testing.assert_array_equal(_state(ours.model)[key], value)
    assert ours.reply[MEANS]["x"].numpy().shape == (32, 3)


def test_one_local_step_is_both_components_replayed_by_hand() -> None:
    """One full-batch plain-SGD step: the projection layer steps on gamma * mean(l) first, then the model
    steps on CE + mu * (-mean(l)) + lam * CE(h(phi(x_p)), uniform) through the updated projection."""
    lr, mu, lam, gamma = 0.1, 0.5, 1.0, 1.0
    x_p = np.repeat(RNG.normal(size=(1, 3)), len(X), axis=0).astype(np.float32)  # pairs in any order
    torch.manual_seed(5)
    proj = projector(8)
    message = RecordDict(
        {
            P.CONFIG: ConfigRecord(),
            PSEUDO: ArrayRecord({"x": array_from_numpy(x_p)}),
            PROJECTOR: ArrayRecord({k: array_from_numpy(v.numpy()) for k, v in proj.state_dict().items()}),
        }
    )
    ctx = _ctx(message)
    model, hand_proj = copy.deepcopy(ctx.model), copy.deepcopy(proj)
    train_local(ctx, X, Y)

    xt, yt, xp = torch.from_numpy(X), torch.from_numpy(Y), torch.from_numpy(x_p)
    with torch.no_grad():
        z_g = model.features(xp)
    n = len(xp)
    z_p, z_x = model.features(xp), model.features(xt)
    ratio = contrastive_log_ratio(
        hand_proj(z_p.detach()), hand_proj(z_g), hand_proj(z_x[:n].detach()), 2.0, 2.0
    )
    proj_opt = torch.optim.SGD(hand_proj.parameters(), lr=lr)
    (gamma * ratio.mean()).backward()
    proj_opt.step()
    ratio = contrastive_log_ratio(hand_proj(z_p), hand_proj(z_g), hand_proj(z_x[:n]), 2.0, 2.0)
    loss = (
        torch.nn.functional.cross_entropy(model.classifier(z_x), yt)
        + mu * (-ratio.mean())
        + lam * soft_cross_entropy(model.classifier(z_p), torch.full((10,), 0.1))
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    loss.backward()
    opt.step()
    for key, value in _state(model).items():
        np.testing.assert_allclose(_state(ctx.model)[key], value, **TOL)
    sent = ctx.reply[PROJECTOR]
    for key, value in hand_proj.state_dict().items():
        np.testing.assert_allclose(sent[key].numpy(), value.detach().numpy(), **TOL)


def test_the_server_builds_the_pseudo_data_once_and_averages_the_projection() -> None:
    set_server_identity()
    cfg = build_config(
        {"federation": {"num_clients": 2, "fraction_train": 1.0}, "strategy": {"name": "fedbr"}}
    )
    strategy = FedBRStrategy.from_config(cfg, {0: 100, 1: 101})
    model = build_model("mlp", (3,), 10, 8, 0)
    arrays = ArrayRecord({k: array_from_numpy(v.detach().numpy()) for k, v in model.state_dict().items()})

    class Nodes:
        def get_node_ids(self) -> list[int]:
            return [100, 101]

    first = list(strategy.configure_train(1, arrays, ConfigRecord(), Nodes()))
    assert PSEUDO not in first[0].content and PROJECTOR in first[0].content
    means = [ArrayRecord({"x": array_from_numpy(np.full((32, 3), float(p), np.float32))}) for p in (0, 1)]
    strategy.server_update(1, arrays, [ClientReply(p, 5.0, {}, {MEANS: means[p]}) for p in (0, 1)])
    assert strategy.pseudo_data.shape == (32, 3)
    assert set(np.unique(strategy.pseudo_data)) == {0.0, 1.0}
    pseudo = strategy.pseudo_data.copy()

    second = list(strategy.configure_train(2, arrays, ConfigRecord(), Nodes()))
    np.testing.assert_array_equal(second[1].content[PSEUDO]["x"].numpy(), pseudo)
    sent = second[0].content[PROJECTOR]
    layers = [ArrayRecord({k: array_from_numpy(a.numpy() + p) for k, a in sent.items()}) for p in (1.0, 3.0)]
    replies = [
        ClientReply(p, n, {}, {PROJECTOR: layers[p], MEANS: means[p]}) for p, n in ((0, 1.0), (1, 3.0))
    ]
    strategy.server_update(2, arrays, replies)
    np.testing.assert_array_equal(strategy.pseudo_data, pseudo)  # built once
    for key, a in sent.items():  # FedAvg's weights: (1 * (w + 1) + 3 * (w + 3)) / 4 = w + 2.5
        np.testing.assert_allclose(strategy.projection[key].numpy(), a.numpy() + 2.5, **TOL)
    resumed = FedBRStrategy.from_config(cfg, {0: 100, 1: 101})
    resumed.load_state_dict(strategy.state_dict())
    np.testing.assert_array_equal(resumed.pseudo_data, pseudo)
