"""Faults (issue 7): clients vanishing mid-stream, the server killed with SIGKILL while committing, a full
queue, deadlines shorter than the solve, and a state directory that cannot be used at start.

What each test holds the service to:
* a telemetry stream cut off (client process killed, or the call cancelled) keeps exactly the reports
  the server had taken before the cut, whole, and nothing else; the server carries on;
* SIGKILL at an arbitrary point of a tight commit loop loses no acknowledged placement: after a restart
  the version is the last acknowledged one or one of the commits still in flight, its map is intact and
  consistent, versions are dense, and the next commit continues the sequence. (WAL with synchronous=NORMAL
  survives a process crash; an OS crash or power cut may lose the last transactions, never tear one.);
* past --max-queue requests get RESOURCE_EXHAUSTED, and the next ones succeed;
* a request whose deadline passes while queued is dropped unsolved (rebalancer_dropped_requests_total);
  one whose deadline passes mid-solve is stopped between solver rounds and nothing is committed;
* a state directory under a regular file, a database that is a directory, corrupt pages, a foreign
  schema, a damaged placement row, or a directory the server may not write: exit 2 with the reason.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from rebalancer_wire.v1 import rebalancer_pb2_grpc
from service_harness import (
    EXPERTS,
    LAYERS,
    REPLICAS,
    TOPOLOGY,
    ServerThread,
    free_port,
    launch,
    maps_of,
    report,
    skewed_loads,
    slow_solver,
    wait_serving,
)

STREAMED = 50
# A client that streams STREAMED reports (report i: uniform loads seeded by i) and then hangs mid-stream.
STREAMING_CLIENT = f"""
import sys, threading
import grpc, numpy as np
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb, rebalancer_pb2_grpc

target, count = sys.argv[1], int(sys.argv[2])
topology = pb.Topology(
    num_layers={LAYERS}, num_experts={EXPERTS}, num_replicas={REPLICAS}, num_groups=4, num_nodes=2, num_gpus=4
)

def reports():
    for i in range(count):
        loads = np.random.default_rng(i).random(({LAYERS}, {EXPERTS})).astype(np.float32)
        message = pb.StreamLoadRequest(deployment_id="cut", loads=encode(loads))
        if i == 0:
            message.topology.CopyFrom(topology)
        yield message
    threading.Event().wait()

rebalancer_pb2_grpc.RebalancerServiceStub(grpc.insecure_channel(target)).StreamLoad(reports())
"""


def streamed_sum(count: int) -> np.ndarray:
    return sum(
        np.random.default_rng(i).random((LAYERS, EXPERTS)).astype(np.float32).astype(np.float64) for i in range(count)
    )


def wait_for(condition, timeout: float = 60.0) -> None:
    """Poll `condition` until true; generous, since the test machine may be busy."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def accepted(server: ServerThread, deployment_id: str) -> float:
    return server.metric("rebalancer_telemetry_reports_total", deployment=deployment_id, outcome="accepted")


def handled(server: ServerThread, method: str, code: str, expected: float) -> float:
    return server.settled_metric(
        "grpc_server_handled_total",
        expected,
        grpc_type="client_stream" if method == "StreamLoad" else "unary",
        grpc_service="rebalancer.v1.RebalancerService",
        grpc_method=method,
        grpc_code=code,
    )


def handled_streams(server: ServerThread) -> float:
    registry = server.server.metrics.registry
    return sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "grpc_server_handled_total" and sample.labels["grpc_method"] == "StreamLoad"
    )


def solver_calls(server: ServerThread) -> float:
    return sum(server.metric("rebalancer_solver_calls_total", path=path) for path in ("torch", "triton"))


def dropped(server: ServerThread) -> float:
    """Requests dropped unsolved, before or during their solve, because their caller had gone."""
    return sum(server.metric("rebalancer_dropped_requests_total", reason=r) for r in ("cancelled", "deadline"))


def window(server: ServerThread, deployment_id: str):
    return server.call(server.server.windows.snapshot(deployment_id))


def test_client_killed_mid_stream_keeps_exactly_the_reports_taken(tmp_path):
    with ServerThread(str(tmp_path), window=256) as server:
        client = subprocess.Popen(
            [sys.executable, "-c", STREAMING_CLIENT, f"127.0.0.1:{server.server.port}", str(STREAMED)],
            stderr=subprocess.PIPE,
        )
        try:
            wait_for(lambda: accepted(server, "cut") == STREAMED or client.poll() is not None)
            assert accepted(server, "cut") == STREAMED, client.stderr.read() if client.poll() is not None else ""
        finally:
            client.send_signal(signal.SIGKILL)
            client.wait(10)
        # grpc.aio ends the request iterator of a vanished client like a clean half-close: the handler
        # finishes (its summary goes nowhere) and is counted with code OK.
        wait_for(lambda: handled_streams(server) == 1)
        snapshot = window(server, "cut")
        assert snapshot.reports == STREAMED
        np.testing.assert_allclose(snapshot.loads.numpy(), streamed_sum(STREAMED), rtol=1e-12)
        # The deployment carries on: more telemetry, then a plan on the whole window.
        assert server.stub.StreamLoad(iter([report("cut", skewed_loads(1))]), timeout=10).accepted == 1
        assert server.stub.Rebalance(pb.RebalanceRequest(deployment_id="cut"), timeout=30).placement.version == 1


def test_cancelled_stream_keeps_the_reports_before_the_cancel(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        hold = threading.Event()

        def reports():
            yield report("cancel", skewed_loads(0), topology=TOPOLOGY)
            yield report("cancel", skewed_loads(1))
            hold.wait(30)

        call = server.stub.StreamLoad.future(reports(), timeout=30)
        wait_for(lambda: accepted(server, "cancel") == 2)
        call.cancel()
        hold.set()
        wait_for(lambda: handled_streams(server) == 1)
        snapshot = window(server, "cancel")
        assert snapshot.reports == 2
        expected = skewed_loads(0).astype(np.float64) + skewed_loads(1)
        np.testing.assert_allclose(snapshot.loads.numpy(), expected, rtol=1e-6)


def check_placement(placement: pb.Placement) -> np.ndarray:
    """A placement that decodes and is self-consistent; returns phy2log."""
    phy2log, log2phy, logcnt = maps_of(placement)
    assert phy2log.shape == (LAYERS, REPLICAS) and logcnt.shape == (LAYERS, EXPERTS)
    assert ((phy2log >= 0) & (phy2log < EXPERTS)).all()
    for layer in range(LAYERS):
        counts = np.bincount(phy2log[layer], minlength=EXPERTS)
        assert (counts >= 1).all() and np.array_equal(counts, logcnt[layer])
        for expert in range(EXPERTS):
            slots = log2phy[layer, expert, : logcnt[layer, expert]]
            assert (phy2log[layer, slots] == expert).all()
    return phy2log


def check_database(state_dir: Path, version: int) -> None:
    """The database file itself: intact, dense versions up to `version`, every map of the right size."""
    with sqlite3.connect(f"file:{state_dir / 'rebalancer.sqlite3'}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT version, length(phy2log) FROM placements WHERE deployment_id='crash' ORDER BY 1")
        versions, sizes = zip(*rows.fetchall(), strict=True)
    assert list(versions) == list(range(versions[0], version + 1))
    assert set(sizes) == {8 * LAYERS * REPLICAS}


def commit_until_killed(stub, acked: dict[int, np.ndarray], worker: int) -> None:
    """Commit new versions back to back until the server goes away; records every acknowledged map."""
    for i in range(10**6):
        request = pb.RebalanceRequest(
            deployment_id="crash",
            topology=TOPOLOGY,
            loads=encode(skewed_loads(1000 * worker + i)),
            options=pb.SolveOptions(fresh=True, num_candidates=1),
        )
        try:
            placement = stub.Rebalance(request, timeout=30).placement
        except grpc.RpcError:
            return
        acked[placement.version] = maps_of(placement)[0]


def test_sigkill_while_committing_never_loses_or_tears_a_placement(tmp_path):
    state_dir, committers, kills = tmp_path / "state", 2, 3
    acked: dict[int, np.ndarray] = {}  # version -> map, acknowledged since the last start
    for round_ in range(kills + 1):
        port = free_port()
        process = launch(state_dir, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                wait_serving(channel, process)
                stub = rebalancer_pb2_grpc.RebalancerServiceStub(channel)
                restored = 0
                if acked:  # after a kill: the last acknowledged version or one still in flight, intact
                    last_acked = max(acked)
                    placement = stub.GetPlacement(pb.GetPlacementRequest(deployment_id="crash"), timeout=10).placement
                    assert last_acked <= placement.version <= last_acked + committers
                    phy2log = check_placement(placement)
                    if placement.version == last_acked:
                        assert np.array_equal(phy2log, acked[last_acked])
                    check_database(state_dir, placement.version)
                    restored = placement.version
                if round_ == kills:
                    break
                acked = {}
                with ThreadPoolExecutor(committers) as pool:
                    workers = [pool.submit(commit_until_killed, stub, acked, w) for w in range(committers)]
                    goal = 10 + 7 * round_  # kill at a different moment each round
                    wait_for(lambda acked=acked, goal=goal: len(acked) >= goal)
                    process.send_signal(signal.SIGKILL)
                    for worker in workers:
                        worker.result(30)
                assert min(acked) == restored + 1  # versions go on from the restored one, never reused
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            process.communicate(timeout=30)
    assert process.returncode == 0  # the last start also shut down cleanly


def test_full_queue_is_resource_exhausted_and_recovers(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=300, batch_window_when="always", max_queue=2) as server:

        def plan(seed: int) -> grpc.StatusCode:
            request = pb.RebalanceRequest(loads=encode(skewed_loads(seed)), topology=TOPOLOGY)
            try:
                server.stub.Rebalance(request, timeout=30)
            except grpc.RpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(plan, range(8)))
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert refused >= 1 and codes.count(grpc.StatusCode.OK) >= 2
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert handled(server, "Rebalance", "RESOURCE_EXHAUSTED", refused) == refused
        assert [plan(seed) for seed in range(3)] == [grpc.StatusCode.OK] * 3  # recovered
        assert server.metric("rebalancer_queue_depth") == 0


def test_request_expiring_in_the_queue_is_dropped_unsolved(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=0) as server:
        gate, entered = slow_solver(server)
        calls = solver_calls(server)
        inline = [pb.RebalanceRequest(loads=encode(skewed_loads(seed)), topology=TOPOLOGY) for seed in range(3)]
        long_solve = server.stub.Rebalance.future(inline[0], timeout=60)
        assert entered.wait(30)
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Rebalance(inline[1], timeout=0.3)  # queued behind the long solve, expires there
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()
        long_solve.result()
        server.stub.Rebalance(inline[2], timeout=30)
        assert solver_calls(server) == calls + 2  # the long solve and the last request, not the expired one
        assert dropped(server) == 1


def test_request_expiring_mid_solve_is_not_committed(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        server.stub.StreamLoad(iter([report("slow", skewed_loads(1), topology=TOPOLOGY)]))
        assert server.stub.Rebalance(pb.RebalanceRequest(deployment_id="slow")).placement.version == 1
        gate, _ = slow_solver(server)
        calls = solver_calls(server)
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Rebalance(pb.RebalanceRequest(deployment_id="slow"), timeout=0.3)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()
        # The solve starts after the deadline passed: it stops at its first round, unsolved and uncounted.
        wait_for(lambda: dropped(server) == 1)
        time.sleep(0.2)  # room for a commit, were the server to make one
        assert solver_calls(server) == calls
        assert server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="slow")).placement.version == 1
        assert server.metric("rebalancer_placements_total", trigger="request") == 1


def _state_under_a_file(root: Path) -> Path:
    (root / "file").write_text("not a directory")
    return root / "file" / "state"


def _database_is_a_directory(root: Path) -> Path:
    (root / "rebalancer.sqlite3").mkdir()
    return root


def _with_placement(root: Path) -> Path:
    with ServerThread(str(root)) as server:
        server.stub.Rebalance(pb.RebalanceRequest(deployment_id="d", topology=TOPOLOGY, loads=encode(skewed_loads(1))))
    return root / "rebalancer.sqlite3"


def _corrupt_pages(root: Path) -> Path:
    path = _with_placement(root)
    data = path.read_bytes()
    path.write_bytes(data[:100] + np.random.default_rng(0).bytes(len(data) - 100))  # valid header, garbage pages
    return root


def _foreign_schema(root: Path) -> Path:
    with sqlite3.connect(root / "rebalancer.sqlite3") as db:
        db.execute("CREATE TABLE deployments (deployment_id TEXT PRIMARY KEY, owner TEXT)")
        db.execute("INSERT INTO deployments VALUES ('d', 'someone')")
    return root


def _damaged_placement_row(root: Path) -> Path:
    path = _with_placement(root)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE placements SET phy2log = substr(phy2log, 1, 100)")
    return root


def _not_writable(root: Path) -> Path:
    state = root / "state"
    state.mkdir()
    state.chmod(0o555)
    return state


BAD_STATES = {
    "under_a_file": (_state_under_a_file, "cannot use state database"),
    "database_is_a_directory": (_database_is_a_directory, "cannot use state database"),
    "corrupt_pages": (_corrupt_pages, "rebalancer.sqlite3"),
    "foreign_schema": (_foreign_schema, "unreadable"),
    "damaged_placement_row": (_damaged_placement_row, "not an int64"),
    "not_writable": (_not_writable, "not writable"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_unusable_state_at_start_is_a_clear_error(case):
    """Exit 2 with a message naming the problem. Tests run as root, which writes anywhere, so the
    unwritable case runs the server as `nobody` through setpriv (skipped where that is impossible)."""
    prepare, message = BAD_STATES[case]
    root = Path(tempfile.mkdtemp(prefix=f"bad-state-{case}-"))
    try:
        root.chmod(0o755)  # reachable by `nobody` in the not_writable case
        state_dir = prepare(root)
        command = []
        if case == "not_writable" and os.geteuid() == 0:
            if not Path("/usr/bin/setpriv").exists():
                pytest.skip("running as root without setpriv: cannot make a directory unwritable")
            command = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        process = launch(state_dir, "--port", str(free_port()), "--metrics-port", "0", prefix=command)
        output, _ = process.communicate(timeout=120)
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)
    assert process.returncode == 2, output
    assert "cannot start" in output and message in output, output
    assert "Traceback" not in output
