"""Server-side pieces that need no federation: sampling, update checks, FedAvg's defining average."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtail import protocol as P
from fedtail.config import build_config
from fedtail.engines.inprocess import set_server_identity
from strategies.base import ClientUpdateError, check_update, sample_partitions
from strategies.fedavg import FedAvgStrategy


def test_sampling_is_seeded_by_round_not_by_node_ids() -> None:
    a = sample_partitions(20, 0.25, 1, seed=0, global_round=3)
    assert a == sample_partitions(20, 0.25, 1, seed=0, global_round=3)
    assert len(a) == 5 and a == sorted(set(a)) and all(0 <= p < 20 for p in a)
    assert sample_partitions(20, 0.25, 1, seed=0, global_round=4) != a
    assert len(sample_partitions(20, 0.01, 3, seed=0, global_round=1)) == 3
    assert sample_partitions(4, 1.0, 1, seed=9, global_round=1) == [0, 1, 2, 3]


def _arrays(value: float, shape=(2, 3)) -> ArrayRecord:
    return ArrayRecord(
        {"w": Array(np.full(shape, value, dtype=np.float32)), "b": Array(np.zeros(3, np.float32))}
    )


def test_check_update_rejects_shape_keys_and_nan() -> None:
    ref = _arrays(0.0)
    assert check_update(0, _arrays(1.0), ref) is None
    assert "shape" in check_update(1, _arrays(1.0, (3, 2)), ref)
    assert "NaN" in check_update(2, _arrays(np.nan), ref)
    assert "missing ['b']" in check_update(3, ArrayRecord({"w": Array(np.zeros((2, 3), np.float32))}), ref)


def _reply(pid: int, value: float, n: int) -> Message:
    set_server_identity()
    ins = Message(
        RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=100 + pid, message_type=MessageType.TRAIN
    )
    ins.metadata.__dict__["_message_id"] = f"m{pid}"
    content = RecordDict(
        {
            P.ARRAYS: _arrays(value),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.TRAIN_LOSS: float(pid)}),
            P.INFO: ConfigRecord({P.PARTITION_ID: pid}),
        }
    )
    return Message(content, reply_to=ins)


def _strategy(n: int = 3) -> FedAvgStrategy:
    cfg = build_config({"federation": {"num_clients": n}})
    strategy = FedAvgStrategy.from_config(cfg, {i: 100 + i for i in range(n)})
    strategy._reference = _arrays(0.0)
    return strategy


def test_fedavg_is_the_sample_weighted_mean_in_partition_order() -> None:
    strategy = _strategy()
    replies = [_reply(2, 4.0, 30), _reply(0, 1.0, 10), _reply(1, 100.0, 0)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # w = (10 * 1 + 30 * 4) / 40; the zero-sample client carries no weight.
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 130 / 40), rtol=1e-6)
    assert metrics[P.TRAIN_LOSS] == pytest.approx((10 * 0 + 30 * 2) / 40)
    assert set(strategy.client_info) == {0, 1, 2}


def test_bad_updates_are_dropped_and_all_bad_is_an_error() -> None:
    strategy = _strategy()
    arrays, _ = strategy.aggregate_train(1, [_reply(0, 2.0, 5), _reply(1, np.nan, 5)])
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)
    with pytest.raises(ClientUpdateError, match="NaN"):
        strategy.aggregate_train(2, [_reply(1, np.inf, 5)])


def test_round_counts_failed_rejected_and_missing_replies() -> None:
    """num_clients counts what was aggregated; failed = error replies + sampled clients that never replied."""
    from flwr.app import Error

    strategy = _strategy(4)
    strategy.last_sampled = [0, 1, 2, 3]
    error = Message(Error(code=0, reason="boom"), reply_to=_reply(2, 0.0, 1))
    arrays, _ = strategy.aggregate_train(1, [_reply(0, 2.0, 5), _reply(1, np.nan, 5), error])
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)
    counts = strategy.last_counts._asdict()
    assert {k: counts[k] for k in ("num_sampled", "num_clients", "num_failed", "num_rejected")} == {
        "num_sampled": 4,
        "num_clients": 1,
        "num_failed": 2,
        "num_rejected": 1,
    }
    assert counts["kept_clients"] == "0"  # a reply whose update was rejected still cost its bytes
    assert counts["bytes_up"] == 2 * sum(len(a.data) for a in _arrays(0.0).values())


def test_client_state_records_are_kept_apart_from_the_update() -> None:
    """A reply carrying ``state:`` records (the persist_state mod) still aggregates: FedAvg sees one
    ArrayRecord, and the strategy keeps the state for the checkpoint."""
    from clients.state import from_bytes

    strategy = _strategy()
    replies = [_reply(0, 1.0, 10), _reply(1, 3.0, 10)]
    replies[0].content["state:memory"] = _arrays(7.0)
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)
    kept = from_bytes(strategy.client_states[0])
    np.testing.assert_array_equal(kept["memory"]["w"].numpy(), np.full((2, 3), 7.0, np.float32))
    assert len(from_bytes(strategy.client_states[1])) == 0
