"""Rebalance over the wire (SPEC §4): same maps as the library, stats filled, versions and every error path."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch
from rebalancer.solver.maps import moved_copies
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from service_harness import (
    EXPERTS,
    GPUS,
    LAYERS,
    REPLICAS,
    TOPOLOGY,
    ServerThread,
    field_violations,
    library,
    maps_of,
    report,
    skewed_loads,
    tampered_tensor,
)


def inline(loads, **options) -> pb.RebalanceRequest:
    return pb.RebalanceRequest(loads=encode(loads), topology=TOPOLOGY, options=pb.SolveOptions(**options))


def test_inline_rebalance_matches_library(server):
    loads = skewed_loads(1)
    response = server.stub.Rebalance(inline(loads, seed=7))
    expected = library(loads, seed=7)
    phy2log, log2phy, logcnt = maps_of(response.placement)
    assert np.array_equal(phy2log, expected.phy2log.numpy())
    assert np.array_equal(log2phy, expected.log2phy.numpy())
    assert np.array_equal(logcnt, expected.logcnt.numpy())
    assert not response.committed and response.placement.version == 0
    stats = response.placement.stats
    assert stats.balancedness_after == pytest.approx(float(expected.balancedness.mean()))
    assert stats.imbalance_after == pytest.approx(float((1 / expected.balancedness).mean()))
    assert stats.device == "cpu" and stats.solver_path and stats.solve_seconds > 0
    assert sum(p.layers for p in stats.policies) == LAYERS
    assert stats.batch_layers >= LAYERS and stats.batch_requests >= 1


def test_inline_prev_placement_reports_moves(server):
    loads, drifted = skewed_loads(2), skewed_loads(3)
    prev = maps_of(server.stub.Rebalance(inline(loads)).placement)[0]
    request = inline(drifted)
    request.prev_phy2log.CopyFrom(encode(prev))
    stats = server.stub.Rebalance(request).placement.stats
    expected = library(drifted, prev=prev)
    assert list(stats.moved_per_layer) == expected.moved_copies.tolist()
    assert stats.replicas_moved == int(expected.moved_copies.sum())
    assert stats.balancedness_before == pytest.approx(float(expected.balancedness_before.mean()))


def test_deployment_rebalance_commits_versions(server):
    stub = server.stub
    loads = skewed_loads(4)
    first = stub.Rebalance(pb.RebalanceRequest(deployment_id="versions", loads=encode(loads), topology=TOPOLOGY))
    assert first.committed and first.placement.version == 1 and first.placement.trigger == "request"
    dry = stub.Rebalance(
        pb.RebalanceRequest(deployment_id="versions", loads=encode(loads), options=pb.SolveOptions(dry_run=True))
    )
    assert not dry.committed and dry.placement.version == 0
    second = stub.Rebalance(pb.RebalanceRequest(deployment_id="versions", loads=encode(loads), base_version=1))
    assert second.placement.version == 2
    expected = library(loads, prev=maps_of(first.placement)[0])
    assert np.array_equal(maps_of(second.placement)[0], expected.phy2log.numpy())
    got = stub.GetPlacement(pb.GetPlacementRequest(deployment_id="versions")).placement
    assert got.version == 2 and np.array_equal(maps_of(got)[0], maps_of(second.placement)[0])
    assert server.metric("rebalancer_placements_total", trigger="request") >= 2


def test_stale_base_version_is_failed_precondition(server):
    stub = server.stub
    stub.Rebalance(pb.RebalanceRequest(deployment_id="stale", loads=encode(skewed_loads(5)), topology=TOPOLOGY))
    with pytest.raises(grpc.RpcError) as error:
        stub.Rebalance(pb.RebalanceRequest(deployment_id="stale", loads=encode(skewed_loads(5)), base_version=7))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.GetPlacement(pb.GetPlacementRequest(deployment_id="stale")).placement.version == 1


def test_fresh_plan_still_counts_moves_from_placement_in_force(server):
    stub = server.stub
    loads = skewed_loads(6)
    first = stub.Rebalance(pb.RebalanceRequest(deployment_id="fresh", loads=encode(loads), topology=TOPOLOGY))
    drifted = skewed_loads(16)
    fresh = stub.Rebalance(
        pb.RebalanceRequest(deployment_id="fresh", loads=encode(drifted), options=pb.SolveOptions(fresh=True))
    )
    assert np.array_equal(maps_of(fresh.placement)[0], library(drifted).phy2log.numpy())
    prev, new = (torch.tensor(maps_of(p.placement)[0]) for p in (first, fresh))
    assert list(fresh.placement.stats.moved_per_layer) == moved_copies(prev, new, EXPERTS, GPUS).tolist()
    assert fresh.placement.stats.balancedness_before > 0


def test_rebalance_on_window_uses_telemetry(server):
    stub = server.stub
    loads = skewed_loads(8)
    summary = stub.StreamLoad(iter([report("windowed", loads, topology=TOPOLOGY), report("windowed", loads)]))
    assert summary.accepted == 2
    response = stub.Rebalance(pb.RebalanceRequest(deployment_id="windowed"))
    assert np.array_equal(maps_of(response.placement)[0], library(2 * loads).phy2log.numpy())


def test_deployment_without_telemetry_is_failed_precondition(server):
    summary = server.stub.StreamLoad(iter([report("x", skewed_loads(0)[:0], topology=TOPOLOGY)]))
    assert summary.rejected == 1 and "x" not in server.server.registry.deployments  # refused: registers nothing
    # Registered by a plan on inline loads: a placement, but no window.
    server.stub.Rebalance(pb.RebalanceRequest(deployment_id="x", topology=TOPOLOGY, loads=encode(skewed_loads(0))))
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Rebalance(pb.RebalanceRequest(deployment_id="x"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_unknown_deployment_is_not_found(server):
    for call, request in (
        (server.stub.Rebalance, pb.RebalanceRequest(deployment_id="nobody")),
        (server.stub.GetPlacement, pb.GetPlacementRequest(deployment_id="nobody")),
    ):
        with pytest.raises(grpc.RpcError) as error:
            call(request)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        next(iter(server.stub.WatchPlacement(pb.WatchPlacementRequest(deployment_id="nobody"))))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def _bad(**changes) -> pb.RebalanceRequest:
    request = inline(skewed_loads(9))
    for name, value in changes.items():
        if name == "topology":
            request.topology.CopyFrom(
                pb.Topology(
                    **{
                        **dict(
                            num_layers=LAYERS,
                            num_experts=EXPERTS,
                            num_replicas=REPLICAS,
                            num_groups=4,
                            num_nodes=2,
                            num_gpus=4,
                        ),
                        **value,
                    }
                )
            )
        elif name == "options":
            request.options.CopyFrom(pb.SolveOptions(**value))
        elif name == "loads":
            request.loads.CopyFrom(value)
        elif name == "no_topology":
            request.ClearField("topology")
        elif name == "prev_phy2log":
            request.prev_phy2log.CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


NAN_LOADS = skewed_loads(9)
NAN_LOADS[1, 2] = np.nan
NEGATIVE_LOADS = skewed_loads(9)
NEGATIVE_LOADS[0, 5] = -1
BAD_REQUESTS = {
    "nan": (_bad(loads=encode(NAN_LOADS)), "loads.data"),
    "inf": (_bad(loads=encode(np.full((LAYERS, EXPERTS), np.inf, np.float32))), "loads.data"),
    "negative": (_bad(loads=encode(NEGATIVE_LOADS)), "loads.data"),
    "byte_count": (_bad(loads=tampered_tensor(skewed_loads(9), data=b"\0" * 10)), "loads.data"),
    "dtype": (_bad(loads=tampered_tensor(skewed_loads(9), dtype=99)), "loads.dtype"),
    "one_dim": (_bad(loads=encode(np.ones(EXPERTS, np.float32))), "loads.shape"),
    "huge_shape": (_bad(loads=tampered_tensor(skewed_loads(9), shape=[10**6, 10**6])), "loads.shape"),
    "no_loads": (pb.RebalanceRequest(), "loads"),
    "no_topology": (_bad(no_topology=True), "topology"),
    "replicas_below_experts": (_bad(topology={"num_replicas": 8, "num_gpus": 4}), "topology.num_replicas"),
    "replicas_not_divisible": (_bad(topology={"num_gpus": 3, "num_nodes": 1}), "topology.num_gpus"),
    # Groups and nodes are checked where the plan is hierarchical (the groups split over the nodes).
    "groups": (_bad(topology={"num_groups": 6}), "topology.num_groups"),
    "nodes": (_bad(topology={"num_groups": 8, "num_nodes": 8}), "topology.num_nodes"),
    "zero_gpus": (_bad(topology={"num_gpus": 0}), "topology.num_gpus"),
    "layers_mismatch": (_bad(topology={"num_layers": LAYERS + 1}), "topology.num_layers"),
    "candidates": (_bad(options={"num_candidates": 10**6}), "options.num_candidates"),
    "policy": (_bad(options={"policy": 42}), "options.policy"),
    "balance_tolerance": (_bad(options={"balance_tolerance": 1.5}), "options.balance_tolerance"),
    "locality_tolerance": (_bad(options={"locality_tolerance": -0.1}), "options.locality_tolerance"),
    "prev_shape": (_bad(prev_phy2log=encode(np.zeros((1, REPLICAS), np.int64))), "prev_phy2log.shape"),
    "prev_range": (_bad(prev_phy2log=encode(np.full((LAYERS, REPLICAS), EXPERTS, np.int64))), "prev_phy2log.data"),
    "prev_uncovered": (_bad(prev_phy2log=encode(np.zeros((LAYERS, REPLICAS), np.int64))), "prev_phy2log.data"),
    "deployment_id": (_bad(deployment_id="bad id!"), "deployment_id"),
    "base_version_inline": (_bad(base_version=3), "base_version"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_naming_the_field(server, case):
    request, field = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Rebalance(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error.value), field_violations(error.value)


def test_bad_input_never_kills_the_server(server):
    for request, _ in BAD_REQUESTS.values():
        with pytest.raises(grpc.RpcError):
            server.stub.Rebalance(request)
    assert server.stub.Rebalance(inline(skewed_loads(10))).placement.stats.balancedness_after > 0


def test_queue_full_is_resource_exhausted(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=300, batch_window_when="always", max_queue=2) as running:
        codes, lock = [], threading.Lock()

        def call(seed):
            try:
                running.stub.Rebalance(inline(skewed_loads(seed)), timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=call, args=(seed,)) for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
        assert codes.count(grpc.StatusCode.OK) >= 2


def test_expired_request_is_dropped_not_solved(tmp_path):
    with ServerThread(str(tmp_path), batch_window_ms=400, batch_window_when="always") as running:
        calls = running.metric("rebalancer_solver_calls_total", path="torch")
        with pytest.raises(grpc.RpcError) as error:
            running.stub.Rebalance(inline(skewed_loads(11)), timeout=0.1)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        running.stub.Rebalance(inline(skewed_loads(12)), timeout=30)  # the worker is alive and did one call
        assert running.metric("rebalancer_solver_calls_total", path="torch") == calls + 1
