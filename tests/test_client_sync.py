"""The synchronous client against the real server in-process: every method and every error mapping."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from client_helpers import assert_valid_maps, library_phy2log
from grpc_health.v1 import health_pb2
from rebalancer_client import RebalancerClient, field_violations
from service_harness import SERVICE_NAME, real_service

TOPOLOGY = {"num_replicas": 6, "num_groups": 1, "num_nodes": 1, "num_gpus": 3}


@pytest.fixture(scope="module")
def server():
    with real_service(token="secret") as running:
        yield running


@pytest.fixture
def client(server):
    with RebalancerClient(server.target, timeout=5.0, token="secret") as client:
        yield client


def test_health_reports_each_state(server, client):
    assert client.wait_ready(5)
    assert client.health() == "SERVING"
    assert client.health(SERVICE_NAME) == "SERVING"
    assert client.health("no.such.Service") == "SERVICE_UNKNOWN"
    server.set_health("draining", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert client.health("draining") == "NOT_SERVING"


def test_health_of_an_unreachable_server_raises_unavailable():
    with RebalancerClient("127.0.0.1:1", timeout=1.0) as client:
        assert not client.wait_ready(0.2)
        with pytest.raises(grpc.RpcError) as info:
            client.health()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_inline_rebalance_returns_numpy_maps_and_sends_the_token(client):
    # The server requires the token, so an answer at all means it was sent; the maps are the library's on
    # the same seed and policy, so the options reached the solver.
    loads = np.array([[5, 1, 1, 1], [1, 2, 3, 9]], dtype=np.float32)
    placement = client.rebalance(loads, num_replicas=6, num_gpus=3, seed=3, policy="global")
    assert placement.version == 0 and not placement.committed and placement.deployment_id == ""
    assert_valid_maps(placement.phy2log, placement.log2phy, placement.logcnt, 4)
    assert np.array_equal(placement.phy2log, library_phy2log(loads, 6, 3, seed=3, policy="global"))
    assert placement.stats.device == "cpu" and placement.stats.policies == {"global": 2}
    assert placement.topology.num_replicas == 6 and placement.topology.num_gpus == 3


@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_missing_or_wrong_token_is_unauthenticated_but_health_stays_open(server, token):
    with RebalancerClient(server.target, timeout=5.0, token=token) as client:
        assert client.health() == "SERVING"
        for call in (
            lambda: client.rebalance(np.ones((2, 4)), num_replicas=6, num_gpus=3),
            lambda: client.list_deployments(),
            lambda: client.report_loads("no-token", [np.ones((2, 4))], topology=TOPOLOGY),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_torch_tensors_are_accepted_without_the_client_importing_torch(client):
    torch = pytest.importorskip("torch")
    placement = client.rebalance(torch.rand(2, 4, dtype=torch.bfloat16), num_replicas=4, num_gpus=2)
    assert placement.phy2log.shape == (2, 4)


def test_bad_input_is_refused_before_sending(server, client):
    sent = server.rpcs_started("Rebalance")
    with pytest.raises(ValueError, match="finite"):
        client.rebalance(np.full((2, 8), np.nan, dtype=np.float32), num_replicas=8, num_gpus=2)
    with pytest.raises(ValueError, match="num_replicas and num_gpus are required"):
        client.rebalance(np.ones((2, 8)))
    assert server.rpcs_started("Rebalance") == sent


def test_server_invalid_argument_keeps_code_details_and_field_violations(client):
    # A topology the client cannot judge alone (num_replicas missing on the wire) reaches the server.
    from rebalancer_client.messages import rebalance_request

    request = rebalance_request(np.ones((2, 4)), num_replicas=4, num_gpus=2)
    request.ClearField("topology")
    with pytest.raises(grpc.RpcError) as info:
        client.send_rebalance(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = field_violations(info.value)
    assert field == "topology" and description and description in info.value.details()


def test_deployment_lifecycle_reports_add_up_then_rebalance_get_list_delete(server, client):
    ones = np.ones((2, 4), dtype=np.int64)
    first = client.report_loads("life", [ones, ones], topology=TOPOLOGY, rank=0)
    second = client.report_loads("life", [([1], np.full((1, 4), 2.0)), {"loads": ones, "step": 7}], rank=1)
    assert (first.accepted, first.rejected, second.accepted) == (2, 0, 2)
    assert server.window_loads("life").tolist() == [[3, 3, 3, 3], [5, 5, 5, 5]]

    placement = client.rebalance(deployment_id="life")
    assert placement.committed and placement.version == 1 and placement.deployment_id == "life"
    dry = client.rebalance(deployment_id="life", dry_run=True)
    assert not dry.committed and client.get_placement("life").version == 1

    [info] = [d for d in client.list_deployments() if d.deployment_id == "life"]
    assert info.version == 1 and info.reports == 4 and info.topology.num_gpus == 3
    assert client.delete_deployment("life") is True
    assert client.delete_deployment("life") is False


def test_stale_base_version_is_failed_precondition(client):
    client.report_loads("stale", [np.ones((1, 4))], topology=TOPOLOGY)
    client.rebalance(deployment_id="stale")
    assert client.rebalance(deployment_id="stale", base_version=1).version == 2
    with pytest.raises(grpc.RpcError) as info:
        client.rebalance(deployment_id="stale", base_version=1)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_unknown_deployment_is_not_found(client):
    for call in (lambda: client.get_placement("ghost"), lambda: client.rebalance(deployment_id="ghost")):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_rejected_reports_are_counted_in_band(client):
    summary = client.report_loads("bad-reports", [np.ones((1, 4)), np.ones((1, 5))], topology=TOPOLOGY)
    assert (summary.accepted, summary.rejected) == (1, 1)
    assert summary.rejections[0][:2] == (1, "loads.shape")


def test_a_bad_report_in_the_stream_raises_value_error_not_cancelled(client):
    def reports():
        yield np.ones((1, 4))
        yield np.full((1, 4), -1.0)

    with pytest.raises(ValueError, match=r"reports\[1\] must be non-negative"):
        client.report_loads("bad-stream", reports(), topology=TOPOLOGY)


def test_watch_yields_the_current_version_then_pushes(client):
    client.report_loads("watched", [np.ones((1, 4))], topology=TOPOLOGY)
    client.rebalance(deployment_id="watched")
    versions = []
    first = threading.Event()

    def collect():
        for placement in client.watch("watched", after_version=0, timeout=10):
            versions.append(placement.version)
            first.set()
            if len(versions) == 2:
                break

    reader = threading.Thread(target=collect)
    reader.start()
    assert first.wait(10)
    client.rebalance(deployment_id="watched")
    reader.join(10)
    assert versions == [1, 2]
