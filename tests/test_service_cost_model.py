"""A deployment's cost model: registered with its topology, kept across restarts, used by every plan of
the deployment (requests and the server's own), and overridden field by field by a request."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from rebalancer_wire.cost import CostModel
from rebalancer_wire.topology import Topology
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from service_harness import TOPOLOGY, ServerThread, field_violations, library, maps_of, report, skewed_loads

DEPLOYMENT_COST = pb.TransferCost(bytes_per_expert=2e6, intra_node_bandwidth=4e9, inter_node_bandwidth=1e9)


def topology_with_cost(cost: pb.TransferCost = DEPLOYMENT_COST) -> pb.Topology:
    topology = pb.Topology()
    topology.CopyFrom(TOPOLOGY)
    topology.cost_model.CopyFrom(cost)
    return topology


def register(server: ServerThread, deployment_id: str, loads: np.ndarray) -> None:
    """Register with the first report (topology with its cost model), then commit a first placement."""
    server.stub.StreamLoad(iter([report(deployment_id, loads, topology=topology_with_cost())]))
    server.stub.Rebalance(pb.RebalanceRequest(deployment_id=deployment_id, options=pb.SolveOptions(fresh=True)))


def priced(loads: np.ndarray, prev: np.ndarray, cost: CostModel):
    return library(loads, prev=prev, cost_model=cost)


def test_the_registered_cost_prices_plans_and_survives_a_restart(tmp_path):
    first = skewed_loads(41)
    with ServerThread(str(tmp_path)) as server:
        register(server, "priced", first)
        prev = server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="priced")).placement
        listed = server.stub.ListDeployments(pb.ListDeploymentsRequest()).deployments[0]
        assert Topology.from_proto(listed.topology).cost_model == CostModel(2_000_000, 4e9, 1e9)
    drifted = skewed_loads(42)
    with ServerThread(str(tmp_path)) as server:
        request = pb.RebalanceRequest(deployment_id="priced", loads=report("priced", drifted).loads)
        stats = server.stub.Rebalance(request).placement.stats
    expected = priced(drifted, maps_of(prev)[0].astype(np.int64), CostModel(2_000_000, 4e9, 1e9))
    assert stats.replicas_moved > 0
    assert stats.moved_bytes == pytest.approx(expected.moved_bytes)
    assert stats.estimated_transfer_seconds == pytest.approx(expected.estimated_transfer_seconds)


def test_a_request_overrides_the_deployment_cost_field_by_field(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        register(server, "override", skewed_loads(43))
        prev = server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="override")).placement
        drifted = skewed_loads(44)
        base = pb.RebalanceRequest(deployment_id="override", loads=report("override", drifted).loads)
        base.options.dry_run = True
        own = server.stub.Rebalance(base).placement.stats
        base.cost_model.bytes_per_expert = 4e6
        doubled = server.stub.Rebalance(base).placement.stats
    assert own.replicas_moved == doubled.replicas_moved > 0
    assert doubled.moved_bytes == pytest.approx(2 * own.moved_bytes)
    # The bandwidths still come from the deployment, so the estimate doubles with the bytes.
    assert doubled.estimated_transfer_seconds == pytest.approx(2 * own.estimated_transfer_seconds)
    expected = priced(drifted, maps_of(prev)[0].astype(np.int64), CostModel(2_000_000, 4e9, 1e9))
    assert own.moved_bytes == pytest.approx(expected.moved_bytes)


def test_a_conflicting_or_bad_cost_in_the_topology_is_refused(tmp_path):
    with ServerThread(str(tmp_path)) as server:
        register(server, "fixed", skewed_loads(45))
        other = pb.TransferCost(bytes_per_expert=1e6)
        conflicting = report("fixed", skewed_loads(46), topology=topology_with_cost(other))
        request = pb.RebalanceRequest(deployment_id="fixed", topology=conflicting.topology, loads=conflicting.loads)
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Rebalance(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "topology" in field_violations(refused.value)
        # Leaving the cost model out of a later topology is no conflict.
        request.topology.ClearField("cost_model")
        request.options.dry_run = True
        assert server.stub.Rebalance(request).placement.stats.replicas_moved >= 0
        bad = pb.RebalanceRequest(
            deployment_id="new", topology=topology_with_cost(pb.TransferCost(inter_node_bandwidth=0.0))
        )
        bad.loads.CopyFrom(conflicting.loads)
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Rebalance(bad)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "topology.cost_model.inter_node_bandwidth" in field_violations(refused.value)
        listed = server.stub.ListDeployments(pb.ListDeploymentsRequest()).deployments
        assert [info.deployment_id for info in listed] == ["fixed"]


def test_the_cli_registers_a_cost_model_with_the_first_report(tmp_path):
    from rebalancer_client import RebalancerClient
    from rebalancer_client.cli import main

    np.save(tmp_path / "window.npy", skewed_loads(47, layers=2, experts=4))
    with ServerThread(str(tmp_path / "state")) as server:
        flags = ["--replicas", "6", "--gpus", "3", "--bytes-per-expert", "5e6", "--target", server.target]
        assert main(["report", "cli-priced", str(tmp_path / "window.npy"), *flags]) == 0
        with RebalancerClient(server.target) as client:
            (info,) = client.list_deployments()
    assert info.topology.cost_model == CostModel(bytes_per_expert=5_000_000)
    assert info.topology.transfer_cost.inter_node_bandwidth == CostModel().inter_node_bandwidth
