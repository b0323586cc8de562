"""On a live server: every family exists from the start, and each moves with the traffic that
should move it (solve latency, batch sizes, telemetry outcomes, placements, gRPC codes and messages)."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from metric_families import EXPECTED_FAMILIES
from prometheus_client import generate_latest
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from service_harness import TOPOLOGY, report, skewed_loads

SERVICE = "rebalancer.v1.RebalancerService"


def test_every_family_is_exported_from_the_start(server):
    text = generate_latest(server.server.metrics.registry).decode()
    for family, spec in EXPECTED_FAMILIES.items():
        base = family.removesuffix("_total")
        assert re.search(rf"^# TYPE {base}(_total)? {spec.type}$", text, re.MULTILINE), family


def test_solver_and_batch_metrics_move(server):
    solves = server.metric("rebalancer_solve_duration_seconds_count", device="cpu", path="torch")
    layers = server.metric("rebalancer_batch_layers_sum")
    server.stub.Rebalance(pb.RebalanceRequest(loads=encode(skewed_loads(1)), topology=TOPOLOGY))
    assert server.metric("rebalancer_solve_duration_seconds_count", device="cpu", path="torch") == solves + 1
    assert server.metric("rebalancer_batch_layers_sum") == layers + 4
    assert server.metric("rebalancer_batch_requests_count") >= 2  # warm-up and this one
    assert server.metric("rebalancer_queue_depth") == 0


def test_deployment_metrics_move(server):
    stub = server.stub
    stub.StreamLoad(
        iter([report("metered", skewed_loads(2), topology=TOPOLOGY), report("metered", skewed_loads(2)[:1])])
    )
    assert server.metric("rebalancer_telemetry_reports_total", deployment="metered", outcome="accepted") == 1
    assert server.metric("rebalancer_telemetry_reports_total", deployment="metered", outcome="rejected") == 1
    stub.Rebalance(pb.RebalanceRequest(deployment_id="metered"))
    stub.StreamLoad(iter([report("metered", skewed_loads(3))]))
    second = stub.Rebalance(pb.RebalanceRequest(deployment_id="metered")).placement
    assert server.metric("rebalancer_replicas_moved_total", deployment="metered") == second.stats.replicas_moved
    assert server.metric("rebalancer_balancedness", deployment="metered", placement="proposed") == pytest.approx(
        second.stats.balancedness_after
    )
    assert server.metric("rebalancer_imbalance_ratio", deployment="metered") == pytest.approx(
        second.stats.imbalance_after
    )
    assert server.metric("rebalancer_deployments") >= 1


def test_grpc_server_metrics_count_codes_and_messages(server):
    labels = dict(grpc_type="unary", grpc_service=SERVICE, grpc_method="GetPlacement")
    with pytest.raises(grpc.RpcError):
        server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="absent"))
    with pytest.raises(grpc.RpcError):
        server.stub.GetPlacement(pb.GetPlacementRequest(deployment_id="bad id"))
    assert server.metric("grpc_server_started_total", **labels) == 2
    assert server.settled_metric("grpc_server_handled_total", 1, **labels, grpc_code="NOT_FOUND") == 1
    assert server.settled_metric("grpc_server_handled_total", 1, **labels, grpc_code="INVALID_ARGUMENT") == 1
    assert server.settled_metric("grpc_server_handling_seconds_count", 2, **labels) == 2
    stream = dict(grpc_type="client_stream", grpc_service=SERVICE, grpc_method="StreamLoad")
    received = server.metric("grpc_server_msg_received_total", **stream)
    sent = server.metric("grpc_server_msg_sent_total", **stream)
    handled = server.metric("grpc_server_handled_total", **stream, grpc_code="OK")
    loads = np.zeros((4, 16), np.float32)
    server.stub.StreamLoad(iter([report("msgs", loads, topology=TOPOLOGY)] + [report("msgs", loads)] * 4))
    assert server.metric("grpc_server_msg_received_total", **stream) == received + 5
    assert server.settled_metric("grpc_server_msg_sent_total", sent + 1, **stream) == sent + 1
    assert server.settled_metric("grpc_server_handled_total", handled + 1, **stream, grpc_code="OK") == handled + 1
