"""Limits a hostile or careless client meets: memory budget, admission, lanes, cancellation, statuses.

* soft state lives within its budget: a window is allocated only for an accepted report, past the
  budget or the deployment cap a new id is refused (RESOURCE_EXHAUSTED, in-band in a stream) and
  nothing of it remains; a failed registration leaves no row behind, so the id can be used later;
  a restart whose budget cannot hold every window still serves and allocates windows on demand;
* every solve is costed first: past the per-job limits RESOURCE_EXHAUSTED says what to lower, and a
  topology that could never be solved or returned is INVALID_ARGUMENT naming the field;
* a long admitted solve does not hold up a small one (separate lane); a deadline or a cancel stops it
  between rounds;
* loads that could overflow a window or the stats are refused; stats never become NaN;
* undecodable messages are INVALID_ARGUMENT after authentication; racing deletes and listings never
  give UNKNOWN; an unexpected failure is INTERNAL without its text.

Time bounds in these tests are generous (a busy 2-core machine); the figures are in
benchmarks/hostile_bench.py.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from rebalancer.service.admission import JobLimits, Shape, placement_message_bound
from rebalancer.service.budget import StateLedger
from rebalancer.service.errors import ResourceExhausted
from rebalancer.service.metrics import Metrics
from rebalancer.service.model import Topology
from rebalancer.service.telemetry import DeploymentWindow, WindowOverflow
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from service_harness import EXPERTS, LAYERS, TOPOLOGY, ServerThread, field_violations, report, skewed_loads

# The published DeepSeek loops on one expert with 2**16 slots of 2,048 GPUs: a 30-byte request whose solve is
# 2**17 sequential steps (about 5 s here, estimated about as long), cancellable between steps; the servers that
# take it raise the per-job limit to LONG_LIMIT_S.
LONG = pb.Topology(num_layers=1, num_experts=1, num_replicas=2**16, num_groups=1, num_nodes=1, num_gpus=2048)
LONG_LIMIT_S = 60.0
LONG_REQUEST = pb.RebalanceRequest(
    loads=encode(np.ones((1, 1), np.float32)), topology=LONG, options=pb.SolveOptions(policy=pb.POLICY_DEEPSEEK)
)


def dropped(server: ServerThread) -> float:
    return sum(server.metric("rebalancer_dropped_requests_total", reason=r) for r in ("cancelled", "deadline"))


def wait_for(condition, timeout: float = 30.0) -> float:
    """Poll until `condition` holds; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic() - start


def solving(server: ServerThread, lane: str = "_large") -> bool:
    return bool(getattr(server.server.batcher, lane).current)


# ---- soft-state budget ---------------------------------------------------------------------------------


def test_new_ids_past_the_state_budget_are_refused_in_band_and_leave_nothing(tmp_path):
    with ServerThread(str(tmp_path), memory_budget_mb=1) as server:  # the floor: 64 MiB, 40 % for state
        ledger = server.server.registry.ledger
        stream = [report(f"flood-{i}", skewed_loads(i), topology=TOPOLOGY) for i in range(400)]
        summary = server.stub.StreamLoad(iter(stream), timeout=60)
        accepted = len(server.server.registry.deployments)
        assert summary.accepted == accepted and summary.rejected == 400 - accepted
        assert 0 < accepted < 400
        assert ledger.used <= ledger.limit
        assert server.metric("rebalancer_state_bytes") == ledger.used
        reasons = {(r.field, r.reason.split(":")[0]) for r in summary.rejections}
        assert reasons == {("deployment_id", "soft-state memory budget is full")}
        rows, _ = server.server.store._executor.submit(server.server.store._load).result()
        assert set(rows) == set(server.server.registry.deployments)  # no row for a refused id
        # Deleting frees room for a new one.
        server.stub.DeleteDeployment(pb.DeleteDeploymentRequest(deployment_id="flood-0"))
        retry = server.stub.StreamLoad(iter([report("flood-new", skewed_loads(1), topology=TOPOLOGY)]), timeout=10)
        assert retry.accepted == 1


def test_deployment_cap_refuses_registration_by_request(tmp_path):
    with ServerThread(str(tmp_path), max_deployments=2) as server:
        for name in ("a", "b"):
            server.stub.StreamLoad(iter([report(name, skewed_loads(1), topology=TOPOLOGY)]))
        request = pb.RebalanceRequest(deployment_id="c", topology=TOPOLOGY, loads=encode(skewed_loads(2)))
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Rebalance(request)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-deployments" in error.value.details()
        assert sorted(server.server.registry.deployments) == ["a", "b"]


def test_failed_window_allocation_leaves_no_half_registered_id(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        windows = server.server.windows
        real_add, failures = windows._add, [1]

        def failing_add(*args):
            if failures:
                failures.pop()
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 320 MB")
            return real_add(*args)

        windows._add = failing_add
        first = server.stub.StreamLoad(iter([report("d", skewed_loads(1), topology=TOPOLOGY)]))
        assert (first.accepted, first.rejected) == (0, 1)
        assert "DefaultCPUAllocator" not in first.rejections[0].reason  # no internal text
        assert "d" not in server.server.registry.deployments
        assert server.server.registry.ledger.used == 0
        again = server.stub.StreamLoad(iter([report("d", skewed_loads(1), topology=TOPOLOGY)]))
        assert (again.accepted, again.rejected) == (1, 0)  # no IntegrityError: the row was removed


def test_restart_over_budget_serves_and_allocates_windows_lazily(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        for i in range(3):
            server.stub.StreamLoad(iter([report(f"d{i}", skewed_loads(i), topology=TOPOLOGY)]))
            server.stub.Rebalance(pb.RebalanceRequest(deployment_id=f"d{i}"))
    # A budget whose state share holds the deployments' placements but only one window.
    with ServerThread(str(tmp_path), window=4096, history_intervals=0, memory_budget_mb=1) as server:
        registry = server.server.registry
        window = server.server.windows.window_bytes(registry.deployments["d0"].topology)
        registry.ledger.limit = registry.ledger.used + window + window // 2
        for i in range(3):
            placement = server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id=f"d{i}")).placement
            assert placement.version == 1
        assert server.server.windows.reports("d0") == 0  # nothing allocated at start
        taken = [server.stub.StreamLoad(iter([report(f"d{i}", skewed_loads(i))])).accepted for i in range(3)]
        assert taken == [1, 0, 0]
        assert server.stub.Rebalance(pb.RebalanceRequest(deployment_id="d0")).placement.version == 2


def test_refused_or_dry_run_plan_for_a_new_id_registers_nothing(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        loads = encode(skewed_loads(1))
        costly = pb.RebalanceRequest(
            deployment_id="new", topology=TOPOLOGY, loads=loads, options=pb.SolveOptions(num_candidates=4096)
        )
        limits = server.server.batcher.limits
        server.server.batcher.limits = JobLimits(1 << 20, 0.001, 1 << 20, 0.001, "cpu")  # nothing fits
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Rebalance(costly)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        server.server.batcher.limits = limits
        dry = pb.RebalanceRequest(
            deployment_id="new", topology=TOPOLOGY, loads=loads, options=pb.SolveOptions(dry_run=True)
        )
        assert not server.stub.Rebalance(dry).committed
        assert "new" not in server.server.registry.deployments
        committed = pb.RebalanceRequest(deployment_id="new", topology=TOPOLOGY, loads=loads)
        assert server.stub.Rebalance(committed).placement.version == 1


def test_state_ledger_refuses_past_its_limit_with_advice():
    ledger = StateLedger(1000, 10, Metrics())
    ledger.charge(600, "a")
    with pytest.raises(ResourceExhausted) as error:
        ledger.charge(500, "b")
    assert "--memory-budget-mb" in str(error.value)
    ledger.release(600)
    ledger.charge(500, "b")
    assert ledger.used == 500


# ---- admission and validation limits --------------------------------------------------------------------


LIMITS = JobLimits(
    max_job_bytes=256 * 2**20,
    max_job_seconds=30.0,
    small_job_bytes=64 * 2**20,
    small_job_seconds=1.0,
    device_type="cpu",
)


def test_refusal_names_the_largest_candidate_count_that_fits():
    shape = Shape(58, 256, 288, 8, 4, 32, candidates=4096)
    with pytest.raises(ResourceExhausted) as error:
        LIMITS.check(shape)
    assert "lower options.num_candidates to at most" in str(error.value)
    most = int(str(error.value).rsplit(" ", 1)[1])
    assert 1 <= most < 4096
    LIMITS.check(Shape(58, 256, 288, 8, 4, 32, candidates=most))
    with pytest.raises(ResourceExhausted):
        LIMITS.check(Shape(58, 256, 288, 8, 4, 32, candidates=most + 1))


def test_costs_grow_with_every_dimension():
    base = Shape(8, 64, 96, 4, 2, 8, candidates=4)
    cost = LIMITS.cost(base)
    for field, value in (("num_layers", 16), ("num_replicas", 192), ("candidates", 16), ("history_intervals", 8)):
        bigger = LIMITS.cost(Shape(**{**base.__dict__, field: value}))
        assert bigger.peak_bytes >= cost.peak_bytes and bigger.work_seconds >= cost.work_seconds, field
        assert (bigger.peak_bytes, bigger.work_seconds) != (cost.peak_bytes, cost.work_seconds), field


def test_small_layers_are_charged_their_repartition_and_count_vector_candidates():
    """Small layers get more work than their size says: every count vector as a candidate (12 experts on
    15 slots: 364 more) and, with 3 slots per GPU, the three-GPU repartition (8 GPUs: 52,920 scored
    elements a row and round). 4,000 such layers were admitted at an estimated 0.2 s and ran 28 s."""
    repartitioned = Shape(4000, 12, 24, 1, 1, 8, candidates=4)
    with pytest.raises(ResourceExhausted):
        LIMITS.check(repartitioned)
    tabled = LIMITS.cost(Shape(4000, 12, 15, 1, 1, 5, candidates=4))
    assert tabled.peak_bytes >= 4000 * (4 + 364) * 15 * 8  # the candidates' maps alone
    no_table = LIMITS.cost(Shape(4000, 12, 15, 1, 1, 5, candidates=4, policy="deepseek"))
    assert tabled.work_seconds > 10 * no_table.work_seconds


def test_topology_whose_solve_can_never_be_admitted_is_invalid(tmp_path):
    huge = pb.Topology(num_layers=1, num_experts=1, num_replicas=2**22, num_groups=1, num_nodes=1, num_gpus=2048)
    with ServerThread(str(tmp_path)) as server:
        for request in (
            pb.RebalanceRequest(loads=encode(np.ones((1, 1), np.float32)), topology=huge),
            pb.RebalanceRequest(deployment_id="huge", loads=encode(np.ones((1, 1), np.float32)), topology=huge),
        ):
            with pytest.raises(grpc.RpcError) as error:
                server.stub.Rebalance(request, timeout=10)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "topology.num_replicas" in field_violations(error.value)
        summary = server.stub.StreamLoad(iter([report("huge", np.ones((1, 1), np.float32), topology=huge)]))
        assert [r.field for r in summary.rejections] == ["topology.num_replicas"]
        assert "huge" not in server.server.registry.deployments


def test_topology_whose_placement_cannot_fit_a_message_is_invalid(tmp_path):
    wide = Topology(num_layers=16, num_experts=256, num_replicas=2048, num_groups=1, num_nodes=1, num_gpus=64)
    assert placement_message_bound(wide) > 1 << 20
    with ServerThread(str(tmp_path), max_message_bytes=1 << 20) as server:
        loads = encode(skewed_loads(0, layers=16, experts=256))
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Rebalance(pb.RebalanceRequest(deployment_id="wide", topology=wide.to_proto(), loads=loads))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "message limit" in field_violations(error.value)["topology.num_replicas"]
        assert "wide" not in server.server.registry.deployments  # nothing committed, nothing registered


def test_placement_that_would_not_fit_a_response_is_never_committed(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        request = pb.RebalanceRequest(deployment_id="fit", topology=TOPOLOGY, loads=encode(skewed_loads(1)))
        assert server.stub.Rebalance(request).placement.version == 1
        registry = server.server.registry
        registry.max_message_bytes = 2048  # below this placement's message: as if validation had missed it
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Rebalance(pb.RebalanceRequest(deployment_id="fit", loads=encode(skewed_loads(2))))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "nothing was committed" in error.value.details()
        assert registry.deployments["fit"].version == 1
        rows = server.server.store._executor.submit(server.server.store._load).result()[1]
        assert rows["fit"].version == 1
        assert server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="fit")).placement.version == 1


def test_candidates_past_the_job_budget_are_resource_exhausted(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        request = pb.RebalanceRequest(
            loads=encode(skewed_loads(0, layers=64, experts=256)),
            topology=pb.Topology(
                num_layers=64, num_experts=256, num_replicas=512, num_groups=8, num_nodes=4, num_gpus=32
            ),
            options=pb.SolveOptions(num_candidates=4096),
        )
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Rebalance(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "lower options.num_candidates to at most" in error.value.details()


# ---- lanes and cancellation -----------------------------------------------------------------------------


def test_small_request_is_not_held_up_by_a_long_solve_which_a_cancel_stops(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=0, max_job_seconds=LONG_LIMIT_S) as server:
        long_solve = server.stub.Rebalance.future(LONG_REQUEST, timeout=120)
        wait_for(lambda: solving(server))
        started = time.monotonic()
        small = pb.RebalanceRequest(loads=encode(skewed_loads(1)), topology=TOPOLOGY)
        assert server.stub.Rebalance(small, timeout=30).placement.stats.balancedness_after > 0
        assert time.monotonic() - started < 5.0  # the long solve takes about 5 s alone
        assert not long_solve.done()
        long_solve.cancel()
        wait_for(lambda: not solving(server), timeout=5.0)  # stopped between rounds, long before its end
        assert dropped(server) == 1


def adversarial_request(layers: int = 10, experts: int = 256, replicas: int = 1024) -> pb.RebalanceRequest:
    """A placement in force with the hottest experts all on the first GPUs (256 experts on 1,024 slots of 32
    GPUs): the copy moves cannot balance any layer, so every one takes the fresh plan and its pull-back,
    O(R^3) per layer (about 1.7 s here for 10 layers, 5.7x the 0.30 s admission expects of a migration)."""
    loads = np.tile(1000.0 / np.arange(1, experts + 1) ** 1.2, (layers, 1)).astype(np.float32)
    prev = np.tile(np.concatenate([np.arange(experts), np.arange(replicas - experts) % experts]), (layers, 1))
    topology = pb.Topology(
        num_layers=layers, num_experts=experts, num_replicas=replicas, num_groups=8, num_nodes=4, num_gpus=32
    )
    return pb.RebalanceRequest(loads=encode(loads), topology=topology, prev_phy2log=encode(prev.astype(np.int64)))


def test_a_solve_far_over_its_estimate_is_stopped_at_three_times_the_limit(tmp_path):
    """Admission runs on estimates; a request that makes the solver do far more (here a placement in force
    that sends every layer to the fresh plan) holds the solver at most 3x --max-job-seconds."""
    with ServerThread(str(tmp_path), batch_window_ms=0, max_job_seconds=0.3, small_job_seconds=0.01) as server:
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Rebalance(adversarial_request(), timeout=60)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ran past 0.9 s" in error.value.details()  # stopped there, not solved to its end
        assert server.metric("rebalancer_dropped_requests_total", reason="overrun") == 1
        small = pb.RebalanceRequest(loads=encode(skewed_loads(1)), topology=TOPOLOGY)
        assert server.stub.Rebalance(small, timeout=30).placement.stats.balancedness_after > 0  # solver free again


def test_deadline_stops_a_long_solve(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=0, max_job_seconds=LONG_LIMIT_S) as server:
        warm_up_calls = server.metric("rebalancer_solver_calls_total", path="torch")
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Rebalance(LONG_REQUEST, timeout=1.0)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: not solving(server), timeout=5.0)
        assert dropped(server) == 1
        assert server.metric("rebalancer_solver_calls_total", path="torch") == warm_up_calls  # none completed


# ---- numeric safety -------------------------------------------------------------------------------------


def test_loads_that_could_overflow_are_refused(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        server.stub.StreamLoad(iter([report("n", skewed_loads(1), topology=TOPOLOGY)]))
        huge = np.full((LAYERS, EXPERTS), 1e39, np.float64)
        summary = server.stub.StreamLoad(iter([report("n", huge), report("n", skewed_loads(2))]))
        assert (summary.accepted, [r.field for r in summary.rejections]) == (1, ["loads.data"])
        inline = pb.RebalanceRequest(
            loads=encode(np.full((LAYERS, EXPERTS), np.finfo(np.float64).max)), topology=TOPOLOGY
        )
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Rebalance(inline)
        assert "loads.data" in field_violations(error.value)
        listing = server.stub.ListDeployments(pb.ListDeploymentsRequest()).deployments
        assert all(np.isfinite(d.imbalance) for d in listing)
        stats = server.stub.Rebalance(pb.RebalanceRequest(deployment_id="n")).placement.stats
        assert np.isfinite([stats.balancedness_after, stats.imbalance_after]).all()


def test_window_slot_refuses_a_report_that_would_overflow_and_stays_as_it_was():
    topology = Topology(num_layers=2, num_experts=4, num_replicas=4)
    window = DeploymentWindow(topology, capacity=4, intervals=0, device=torch.device("cpu"))
    near_max = np.full((2, 4), 3e38, np.float32)
    window.add(near_max, None, step=7)
    before = window.ring.clone()
    with pytest.raises(WindowOverflow):
        window.add(near_max, None, step=7)  # same step: adds into the same slot
    assert torch.equal(window.ring, before) and window.reports == 1
    assert torch.isfinite(window.snapshot().loads).all()


# ---- statuses -------------------------------------------------------------------------------------------


def test_delete_racing_list_and_delete_never_gives_unknown(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        codes: list[grpc.StatusCode] = []
        stop = threading.Event()

        def lister():
            while not stop.is_set():
                try:
                    server.stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=10)
                except grpc.RpcError as error:
                    codes.append(error.code())

        def deleter(name):
            try:
                server.stub.DeleteDeployment(pb.DeleteDeploymentRequest(deployment_id=name), timeout=10)
            except grpc.RpcError as error:
                codes.append(error.code())

        with ThreadPoolExecutor(6) as pool:
            listing = [pool.submit(lister) for _ in range(2)]
            for round_ in range(15):
                name = f"r{round_}"
                server.stub.StreamLoad(iter([report(name, skewed_loads(round_), topology=TOPOLOGY)]))
                list(pool.map(deleter, [name] * 4))
            stop.set()
            for future in listing:
                future.result()
        assert codes == []
        assert server.stub.ListDeployments(pb.ListDeploymentsRequest()).deployments == []


def test_undecodable_message_is_invalid_argument_only_after_the_token(tmp_path):
    with ServerThread(str(tmp_path), auth_token="sesame") as server:
        call = server.channel.unary_unary("/rebalancer.v1.RebalancerService/GetPlacement")
        garbage = b"\xff\xff\xff\xff"
        with pytest.raises(grpc.RpcError) as error:
            call(garbage, timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as error:
            call(garbage, timeout=10, metadata=[("authorization", "Bearer sesame")])
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unexpected_failure_is_internal_without_its_text(tmp_path):
    with ServerThread(str(tmp_path)) as server:

        async def broken(*args, **kwargs):
            raise KeyError("secret internal detail")

        server.server.registry.rebalance = broken
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Rebalance(pb.RebalanceRequest(loads=encode(skewed_loads(1)), topology=TOPOLOGY))
        assert error.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in error.value.details() and "KeyError" not in error.value.details()
        # In a stream the faulty report is refused in-band and the stream goes on.
        ingest, calls = server.server.registry.ingest, []

        async def broken_once(command):
            calls.append(command)
            if len(calls) == 1:
                raise KeyError("secret internal detail")
            return await ingest(command)

        server.server.registry.ingest = broken_once
        stream = [report("s", skewed_loads(i), topology=TOPOLOGY) for i in range(2)]
        summary = server.stub.StreamLoad(iter(stream))
        assert (summary.accepted, summary.rejected) == (1, 1)
        assert "secret" not in summary.rejections[0].reason


def test_a_deployment_charge_covers_its_committed_maps(tmp_path):
    from rebalancer.service.admission import DEPLOYMENT_OVERHEAD_BYTES, deployment_bytes

    with ServerThread(str(tmp_path)) as server:
        server.stub.StreamLoad(iter([report("charged", skewed_loads(61), topology=TOPOLOGY)]))
        server.stub.Rebalance(pb.RebalanceRequest(deployment_id="charged"))
        deployment = server.server.registry.deployments["charged"]
        record = deployment.current
        held = record.phy2log.nbytes + record.logcnt.nbytes + record.log2phy.nbytes
        window_copy = record.phy2log.nbytes + record.logcnt.nbytes
        assert deployment_bytes(deployment.topology) - DEPLOYMENT_OVERHEAD_BYTES >= held + window_copy
