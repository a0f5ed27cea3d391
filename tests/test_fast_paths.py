"""The engine's fast paths give exactly what the straightforward code gave: indexed and cached client
data, discovery without loading data, a reused client model, the lazy global model, one-pass FedAvg."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from clients import app as client_app
from clients.local import load_client_data, train_local
from fedtail import pipeline
from fedtail import protocol as P
from fedtail.engines.inprocess import InProcessGrid, set_server_identity
from fedtail.models import build_model, load_arrays, to_arrays
from fedtail.partition import labeled_class_counts, load_client
from fedtail.staging import load_staged
from server.app import discover_clients
from strategies.base import decode, weighted_mean
from tests.conftest import smoke_config
from tests.test_clients import _ctx, _toy

CLIENTS = 7


@pytest.fixture(scope="module")
def job(project: Path) -> P.Job:
    """Digits over 7 clients with half of every client's samples unlabeled."""
    cfg = smoke_config(project, **{"federation.num_clients": CLIENTS, "partition.labeled_fraction": 0.5})
    staged = pipeline.stage(cfg, project)
    return P.Job(cfg, staged, pipeline.partition(cfg, staged, project))


def _uncached_client(job: P.Job, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A client's data as the loaders computed it before they were indexed and cached."""
    assignment = np.load(job.partition_dir / "assignment.npy")
    labeled = np.load(job.partition_dir / "labeled.npy")
    idx = np.flatnonzero(assignment == k).astype(np.int64)
    x = np.load(job.staged_dir / "x_train.npy")[idx].astype(np.float32)
    y = np.load(job.staged_dir / "y_train.npy")[idx].astype(np.int64)
    return idx, labeled[idx], x, y


def test_indexed_and_cached_client_data_equals_uncached(job: P.Job) -> None:
    for k in range(CLIENTS):
        idx, labeled, x, y = _uncached_client(job, k)
        got_idx, got_labeled = load_client(job.partition_dir, k)
        assert np.array_equal(got_idx, idx) and np.array_equal(got_labeled, labeled)
        for _ in range(2):  # the first call fills the caches, the second reads them
            data = load_client_data(str(job.staged_dir), str(job.partition_dir), k)
            assert np.array_equal(data.x, x[labeled]) and np.array_equal(data.y, y[labeled])
            assert np.array_equal(data.x_unlabeled, x[~labeled])
    assert load_staged(job.staged_dir) is load_staged(job.staged_dir)  # opened once per file state


def test_discovery_without_data_gives_the_clients_mapping_and_counts(job: P.Job) -> None:
    """The counts the server derives from the partition equal what every client used to report: the
    class counts of its labeled samples (the data it trains on)."""
    expected = np.stack(
        [
            load_client_data(str(job.staged_dir), str(job.partition_dir), k).class_counts(
                job.config.num_classes
            )
            for k in range(CLIENTS)
        ]
    )
    assert expected.sum() < sum(len(_uncached_client(job, k)[0]) for k in range(CLIENTS))  # some unlabeled
    y_train = load_staged(job.staged_dir).y_train
    assert np.array_equal(labeled_class_counts(job.partition_dir, y_train, job.config.num_classes), expected)
    set_server_identity()
    grid = InProcessGrid("clients.app:app", num_nodes=CLIENTS)
    node_of, counts = discover_clients(grid, job, timeout=60)
    assert node_of == {k: 1000 + k for k in range(CLIENTS)}
    assert np.array_equal(counts, expected)


def _train_message(grid: InProcessGrid, job: P.Job, node: int, arrays: ArrayRecord):
    config = ConfigRecord(
        {
            P.JOB: job.to_json(),
            P.TASK: 0,
            "task-classes": list(range(job.config.num_classes)),
            "seen-classes": list(range(job.config.num_classes)),
            P.CLASS_PRIOR: [0.1] * job.config.num_classes,
            P.GLOBAL_ROUND: 1,
        }
    )
    content = RecordDict({P.ARRAYS: arrays, P.CONFIG: config})
    return grid.create_message(content, MessageType.TRAIN, node, "1")


def test_reused_client_model_gives_the_same_update_as_a_fresh_one(job: P.Job) -> None:
    cfg = job.config
    shape = tuple(np.load(job.staged_dir / "x_train.npy", mmap_mode="r").shape[1:])
    start = to_arrays(build_model(cfg.model_name(), shape, cfg.num_classes, cfg.model.hidden, seed=3))
    set_server_identity()
    grid = InProcessGrid("clients.app:app", num_nodes=CLIENTS)

    def update(node: int) -> dict[str, np.ndarray]:
        (reply,) = grid.send_and_receive([_train_message(grid, job, node, start)])
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        return {k: v.numpy() for k, v in reply.content[P.ARRAYS].items()}

    update(1001)  # leaves the worker thread's model trained on client 1
    reused = update(1000)
    grid.close()  # a fresh worker thread: a freshly built model
    fresh = update(1000)
    assert reused.keys() == fresh.keys()
    assert all(np.array_equal(reused[k], fresh[k]) for k in reused)
    grid.close()


def test_global_model_is_built_only_when_used_and_is_the_received_one() -> None:
    model = build_model("mlp", (64,), 10, 16, 0)
    received = copy.deepcopy(model)
    calls = []
    ctx = _ctx(model)
    ctx.global_model_fn = lambda: calls.append(1) or copy.deepcopy(received)
    train_local(ctx, *_toy())
    assert calls == []  # plain cross-entropy never looks at it
    frozen = ctx.global_model
    assert ctx.global_model is frozen and calls == [1]
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen.parameters(), received.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(frozen.parameters(), model.parameters(), strict=True))


def test_client_app_module_keeps_one_model_per_thread_and_shape(job: P.Job) -> None:
    arrays = to_arrays(build_model("mlp", (64,), job.config.num_classes, job.config.model.hidden, 0))
    first = client_app._model(job, arrays)
    assert client_app._model(job, arrays) is first


def _random_replies(rng: np.random.Generator, n: int) -> list[RecordDict]:
    shapes = {"w": (5, 3), "b": (3,), "scalar": ()}
    return [
        RecordDict(
            {
                "arrays": ArrayRecord(
                    {
                        k: Array(
                            np.asarray(rng.normal(size=s) * 10.0 ** rng.integers(-3, 3), dtype=np.float32)
                        )
                        for k, s in shapes.items()
                    }
                ),
                "metrics": MetricRecord({P.NUM_EXAMPLES: int(rng.integers(1, 1000))}),
            }
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("seed", range(10))
def test_one_pass_weighted_mean_is_flowers_fedavg_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    replies = _random_replies(rng, int(rng.integers(1, 12)))
    expected = aggregate_arrayrecords(replies, P.NUM_EXAMPLES)
    got = weighted_mean(
        [decode(r["arrays"]) for r in replies], [r["metrics"][P.NUM_EXAMPLES] for r in replies]
    )
    assert list(got.keys()) == list(expected.keys())
    for key in expected:
        a, b = got[key].numpy(), expected[key].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key


def test_fedavg_strategy_takes_the_one_pass_path() -> None:
    from strategies.fedavg import FedAvgStrategy

    assert FedAvgStrategy._plain_fedavg_aggregation()


def _row(i: int) -> dict:
    nan = float("nan")
    return {
        "task": 0,
        "round": i,
        "num_sampled": 3,
        "train_loss": nan if i == 2 else 1 / (i + 3),
        "acc": i / 7,
    }


def test_rounds_csv_appended_equals_rewritten_and_resume_drops_a_half_row(tmp_path: Path) -> None:
    import pandas as pd

    from fedtail.tasks import make_schedule
    from server.recorder import RunRecorder

    cfg = smoke_config(tmp_path)
    schedule = make_schedule(cfg.num_classes, None, shuffle=False, seed=0)
    arrays = to_arrays(build_model("mlp", (64,), 10, 4, 0))
    recorder = RunRecorder(tmp_path, cfg, schedule)
    for i in range(1, 5):
        recorder.record_round(_row(i), arrays)
    rows = [_row(i) for i in range(1, 5)]

    def as_written(rows: list[dict]) -> str:  # the files number tasks from 1
        return pd.DataFrame([{**r, "task": r["task"] + 1} for r in rows]).to_csv(
            index=False, float_format="%.6f"
        )

    assert (tmp_path / "rounds.csv").read_text() == as_written(rows)
    # a crash in the middle of an append leaves half a row; resuming rewrites the file from the checkpoint
    with open(tmp_path / "rounds.csv", "a") as fh:
        fh.write("0,5,3,0.12")
    resumed = RunRecorder(tmp_path, cfg, schedule)
    assert resumed.resumed and len(resumed.rows) == 4
    resumed.record_round(_row(5), arrays)
    rows.append(_row(5))
    assert (tmp_path / "rounds.csv").read_text() == as_written(rows)


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array(2.5),
        np.zeros((0, 3), np.float32),
        np.arange(5, dtype=">i8"),
        np.array([True, False]),
        np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        np.arange(6, dtype=np.float16).reshape(3, 2)[::2],
    ],
    ids=["f32", "0d", "empty", "big-endian", "bool", "fortran", "strided"],
)
def test_decode_equals_flowers_array_numpy(value: np.ndarray) -> None:
    """`array_to_numpy` (used by `decode` on the server and `load_arrays` in the clients)."""
    array = Array(value)
    got, expected = decode(ArrayRecord({"a": array}))["a"], array.numpy()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected) and got.tobytes() == expected.tobytes()
    lying = Array(dtype="float64", shape=array.shape, stype=array.stype, data=array.data)  # header disagrees
    if np.dtype(array.dtype) != np.float64:  # the bytes are read as np.load reads them
        assert decode(ArrayRecord({"a": lying}))["a"].dtype == expected.dtype


def test_load_arrays_loads_exactly_the_arrays() -> None:
    model = torch.nn.Linear(3, 2)
    arrays = ArrayRecord({k: Array(v.detach().numpy() + 1) for k, v in model.state_dict().items()})
    load_arrays(model, arrays)
    assert all(np.array_equal(v.detach().numpy(), arrays[k].numpy()) for k, v in model.state_dict().items())


def test_copy_context_is_an_independent_deep_copy() -> None:
    from flwr.app import Context

    from clients.state import to_bytes
    from fedtail.engines.inprocess import copy_context

    state = RecordDict(
        {
            "c": ConfigRecord({"n": 3, "seen": [0, 1], "b": b"x", "s": "t"}),
            "m": MetricRecord({"loss": [0.5, 0.25], "k": 2}),
            "a": ArrayRecord({"w": Array(np.ones(3, np.float32))}),
        }
    )
    original = Context(run_id=1, node_id=7, node_config={"partition-id": 2}, state=state, run_config={"x": 1})
    copied = copy_context(original)
    assert to_bytes(copied.state) == to_bytes(copy.deepcopy(original).state) == to_bytes(original.state)
    assert (copied.run_id, copied.node_id, copied.node_config, copied.run_config) == (
        1,
        7,
        {"partition-id": 2},
        {"x": 1},
    )
    copied.state["c"]["seen"].append(2)
    copied.state["m"]["loss"][0] = 9.0
    copied.state["c"]["n"] = 4
    copied.node_config["partition-id"] = 5
    del copied.state["a"]
    assert original.state["c"]["seen"] == [0, 1] and original.state["m"]["loss"] == [0.5, 0.25]
    assert (
        original.state["c"]["n"] == 3 and original.node_config["partition-id"] == 2 and "a" in original.state
    )


def test_packed_client_states_round_trip_and_format_1_checkpoints_still_resume(tmp_path: Path) -> None:
    import torch

    from fedtail.tasks import make_schedule
    from server.recorder import CHECKPOINT, RunRecorder, json_from_tensor, pack_states, unpack_states

    states = {5: b"abc", 0: b"", 2: bytes(range(256))}
    assert unpack_states(pack_states(states)) == states
    assert unpack_states(pack_states({})) == {}
    cfg = smoke_config(tmp_path)
    schedule = make_schedule(cfg.num_classes, None, shuffle=False, seed=0)
    arrays = to_arrays(build_model("mlp", (64,), 10, 4, 0))
    recorder = RunRecorder(tmp_path, cfg, schedule)
    recorder.client_info.update({5: {"x": 1}})
    recorder.client_states.update(states)
    recorder.record_round(_row(1), arrays)
    assert RunRecorder(tmp_path, cfg, schedule).client_states == states
    old = torch.load(tmp_path / CHECKPOINT, weights_only=True)  # rewrite it as format 1 wrote it
    old["format"] = 1
    old["rows"] = json_from_tensor(old["rows"])
    old["client_info"] = dict(json_from_tensor(old["client_info"]))
    old["client_states"] = {
        p: torch.frombuffer(bytearray(b), dtype=torch.uint8) for p, b in states.items() if b
    }
    torch.save(old, tmp_path / CHECKPOINT)
    assert RunRecorder(tmp_path, cfg, schedule).client_states == {p: b for p, b in states.items() if b}


def test_server_evaluation_runs_with_the_clients_thread_count_and_restores_it() -> None:
    from fedtail.datasets.base import Splits
    from server.evaluation import Evaluator

    seen_threads = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen_threads.append(torch.get_num_threads())
            return torch.zeros(len(x), 3)

    x, y = np.zeros((5, 2), np.float32), np.array([0, 1, 2, 0, 1])
    evaluator = Evaluator(Probe(), Splits(x, y, x, y), torch.device("cpu"), threads=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        evaluator.predict(ArrayRecord(), [0, 1, 2])
        assert seen_threads == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


ENCODE_CASES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(2.5),
    np.zeros((0, 3), np.float32),
    np.arange(5, dtype=">i8"),
    np.array([True, False]),
    np.arange(6, dtype=np.uint8),
    np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
    np.arange(6, dtype=np.float16).reshape(3, 2)[::2],
]


@pytest.mark.parametrize(
    "value", ENCODE_CASES, ids=lambda v: f"{v.dtype.str}-{v.shape}-{v.flags.c_contiguous}"
)
def test_encode_equals_flowers_array(value: np.ndarray) -> None:
    from fedtail.models import array_from_numpy

    got, expected = array_from_numpy(value), Array(value)
    assert type(got) is Array
    assert (got.dtype, got.shape, got.stype, got.data) == (
        expected.dtype,
        expected.shape,
        expected.stype,
        expected.data,
    )
    assert got.object_id == expected.object_id and got.is_dirty == expected.is_dirty
    assert np.array_equal(got.numpy(), value)


def test_to_arrays_and_to_state_dict_equal_flowers_conversions() -> None:
    from fedtail.models import to_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    ours, flowers = to_arrays(model), ArrayRecord(model.state_dict())
    assert list(ours.keys()) == list(flowers.keys())
    assert all(ours[k].data == flowers[k].data and ours[k].dtype == flowers[k].dtype for k in ours)
    ours_sd, flowers_sd = to_state_dict(ours), flowers.to_torch_state_dict()
    assert all(
        torch.equal(ours_sd[k], flowers_sd[k]) and ours_sd[k].dtype == flowers_sd[k].dtype for k in ours_sd
    )


def _arrays_like(model: torch.nn.Module, fn) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(fn(v.detach().numpy()))) for k, v in model.state_dict().items()}
    )


def test_load_arrays_fast_path_equals_load_state_dict_and_keeps_its_errors() -> None:
    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))

    fast, slow = net(), net()
    for fn in (lambda v: v + 1, lambda v: (v * 2).astype(np.float64 if v.dtype == np.float32 else v.dtype)):
        arrays = _arrays_like(fast, fn)  # the second casts float64 -> float32 (load_state_dict's path)
        load_arrays(fast, arrays)
        slow.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()})
        for (k, a), b in zip(fast.state_dict().items(), slow.state_dict().values(), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), k
    missing = ArrayRecord({k: v for k, v in _arrays_like(fast, lambda v: v).items() if k != "0.bias"})
    with pytest.raises(RuntimeError, match="Missing key"):
        load_arrays(fast, missing)
    wrong = _arrays_like(fast, lambda v: np.zeros((7,) + v.shape, v.dtype) if v.ndim else v)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_arrays(fast, wrong)


def test_load_arrays_respects_load_hooks() -> None:
    class Doubling(torch.nn.Linear):
        def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
            state_dict = {k: v * 2 for k, v in state_dict.items()}
            super()._load_from_state_dict(state_dict, prefix, *args)

    model = Doubling(2, 2)
    arrays = _arrays_like(model, lambda v: np.ones_like(v))
    load_arrays(model, arrays)
    assert torch.equal(model.weight.detach(), torch.full((2, 2), 2.0))


def test_csv_text_equals_pandas() -> None:
    import pandas as pd

    from server.recorder import csv_text

    rows = [
        {
            "task": 0,
            "round": i,
            "loss": [float("nan"), 1 / 3, float("inf"), -0.0][i],
            "name": ["a", "b,c", 'q"', ""][i],
        }
        for i in range(4)
    ]
    for header in (True, False):
        assert csv_text(rows, header) == pd.DataFrame(rows).to_csv(
            index=False, header=header, float_format="%.6f"
        )


def test_discovery_asks_the_nodes_of_a_grid_that_does_not_know_their_partitions(job: P.Job) -> None:
    class QueryOnly(InProcessGrid):
        partition_ids = None  # as Flower's grids: only the nodes know

    set_server_identity()
    known = InProcessGrid("clients.app:app", num_nodes=CLIENTS)
    asked = QueryOnly("clients.app:app", num_nodes=CLIENTS)
    sent = []
    real = asked.push_messages
    asked.push_messages = lambda messages: real([sent.append(m) or m for m in messages])
    try:
        a, b = discover_clients(known, job, timeout=60), discover_clients(asked, job, timeout=60)
        assert a[0] == b[0] == {k: 1000 + k for k in range(CLIENTS)} and np.array_equal(a[1], b[1])
        assert len(sent) == CLIENTS and all(m.metadata.message_type == MessageType.QUERY for m in sent)
    finally:
        known.close()
        asked.close()


def test_client_cache_is_bounded_by_bytes_and_least_recently_used() -> None:
    from clients.local import ClientData, _ClientCache

    def data(n: int) -> ClientData:
        return ClientData(np.zeros((n, 2), np.float32), np.zeros(n, np.int64), np.zeros((0, 2), np.float32))

    cache = _ClientCache(max_bytes=3 * data(10).x.nbytes + 3 * data(10).y.nbytes)
    loads = []
    get = lambda k: cache.get(k, lambda: loads.append(k) or data(10))  # noqa: E731
    for k in (1, 2, 3, 1, 4, 1, 2):
        get(k)
    assert loads == [1, 2, 3, 4, 2]  # 4 evicted 2 (1 was used after 2); 2 came back evicting 3
    assert cache.bytes <= cache.max_bytes and cache.get(9, lambda: data(10**6)).x.shape[0] == 10**6
    assert 9 not in cache._items  # larger than the whole cache: returned, not kept


def test_client_data_for_classes_equals_isin() -> None:
    from clients.local import ClientData

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 50)
    data = ClientData(rng.normal(size=(50, 3)).astype(np.float32), y, np.zeros((0, 3), np.float32))
    for classes in ([], [3], [0, 9], list(range(10)), [12]):
        x, yy = data.for_classes(classes)
        mask = np.isin(y, classes)
        assert np.array_equal(x, data.x[mask]) and np.array_equal(yy, y[mask])


@pytest.mark.parametrize("seed", range(5))
def test_weighted_metrics_equal_flowers_aggregate_metricrecords(seed: int) -> None:
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    from strategies.base import weighted_metrics

    rng = np.random.default_rng(seed)
    replies = [
        RecordDict(
            {
                "arrays": ArrayRecord(),
                "metrics": MetricRecord(
                    {
                        P.NUM_EXAMPLES: int(rng.integers(1, 1000)),
                        "loss": float(rng.normal()),
                        "per-class": [float(v) for v in rng.normal(size=3)],
                        "count": int(rng.integers(0, 9)),
                    }
                ),
                "extra": MetricRecord({"loss": float(rng.normal())}),
            }
        )
        for _ in range(int(rng.integers(1, 12)))
    ]
    got, expected = (
        weighted_metrics(replies, P.NUM_EXAMPLES),
        aggregate_metricrecords(replies, P.NUM_EXAMPLES),
    )
    assert dict(got) == dict(expected) and list(got) == list(expected)


def test_checkpoint_json_round_trips_rows_and_client_info_exactly() -> None:
    from server.recorder import json_from_tensor, json_tensor

    value = [
        {"a": 0.1 + 0.2, "nan": float("nan"), "inf": float("-inf"), "n": 3, "s": "x,y", "tiny": 5e-324},
        [7, {"blob": b"\x00\xff", "list": [1, 2.5, True, None], "np": np.float32(0.5)}],
    ]
    got = json_from_tensor(json_tensor(value))
    assert (
        repr(got[0]["a"]) == repr(0.1 + 0.2) and got[0]["nan"] != got[0]["nan"] and got[0]["tiny"] == 5e-324
    )
    assert {k: v for k, v in got[0].items() if k != "nan"} == {
        k: v for k, v in value[0].items() if k != "nan"
    }
    assert got[1] == [7, {"blob": b"\x00\xff", "list": [1, 2.5, True, None], "np": 0.5}]


def test_accuracy_matrix_and_clients_files_equal_what_pandas_wrote(tmp_path: Path) -> None:
    import pandas as pd

    from fedtail.tasks import make_schedule
    from server.recorder import RunRecorder

    cfg = smoke_config(tmp_path)
    schedule = make_schedule(cfg.num_classes, 5, shuffle=False, seed=0)
    recorder = RunRecorder(tmp_path, cfg, schedule)
    recorder.record_round(
        dict(_row(1), accuracy=0.5, balanced_accuracy=0.5, macro_f1=0.5),
        to_arrays(build_model("mlp", (64,), 10, 4, 0)),
    )
    arrays = to_arrays(build_model("mlp", (64,), 10, 4, 0))
    recorder.end_task(0, {"task_accuracies": [0.5]}, arrays)
    recorder.end_task(1, {"task_accuracies": [1 / 3, 0.25]}, arrays)
    recorder.client_info.update(
        {
            3: {"partition-id": 3, "rounds-trained": 2, "tasks-seen": [0, 1], "lr": 0.1},
            1: {"partition-id": 1, "rounds-trained": 1, "tasks-seen": [0], "lr": 1e-05},
        }
    )
    recorder.finish({})
    t = schedule.num_tasks
    frame = pd.DataFrame(
        recorder.acc_matrix, columns=[f"task_{j + 1}" for j in range(t)], index=range(1, t + 1)
    )
    frame.index.name = "after_task"  # tasks numbered from 1 in the run's files
    assert (tmp_path / "accuracy_matrix.csv").read_text() == frame.to_csv(float_format="%.6f")
    rows = [
        {"partition_id": p, **{k: v for k, v in info.items() if k != "partition-id"}}
        for p, info in sorted(recorder.client_info.items())
    ]  # one partition id column, not the clients' own copy of it too
    assert (tmp_path / "clients.csv").read_text() == pd.DataFrame(rows).to_csv(index=False)
