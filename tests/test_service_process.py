"""`rebalancer-server` as operators run it: flags from the environment, health, reflection,
/metrics, SIGTERM drain with exit 0, and a clear failure on a bad state directory."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from metric_families import EXPECTED_FAMILIES
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from rebalancer_wire.v1 import rebalancer_pb2_grpc
from service_harness import TOPOLOGY, ServerThread, free_port, launch, report, skewed_loads, wait_serving

SERVICE = "rebalancer.v1.RebalancerService"


def test_process_serves_metrics_and_drains_on_sigterm(tmp_path):
    port, metrics_port = free_port(), free_port()
    env = {
        "REBALANCER_HOST": "127.0.0.1",
        "REBALANCER_PORT": str(port),
        "REBALANCER_METRICS_PORT": str(metrics_port),
        "REBALANCER_BATCH_WINDOW_MS": "1000",
        "REBALANCER_BATCH_WINDOW_WHEN": "always",  # the request below must still be waiting at SIGTERM
    }
    process = launch(tmp_path / "state", **env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, process)
            stub = rebalancer_pb2_grpc.RebalancerServiceStub(channel)
            stub.StreamLoad(iter([report("proc", skewed_loads(1), topology=TOPOLOGY)]))
            assert stub.Rebalance(pb.RebalanceRequest(deployment_id="proc"), timeout=30).committed
            # Scraped while serving: after SIGTERM the metrics endpoint closes with the drain.
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answer = next(
                reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            )
            names = {s.name for s in answer.list_services_response.service}
            assert {SERVICE, "grpc.health.v1.Health"} <= names

            # A request in flight when SIGTERM arrives (it waits 1 s for batch mates) still completes.
            future = stub.Rebalance.future(pb.RebalanceRequest(deployment_id="proc"), timeout=30)
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            assert future.result().committed
    except BaseException:
        process.kill()
        raise
    assert process.wait(timeout=30) == 0, process.stdout.read()
    for family in EXPECTED_FAMILIES:
        assert f"# TYPE {family.removesuffix('_total')}" in text, family
    assert 'rebalancer_placements_total{trigger="request"} 1.0' in text
    assert 'grpc_method="Rebalance"' in text and 'grpc_code="OK"' in text


def test_corrupt_state_database_is_a_clear_error(tmp_path):
    (tmp_path / "rebalancer.sqlite3").write_bytes(b"this is not a database" * 100)
    process = launch(tmp_path, "--port", str(free_port()), "--metrics-port", "0")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "rebalancer.sqlite3" in output and "cannot" in output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_state_dir_is_a_clear_error(tmp_path):
    tmp_path.chmod(0o500)
    process = launch(tmp_path / "state", "--port", str(free_port()), "--metrics-port", "0")
    output, _ = process.communicate(timeout=60)
    tmp_path.chmod(0o700)
    assert process.returncode == 2 and "state" in output


def test_health_not_serving_until_warm_then_not_serving_on_shutdown(tmp_path):
    server = ServerThread(str(tmp_path))
    gate = threading.Event()
    warm_up = server.server._warm_up

    async def gated_warm_up():
        await asyncio.get_running_loop().run_in_executor(None, gate.wait)
        await warm_up()

    server.server._warm_up = gated_warm_up
    threading.Thread(target=server.start, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.server.port and time.monotonic() < deadline:
        time.sleep(0.02)
    with grpc.insecure_channel(f"127.0.0.1:{server.server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                break
            except grpc.RpcError:
                time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        gate.set()
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stopper.join()


def test_large_declared_shape_is_refused_before_allocation(tmp_path):
    with ServerThread(str(tmp_path), max_tensor_elements=10_000) as server:
        loads = encode(skewed_loads(1))
        del loads.shape[:]
        loads.shape.extend([1 << 40, 1 << 20])
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Rebalance(pb.RebalanceRequest(loads=loads, topology=TOPOLOGY))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        big = pb.Topology(num_layers=1000, num_experts=256, num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
        summary = server.stub.StreamLoad(iter([pb.StreamLoadRequest(deployment_id="big", topology=big)]))
        assert summary.rejected == 1 and summary.rejections[0].field == "topology.num_layers"
