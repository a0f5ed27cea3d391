"""The ray-actors engine on a two-node Ray cluster (a head and a worker node, both started with
``ray start`` on this machine's loopback): actors on both nodes, misbehaving clients cost only their own
reply, the same metrics as the in-process engine, nothing listening beyond 127.0.0.1, nothing left."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from fedtail import pipeline
from tests.conftest import REPO, smoke_config

RAY = Path(sys.executable).parent / "ray"
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="loopback-only Ray is checked on Linux")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(sid: int) -> set[int]:
    """Ids of the live processes in session ``sid`` (every process a node started stays in it)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.add(int(stat.parent.name))
    return pids


def _node_args(temp_dir: str) -> list[str]:
    ports = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    return [
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--block",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        *(f"--{name}={_free_port()}" for name in ports),
    ]


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every process of the nodes' sessions (only what this test started), then check."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = {pid for p in procs for pid in _session(p.pid)}
        if not alive:
            break
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in procs:
            if p.poll() is None:
                p.wait(timeout=10)
        time.sleep(0.2)
    left = {pid for p in procs for pid in _session(p.pid)}
    assert not left, f"Ray processes left behind: {sorted(left)}"


def _listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A head and a worker node, 1 CPU each, on 127.0.0.1; killed (and checked gone) afterwards."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # servers on 127.0.0.1 only
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    temp = [tempfile.mkdtemp(prefix="fedtail-ray-") for _ in range(2)]  # short: Ray's socket paths
    logs = [tmp_path_factory.mktemp("ray-logs") / f"{node}.log" for node in ("head", "worker")]
    head = ["--head", f"--port={port}", "--include-dashboard=false"]
    join = ["-m", "tests.ray_loopback_node", "start", f"--address={address}"]
    commands = [
        [str(RAY), "start", *head, f"--ray-client-server-port={_free_port()}", *_node_args(temp[0])],
        [sys.executable, *join, *_node_args(temp[1])],
    ]
    procs: list[subprocess.Popen] = []
    try:
        for command, log in zip(commands, logs, strict=True):
            with log.open("w") as out:
                # its own session: every process of the node can be found (and killed) by it
                node = subprocess.Popen(
                    command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            procs.append(node)
            _wait_for_nodes(address, len(procs), procs, logs)
        yield {"address": address, "pids": lambda: {pid for p in procs for pid in _session(p.pid)}}
    finally:
        _stop(procs)
        for t in temp:
            shutil.rmtree(t, ignore_errors=True)
    assert not _listens(port), "the cluster's GCS still listens after its nodes were stopped"


def _wait_for_nodes(address: str, n: int, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Until the cluster at ``address`` has ``n`` live nodes (at most 2 minutes)."""
    code = (
        "import ray, time; from fedtail.engines.ray_actors import ray_session\n"
        "deadline = time.monotonic() + 120\n"
        "while time.monotonic() < deadline:\n"
        "    try:\n"
        f"        with ray_session({address!r}):\n"
        f"            if sum(x['Alive'] for x in ray.nodes()) >= {n}:\n"
        "                break\n"
        "    except ConnectionError:\n"
        "        pass\n"
        "    time.sleep(1)\n"
        "else:\n"
        "    raise SystemExit('timed out')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240
    )
    dead = [p.args for p in procs if p.poll() is not None]
    detail = "\n".join(log.read_text()[-2000:] for log in logs if log.exists())
    assert out.returncode == 0 and not dead, f"{n} Ray node(s) not up: {out.stderr[-2000:]}\n{detail}"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _probe(
    address: str | None, actions: list[str], timeout: float, actors: int, slack: float | None = None
) -> dict:
    code = (
        "import json; from tests.engine_apps import ray_actors_probe; "
        f"print(json.dumps(ray_actors_probe({address!r}, {actions!r}, {timeout}, {actors}, {slack})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or (addr.version == 6 and (addr.ipv4_mapped or addr).is_loopback)


def test_actors_run_on_both_nodes_and_only_failing_clients_get_errors(cluster: dict) -> None:
    from tests.engine_apps import listening

    seen = _probe(cluster["address"], ["ok", "hang", "ok", "os_exit", "raise", "ok"], timeout=3.0, actors=2)
    assert len(set(seen["actor_nodes"])) == 2  # one actor per node (1 CPU each)
    assert all(outcome == "ok" for outcome, *_ in seen["warm_up"])
    assert {node for _, node, _ in seen["warm_up"]} == set(seen["actor_nodes"])  # calls ran on both nodes
    reasons = [outcome for outcome, *_ in seen["round"]]
    assert reasons[0] == reasons[2] == reasons[5] == "ok"
    assert reasons[1] == "client timed out after 3s"
    assert reasons[3].startswith("client actor failed: ActorDiedError")
    assert reasons[4] == "ValueError: client bug"
    assert all(outcome == "ok" for outcome, *_ in seen["after"])
    # both actors were replaced: the one whose client died, and the one that left a timed-out call behind
    assert not {pid for *_, pid in seen["after"]} & {pid for *_, pid in seen["warm_up"]}
    assert seen["calls"] == [3, 2, 3, 2, 2, 3]  # failed calls left their node's Context as it was

    sockets = listening(cluster["pids"]()) + seen["listening"]
    names = {name for _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    assert all(_loopback(ip) for ip, _ in sockets), sockets


def test_a_run_asking_more_actors_than_free_cpus_runs_on_those_that_start(cluster: dict) -> None:
    """3 actors of 1 CPU on a 2-CPU cluster: the third never gets a CPU and is dropped after the grace
    (a cluster shared by a sweep's runs must not leave each run waiting for all of it)."""
    seen = _probe(cluster["address"], ["ok", "ok", "ok"], timeout=3.0, actors=3)
    assert len(seen["actor_nodes"]) == 2
    assert [outcome for outcome, *_ in seen["round"]] == ["ok", "ok", "ok"]


def test_cluster_run_matches_the_inprocess_engine(cluster: dict, project: Path) -> None:
    def run(run_id: str, **overrides) -> tuple[Path, dict]:
        cfg = smoke_config(project, **{"output.run_id": run_id, **overrides})
        staged = pipeline.stage(cfg, project)
        parts = pipeline.partition(cfg, staged, project)
        run_dir = pipeline.simulate(cfg, staged, parts, pipeline.new_run_dir(cfg, project))
        return run_dir, json.loads((run_dir / "metrics.json").read_text())

    _, reference = run("cluster-ref")
    run_dir, metrics = run(
        "cluster", **{"engine.name": "ray-actors", "engine.ray_address": cluster["address"]}
    )
    assert metrics.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, float):
            assert metrics[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert metrics[key] == value, key
    assert list(pd.read_csv(run_dir / "clients.csv")["rounds-trained"]) == [4, 4, 4]  # state kept


def test_an_actor_that_stops_answering_is_killed_and_replaced() -> None:
    """A call that holds the GIL cannot be timed out inside its actor; the driver kills the actor once
    its chunk is over its time (2 calls x 1 s + 2 s), runs the chunk again call by call, and only the
    hung client gets an error reply (private local Ray)."""
    start = time.monotonic()
    seen = _probe(None, ["ok", "hang_holding_the_gil"], timeout=1.0, actors=1, slack=2.0)
    assert time.monotonic() - start < 120
    assert [outcome for outcome, *_ in seen["round"]] == ["ok", "client timed out after 1s"]
    assert all(outcome == "ok" for outcome, *_ in seen["after"])
    pids = {pid for *_, pid in seen["warm_up"]}, {pid for *_, pid in seen["after"]}
    assert len(pids[0]) == len(pids[1]) == 1 and pids[0] != pids[1]  # the actor was replaced
    assert seen["calls"] == [3, 2]


def test_a_sweep_sends_every_runs_clients_to_the_cluster(
    cluster: dict, project: Path, tmp_path: Path
) -> None:
    """Two sweep workers, each run its own Ray driver on the same cluster: the table matches the
    in-process engine's (what the README's "Beyond one machine" promises)."""
    import yaml

    from fedtail import sweep
    from flows.sweep import _Data, prepare

    def table(sweep_id: str, **engine: str) -> list[dict]:
        path = tmp_path / f"{sweep_id}.yaml"
        common = {
            "output.data_dir": str(project / "data"),
            "output.artifacts_dir": str(project / "artifacts"),
            "output.sweeps_dir": str(tmp_path / "sweeps"),
            "tasks.classes_per_task": None,
            "federation.rounds_per_task": 2,
        }
        path.write_text(
            yaml.safe_dump(
                {
                    "base": str(REPO / "configs" / "smoke.yaml"),
                    "set": {**common, **engine},
                    "axes": {"partition.alpha": [0.5, 5.0]},
                    "seeds": [0],
                }  # fmt: skip
            )
        )
        spec = sweep.load_sweep(path)
        _, cells = prepare(spec, sweep_id, project)
        outcomes = sweep.run_cells(cells, project, _Data(project), workers=2)
        assert [o.status for o in outcomes] == ["done", "done"], [o.error for o in outcomes]
        return sweep.summary_rows(outcomes, spec)

    reference = table("local")
    on_cluster = table("cluster", **{"engine.name": "ray-actors", "engine.ray_address": cluster["address"]})
    for got, want in zip(on_cluster, reference, strict=True):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
