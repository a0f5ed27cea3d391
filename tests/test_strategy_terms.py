"""Strategies' client parts inside the local training loop (`clients.terms`): each composes with the
objective in the same forward pass and does what its paper's update does."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from clients.local import LocalContext, train_local
from clients.terms.scaffold import CLIENT_VARIATE, DELTA, SERVER_VARIATE
from fedtail import protocol as P
from fedtail.models import array_from_numpy
from tests.term_context import term_context

RNG = np.random.default_rng(0)
Y = np.repeat([0, 1, 2], [20, 8, 4]).astype(np.int64)
X = (RNG.normal(size=(32, 3)) + np.eye(3)[Y] * 2).astype(np.float32)


def _ctx(
    strategy: str, options: dict | None = None, message: RecordDict | None = None, **train
) -> LocalContext:
    train = {"epochs": 3, "batch_size": 8, "lr": 0.05, **train}
    return term_context(strategy, options, message, class_counts=np.bincount(Y, minlength=10), **train)


def _params(ctx: LocalContext) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in ctx.model.state_dict().items()}


def _trained(ctx: LocalContext) -> dict[str, np.ndarray]:
    train_local(ctx, X, Y)
    return _params(ctx)


def test_scaffold_with_zero_variates_is_local_sgd_and_keeps_option_two_variate() -> None:
    """Round one (c = c_i = 0): the steps are plain SGD's, bit for bit; the client keeps
    c_i+ = (x - y) / (K eta_eff) and sends it as Delta c_i."""
    plain, ctx = _ctx("fedavg"), _ctx("scaffold")
    x0 = _params(ctx)
    theirs, ours = _trained(plain), _trained(ctx)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])
    steps = 3 * int(np.ceil(len(Y) / 8))
    eta = 0.05 / (1 - 0.9)  # train.lr / (1 - momentum)
    c_i = ctx.state[CLIENT_VARIATE]
    for key, value in c_i.items():
        np.testing.assert_allclose(value.numpy(), (x0[key] - ours[key]) / (steps * eta), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(ctx.reply[DELTA][key].numpy(), value.numpy())


def test_scaffold_corrects_each_gradient_by_c_minus_c_i() -> None:
    """One full-batch step of plain SGD (no momentum, no clip): y = x - lr (g + c - c_i)."""
    base = {"momentum": 0.0, "max_grad_norm": None, "epochs": 1, "batch_size": 64}
    plain = _ctx("fedavg", **base)
    x0 = _params(plain)
    g_step = {k: x0[k] - v for k, v in _trained(plain).items()}  # lr * g
    c = {k: np.full(v.shape, 0.3, np.float32) for k, v in x0.items()}
    c_i = {k: np.full(v.shape, 0.1, np.float32) for k, v in x0.items()}
    message = RecordDict(
        {
            P.CONFIG: ConfigRecord(),
            SERVER_VARIATE: ArrayRecord({k: array_from_numpy(v) for k, v in c.items()}),
        }
    )
    ctx = _ctx("scaffold", message=message, **base)
    ctx.state[CLIENT_VARIATE] = ArrayRecord({k: array_from_numpy(v) for k, v in c_i.items()})
    for key, value in _trained(ctx).items():
        np.testing.assert_allclose(value, x0[key] - g_step[key] - 0.05 * 0.2, rtol=1e-5, atol=1e-6)


def test_fedlc_and_restricted_fedrs_leave_a_missing_class_untouched() -> None:
    """Class 5 has no sample: FedLC's n^(-1/4) shift (infinite at n = 0) and FedRS with alpha 0 take its
    logit out of the objective, so its classifier row gets no gradient; plain CE pushes it down."""
    for strategy, options, untouched in (
        ("fedavg", {}, False),
        ("fedlc", {}, True),
        ("fedrs", {"alpha": 0.0}, True),
    ):
        ctx = _ctx(strategy, options, momentum=0.0)
        before = _params(ctx)
        after = _trained(ctx)
        same = np.array_equal(after["classifier.weight"][5], before["classifier.weight"][5])
        assert same == untouched, strategy


def test_fedrs_at_alpha_one_is_fedavg() -> None:
    theirs, ours = _trained(_ctx("fedavg")), _trained(_ctx("fedrs", {"alpha": 1.0}))
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])


def test_fedprox_reads_mu_from_the_message_and_pulls_towards_the_global_model() -> None:
    def distance(mu: float | None) -> float:
        message = RecordDict({P.CONFIG: ConfigRecord({} if mu is None else {"proximal-mu": mu})})
        ctx = _ctx("fedavg" if mu is None else "fedprox", message=message)
        x0 = _params(ctx)
        return sum(float(((v - x0[k]) ** 2).sum()) for k, v in _trained(ctx).items())

    assert distance(10.0) < 0.5 * distance(None)
