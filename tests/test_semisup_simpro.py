"""SimPro (`clients.semisup.simpro`): its logit adjustments and M-step on tiny cases, the server part that
estimates the federation's priors from the clients' summed statistics, and its config rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from clients.local import train_local
from clients.semisup import UnlabeledStep, View
from clients.semisup.simpro import (
    PRIORS,
    SUMS,
    SimPro,
    SimProOptions,
    SimProServer,
    adjustment,
    updated_priors,
)
from clients.terms import Step
from fedtail.config import ConfigError, build_config
from fedtail.engines.inprocess import set_server_identity
from fedtail.models import array_from_numpy, array_to_numpy, build_model
from fedtail.registry import STRATEGIES
from strategies.base import summed_records
from tests.test_semisup import _context


def test_adjustment_is_tau_log_prior() -> None:
    prior = torch.tensor([0.5, 0.25, 0.25])
    torch.testing.assert_close(adjustment(prior, 2.0), torch.log(prior**2 + 1e-12))
    assert adjustment(prior, 0.0).abs().max() < 1e-6  # tau 0: no adjustment


def test_m_step_moves_both_priors_by_ema() -> None:
    """pi_u <- m pi_u + (1 - m) d / (sum d + 1); pi_all <- m pi_all + (1 - m) (n_l + d) / sum."""
    used, labeled = np.array([3.0, 1.0]), np.array([2.0, 2.0])
    pi_u, pi_all = updated_priors(np.array([0.5, 0.5]), np.array([0.5, 0.5]), used, labeled, 0.9)
    assert pi_u.tolist() == pytest.approx([0.9 * 0.5 + 0.1 * 3 / 5, 0.9 * 0.5 + 0.1 * 1 / 5])
    assert pi_all.tolist() == pytest.approx([0.9 * 0.5 + 0.1 * 5 / 8, 0.9 * 0.5 + 0.1 * 3 / 8])


def _method(message: RecordDict | None = None) -> tuple[SimPro, object]:
    ctx, _ = _context("simpro", 4, 6)
    ctx.class_prior = np.array([0.4, 0.1, 0.1, 0.1, 0.1, 0.04, 0.04, 0.04, 0.04, 0.04])
    if message is not None:
        ctx.message = message
    return SimPro(ctx, SimProOptions()), ctx


def test_before_any_estimate_pi_u_is_uniform_and_pi_all_the_labeled_prior() -> None:
    method, ctx = _method()
    torch.testing.assert_close(method.adj_u, adjustment(torch.full((10,), 0.1), 2.0))
    prior = torch.as_tensor(ctx.class_prior, dtype=torch.float32)
    torch.testing.assert_close(method.adj, adjustment(prior / prior.sum(), 2.0))
    logits = torch.zeros(2, 10)
    torch.testing.assert_close(method.adjust_logits(logits), logits + method.adj)


def test_the_unlabeled_loss_is_thresholded_soft_ce_on_adjusted_logits() -> None:
    """q = softmax(f(weak) + tau log pi_u), used when max q >= threshold; L_u = mean 1(.) CE_soft(
    f(strong) + tau log pi_all, q), masked rows counting as zeros."""
    pi_u = np.full(10, 0.1)
    pi_all = np.linspace(1, 2, 10) / np.linspace(1, 2, 10).sum()
    record = ArrayRecord({"pi_u": array_from_numpy(pi_u), "pi_all": array_from_numpy(pi_all)})
    method, _ = _method(RecordDict({PRIORS: record}))
    weak = torch.zeros(2, 10)
    weak[0, 3] = 10.0  # confident class 3; row 1 uniform: unused
    strong = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    labeled = Step(torch.zeros(3, 64), torch.tensor([0, 0, 1]), torch.zeros(3, 4), torch.zeros(3, 10))
    views = {"weak": View(weak, torch.zeros(2, 4), weak), "strong": View(strong, torch.zeros(2, 4), strong)}
    out = method.loss(UnlabeledStep(labeled, torch.arange(2), views, 0, 1))
    q = torch.softmax(weak[0] + adjustment(torch.tensor(pi_u, dtype=torch.float32), 2.0), dim=0)
    log_p = torch.log_softmax(strong[0] + adjustment(torch.tensor(pi_all, dtype=torch.float32), 2.0), dim=0)
    assert out.loss.item() == pytest.approx(-(q * log_p).sum().item() / 2, rel=1e-5)
    assert out.mask.tolist() == [1.0, 0.0] and out.labels[0].item() == 3
    torch.testing.assert_close(method.used.float(), q)  # the used soft pseudo-label mass
    assert method.labeled.tolist()[:2] == [2.0, 1.0]


def test_the_server_part_updates_priors_from_summed_client_statistics() -> None:
    cfg = build_config({"semisup": {"method": "simpro"}, "partition": {"labeled_fraction": 0.5}})
    server = SimProServer(cfg, SimProOptions())
    assert server.records() == {}  # nothing estimated yet: clients use their defaults

    def reply(used: list[float], labeled: list[float]) -> dict:
        arrays = {"used": np.array(used), "labeled": np.array(labeled)}
        return {SUMS: ArrayRecord({k: array_from_numpy(v) for k, v in arrays.items()})}

    sums = summed_records([reply([1, 0], [3, 1]), reply([2, 1], [1, 3])])  # d = (3, 1), n_l = (4, 4)
    server.update(sums, [])
    expected_u, expected_all = updated_priors(
        np.array([0.5, 0.5]), np.array([0.5, 0.5]), np.array([3.0, 1.0]), np.array([4.0, 4.0]), 0.9
    )
    assert server.state["pi_u"].tolist() == pytest.approx(expected_u.tolist())
    assert server.state["pi_all"].tolist() == pytest.approx(expected_all.tolist())
    sent = server.records()[PRIORS]
    assert array_to_numpy(sent["pi_u"]).tolist() == pytest.approx(expected_u.tolist())


def test_a_client_round_reports_its_statistics_for_the_server() -> None:
    ctx, data = _context("simpro", 20, 60)
    loss, _ = train_local(ctx, data.x, data.y)
    assert math.isfinite(loss)
    sums = {k: array_to_numpy(v) for k, v in ctx.reply[SUMS].items()}
    steps = 2 * math.ceil(20 / 8)
    assert sums["labeled"].sum() == 2 * 20 and len(sums["used"]) == 10
    assert 0 <= sums["used"].sum() <= steps * 56


def test_simpro_refuses_a_second_logit_adjustment() -> None:
    with pytest.raises(ConfigError, match="train.objective"):
        build_config(
            {
                "semisup": {"method": "simpro"},
                "partition": {"labeled_fraction": 0.5},
                "train": {"objective": "balanced_softmax"},
            }
        )


def test_every_strategy_sends_the_server_parts_records_and_checkpoints_its_state() -> None:
    """The hook is the strategy base's: any strategy (FedAvg, SCAFFOLD) carries the estimates."""
    from strategies.base import SEMISUP_STATE

    set_server_identity()

    class Nodes:
        def get_node_ids(self) -> list[int]:
            return [100, 101]

    for name in ("fedavg", "scaffold"):
        cfg = build_config(
            {
                "semisup": {"method": "simpro"},
                "partition": {"labeled_fraction": 0.5},
                "federation": {"num_clients": 2, "fraction_train": 1.0},
                "strategy": {"name": name},
            }
        )
        strategy = STRATEGIES.get(name).from_config(cfg, {0: 100, 1: 101})
        model = build_model("mlp", (3,), 10, 8, 0)
        arrays = ArrayRecord({k: array_from_numpy(v.detach().numpy()) for k, v in model.state_dict().items()})
        assert all(
            PRIORS not in m.content for m in strategy.configure_train(1, arrays, ConfigRecord(), Nodes())
        )
        used, labeled = np.arange(10, dtype=np.float64), np.ones(10)
        strategy.semisup_server.update({SUMS: {"used": used, "labeled": labeled}}, [])
        messages = list(strategy.configure_train(2, arrays, ConfigRecord(), Nodes()))
        assert all(PRIORS in m.content for m in messages)
        state = strategy.state_dict()
        assert SEMISUP_STATE in state
        resumed = STRATEGIES.get(name).from_config(cfg, {0: 100, 1: 101})
        resumed.load_state_dict(state)
        np.testing.assert_array_equal(
            resumed.semisup_server.state["pi_u"], strategy.semisup_server.state["pi_u"]
        )
