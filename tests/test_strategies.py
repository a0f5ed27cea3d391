"""The server strategies: Flower's, subclassed (one round matches Flower's own aggregation bit for bit),
the mixin's surface (messages, state, kept clients, bytes) and the defining math of fedtail's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower

from fedtail import protocol as P
from fedtail.config import build_config
from fedtail.engines.inprocess import set_server_identity
from fedtail.registry import STRATEGIES
from strategies.base import FedtailStrategy, in_dtypes_of, payload_bytes

FLOWER = {
    "fedavgm": (flower.FedAvgM, {"server_momentum": 0.5, "server_learning_rate": 0.7}),
    "fedadam": (flower.FedAdam, {"eta": 0.05}),
    "fedyogi": (flower.FedYogi, {"eta": 0.05}),
    "fedadagrad": (flower.FedAdagrad, {"eta": 0.05}),
    "fedprox": (flower.FedProx, {"proximal_mu": 0.3}),
    "fedmedian": (flower.FedMedian, {}),
    "fedtrimmedavg": (flower.FedTrimmedAvg, {"beta": 0.2}),
    "krum": (flower.Krum, {"num_malicious_nodes": 1}),
    "multikrum": (flower.MultiKrum, {"num_malicious_nodes": 1, "num_nodes_to_select": 3}),
    "bulyan": (flower.Bulyan, {"num_malicious_nodes": 1}),
}
N = 7  # clients: Bulyan with f = 1 needs 4f + 3


@pytest.fixture(autouse=True)
def _server_identity() -> None:
    """Messages need a run id, as inside a ServerApp."""
    set_server_identity()


class NodesOnly:
    """The part of a Grid that Flower's ``configure_train`` reads."""

    def get_node_ids(self) -> list[int]:
        return [100 + i for i in range(N)]


def _model(value: float) -> ArrayRecord:
    rng = np.random.default_rng(int(value * 1000) % 2**32)
    return ArrayRecord(
        {
            "w": Array((rng.normal(size=(3, 4)) + value).astype(np.float32)),
            "b": Array(np.full(4, value, np.float32)),
        }
    )


def _reply(pid: int, value: float, n: int, extra: dict | None = None) -> Message:
    set_server_identity()
    ins = Message(
        RecordDict({"config": ConfigRecord()}), dst_node_id=100 + pid, message_type=MessageType.TRAIN
    )
    ins.metadata.__dict__["_message_id"] = f"m{pid}-{value}"
    content = RecordDict(
        {
            P.ARRAYS: _model(value),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.TRAIN_LOSS: float(pid)}),
            P.INFO: ConfigRecord({P.PARTITION_ID: pid}),
            **(extra or {}),
        }
    )
    return Message(content, reply_to=ins)


def _replies(round_: int) -> list[Message]:
    """Seven updates, one of them far off (an attacker's)."""
    out = [_reply(p, 0.1 * p + 0.01 * round_, 10 + 5 * p) for p in range(N - 1)]
    return [*out, _reply(N - 1, 50.0 + round_, 12)]


def _config(name: str, options: dict, **overrides):
    return build_config(
        {
            "federation": {"num_clients": N, "fraction_train": 1.0},
            "strategy": {"name": name, "options": options},
            **overrides,
        }
    )


def _ours(name: str, options: dict) -> FedtailStrategy:
    return STRATEGIES.get(name).from_config(_config(name, options), {i: 100 + i for i in range(N)})


def _theirs(name: str) -> flower.FedAvg:
    klass, options = FLOWER[name]
    return klass(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=N, min_available_nodes=N, **options
    )


def _same(a: ArrayRecord | None, b: ArrayRecord | None) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        assert list(a.keys()) == list(b.keys())
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), strict=True)


def test_every_flower_strategy_is_registered_and_subclassed() -> None:
    for name, (klass, _) in FLOWER.items():
        strategy = STRATEGIES.get(name)
        assert issubclass(strategy, klass) and issubclass(strategy, FedtailStrategy), name


@pytest.mark.parametrize("name", sorted(FLOWER))
def test_two_rounds_match_flowers_own_strategy_bit_for_bit(name: str) -> None:
    """Flower's configure_train runs (FedProx's mu reaches the message, FedOpt and FedAvgM remember the
    model they sent), and what Flower's aggregation computes from the same replies is what ours returns;
    the second round exercises the momentum and moments."""
    ours, theirs = _ours(name, FLOWER[name][1]), _theirs(name)
    arrays_ours = arrays_theirs = _model(0.0)
    for round_ in (1, 2):
        messages = list(ours.configure_train(round_, arrays_ours, ConfigRecord(), NodesOnly()))
        list(theirs.configure_train(round_, arrays_theirs, ConfigRecord(), NodesOnly()))
        assert sorted(m.metadata.dst_node_id for m in messages) == [100 + i for i in range(N)]
        if name == "fedprox":
            assert messages[0].content[P.CONFIG]["proximal-mu"] == 0.3
        arrays_ours, _ = ours.aggregate_train(round_, _replies(round_))
        arrays_theirs, _ = theirs.aggregate_train(round_, _replies(round_))
        arrays_theirs = in_dtypes_of(arrays_theirs, _model(0.0))  # Flower's FedAdam returns float64
        _same(arrays_ours, arrays_theirs)


def test_the_global_model_keeps_its_dtype() -> None:
    """Flower's FedAdam alone turns a float32 model into float64 (NumPy 2 promotes by its float64 step
    size); the model fedtail sends on stays float32."""
    theirs = _theirs("fedadam")
    list(theirs.configure_train(1, _model(0.0), ConfigRecord(), NodesOnly()))
    assert theirs.aggregate_train(1, _replies(1))[0]["w"].dtype == "float64"
    ours = _ours("fedadam", FLOWER["fedadam"][1])
    list(ours.configure_train(1, _model(0.0), ConfigRecord(), NodesOnly()))
    assert ours.aggregate_train(1, _replies(1))[0]["w"].dtype == "float32"


def test_adaptive_optimisers_count_steps_over_the_whole_run() -> None:
    """Task 2's first round is global round 6 of a 5-rounds-per-task run: FedAdam's bias correction is
    that of step 6, not of a restarted step 1."""
    ours, theirs = _ours("fedadam", FLOWER["fedadam"][1]), _theirs("fedadam")
    ours.round_offset = 5
    list(ours.configure_train(1, _model(0.0), ConfigRecord(), NodesOnly()))
    list(theirs.configure_train(6, _model(0.0), ConfigRecord(), NodesOnly()))
    expected = in_dtypes_of(theirs.aggregate_train(6, _replies(1))[0], _model(0.0))
    _same(ours.aggregate_train(1, _replies(1))[0], expected)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "scaffold"])
def test_state_round_trips_so_a_resumed_strategy_continues_exactly(name: str) -> None:
    options = FLOWER.get(name, (None, {}))[1]
    straight = _ours(name, options)
    resumed = _ours(name, options)
    arrays = _model(0.0)

    def one_round(strategy: FedtailStrategy, round_: int, arrays: ArrayRecord) -> ArrayRecord:
        list(strategy.configure_train(round_, arrays, ConfigRecord(), NodesOnly()))
        replies = _replies(round_)
        if name == "scaffold":  # each client's Delta c_i
            for msg in replies:
                msg.content["scaffold-delta-c"] = _model(float(msg.content[P.INFO][P.PARTITION_ID]))
        return strategy.aggregate_train(round_, replies)[0]

    a1 = one_round(straight, 1, arrays)
    one_round(resumed, 1, arrays)
    reloaded = _ours(name, options)
    reloaded.load_state_dict(resumed.state_dict())
    _same(one_round(straight, 2, a1), one_round(reloaded, 2, a1))
    assert straight.STATE and all(key in straight.state_dict() for key in straight.STATE)


def test_krum_keeps_the_update_closest_to_the_others_and_says_which() -> None:
    strategy = _ours("krum", {"num_malicious_nodes": 1})
    list(strategy.configure_train(1, _model(0.0), ConfigRecord(), NodesOnly()))
    arrays, _ = strategy.aggregate_train(1, _replies(1))
    kept = [int(p) for p in strategy.last_counts.kept_clients.split()]
    assert strategy.last_counts.num_clients == 1 and kept != [N - 1]
    _same(arrays, _replies(1)[kept[0]].content[P.ARRAYS])


def test_bytes_down_and_up_sum_the_array_payloads_over_clients() -> None:
    strategy = _ours("fedavg", {})
    model = _model(0.0)
    list(strategy.configure_train(1, model, ConfigRecord(), NodesOnly()))
    strategy.aggregate_train(1, _replies(1))
    size = payload_bytes(RecordDict({P.ARRAYS: model}))
    assert strategy.last_counts.bytes_down == N * size
    assert strategy.last_counts.bytes_up == N * size
    assert strategy.last_counts.kept_clients == " ".join(str(p) for p in range(N))


def test_scaffold_sends_its_variate_and_takes_the_deltas_out_before_aggregating() -> None:
    strategy = _ours("scaffold", {})
    model = _model(0.0)
    list(strategy.configure_train(1, model, ConfigRecord(), NodesOnly()))
    replies = _replies(1)
    for msg in replies:
        msg.content["scaffold-delta-c"] = _model(1.0)
    strategy.aggregate_train(1, replies)
    messages = list(strategy.configure_train(2, model, ConfigRecord(), NodesOnly()))
    sent = messages[0].content["scaffold-c"]
    # c = 0 + (1/N) * N * delta: every client sent the same delta
    for key in ("w", "b"):
        np.testing.assert_allclose(sent[key].numpy(), _model(1.0)[key].numpy(), rtol=1e-6)
    size = payload_bytes(RecordDict({P.ARRAYS: model}))
    assert strategy.last_counts.bytes_up == 2 * N * size  # the update and the delta


def test_scaffold_option_two_and_server_variate_on_a_tiny_case() -> None:
    from clients.terms.scaffold import option_two
    from strategies.scaffold import server_variate

    c_i, c = {"w": np.array([1.0, 0.0])}, {"w": np.array([0.5, 0.5])}
    x, y = {"w": np.array([2.0, 2.0])}, {"w": np.array([1.0, 3.0])}
    new = option_two(c_i, c, x, y, steps=4, lr=0.25)  # c_i - c + (x - y) / (K eta)
    np.testing.assert_allclose(new["w"], [1.0 - 0.5 + 1.0, 0.0 - 0.5 - 1.0])
    out = server_variate(c, [{"w": np.array([2.0, 4.0])}, {"w": np.array([2.0, 0.0])}], n=4)
    np.testing.assert_allclose(out["w"], [0.5 + 1.0, 0.5 + 1.0])


def test_fedlc_and_fedrs_transform_the_logits_as_their_papers_say() -> None:
    from clients.local import HIDDEN_LOGIT
    from clients.terms.calibration import fedlc_shift, fedrs_scale

    counts = np.array([16, 1, 0])
    np.testing.assert_allclose(fedlc_shift(counts, 2.0)[:2], [2.0 * 16**-0.25, 2.0])
    assert fedlc_shift(counts, 2.0)[2] == -HIDDEN_LOGIT
    np.testing.assert_array_equal(fedrs_scale(counts, 0.3), [1.0, 1.0, 0.3])


def test_strategy_refusals_name_both_settings() -> None:
    from fedtail.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match=r"scaffold.*train.optimizer='adam'"):
        _config("scaffold", {}, train={"optimizer": "adam"})
    with pytest.raises((ValueError, ConfigError), match=r"bulyan.*at least 11 updates"):
        _config("bulyan", {"num_malicious_nodes": 2})
    with pytest.raises((ValueError, ConfigError), match="num_nodes_to_select=9 exceeds"):
        _config("multikrum", {"num_nodes_to_select": 9})


def test_fedprox_term_is_half_mu_times_the_squared_distance() -> None:
    from clients.terms.proximal import proximal_term

    w = {"a": torch.tensor([1.0, 2.0], requires_grad=True)}
    anchor = {"a": torch.tensor([0.0, 0.0])}
    loss = proximal_term(w, anchor, mu=0.5)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.25 * 5.0)
    np.testing.assert_allclose(w["a"].grad.numpy(), [0.5, 1.0])  # mu (w - w0)
