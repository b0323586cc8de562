"""A real server's /metrics after real traffic: every family exists, values move, promtool agrees.

The server runs as a subprocess on free loopback ports, as `rebalancer-server` runs in production; the
traffic goes through the raw generated stub so the test exercises the wire, not the client's helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import yaml
from metric_families import EXPECTED_FAMILIES, SCRAPE_SERIES, exposition_name, family_of, queried_series

if find_spec("rebalancer.service.main") is None:
    pytest.skip("rebalancer.service.main does not exist yet", allow_module_level=True)

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from rebalancer_testkit.serving import free_port  # noqa: E402
from rebalancer_wire.codec import encode  # noqa: E402
from rebalancer_wire.v1 import rebalancer_pb2 as pb  # noqa: E402
from rebalancer_wire.v1.rebalancer_pb2_grpc import RebalancerServiceStub  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "rebalancer.v1.RebalancerService"
DEPLOYMENT = "live-metrics"
TRAFFIC_RPCS = 4  # drive_traffic: three Rebalance calls and one StreamLoad
LAYERS, EXPERTS = 4, 16
TOPOLOGY = pb.Topology(num_layers=LAYERS, num_experts=EXPERTS, num_replicas=24, num_groups=4, num_nodes=2, num_gpus=4)
START_TIMEOUT_S = 60.0


def server_command() -> list[str]:
    """The installed console script next to this interpreter, else the same entry point through Python."""
    script = Path(sys.executable).parent / "rebalancer-server"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from rebalancer.service.main import main; sys.exit(main())"]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def scrape_when_settled(port: int, rpcs: int, timeout_s: float = 5.0) -> str:
    """Scrape once `rpcs` service RPCs are counted as handled and none is still open.

    The interceptor counts an RPC after its handler returns, which can be just after the client saw the
    status, so an immediate scrape may miss the last call.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        text = scrape(port)
        started = total(text, "grpc_server_started_total", grpc_service=SERVICE)
        handled = total(text, "grpc_server_handled_total", grpc_service=SERVICE)
        if (handled >= rpcs and started == handled) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def samples(text: str) -> dict[str, list]:
    """Sample name -> samples, over every family of a scrape."""
    by_name: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            by_name.setdefault(sample.name, []).append(sample)
    return by_name


def total(text: str, name: str, **labels: str) -> float:
    return sum(s.value for s in samples(text).get(name, []) if labels.items() <= s.labels.items())


def wait_serving(channel: grpc.Channel, server: subprocess.Popen, log: Path) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    pytest.fail(f"server not SERVING after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def drive_traffic(stub: RebalancerServiceStub) -> None:
    """An inline Rebalance, a telemetry stream with one bad report, a deployment Rebalance, a bad request."""
    rng = np.random.default_rng(0)
    loads = rng.gamma(0.6, 100.0, size=(LAYERS, EXPERTS)).astype(np.float32)
    stub.Rebalance(pb.RebalanceRequest(loads=encode(loads), topology=TOPOLOGY), timeout=30)

    nan_report = loads.copy()
    nan_report[0, 0] = np.nan
    reports = [
        pb.StreamLoadRequest(deployment_id=DEPLOYMENT, loads=encode(loads), topology=TOPOLOGY, step=0),
        pb.StreamLoadRequest(deployment_id=DEPLOYMENT, loads=encode(loads * 1.5), step=1),
        pb.StreamLoadRequest(deployment_id=DEPLOYMENT, loads=encode(nan_report), step=2),
    ]
    summary = stub.StreamLoad(iter(reports), timeout=30)
    assert (summary.accepted, summary.rejected) == (2, 1), summary

    stub.Rebalance(pb.RebalanceRequest(deployment_id=DEPLOYMENT), timeout=30)

    bad_topology = pb.Topology(
        num_layers=LAYERS, num_experts=EXPERTS, num_replicas=8, num_groups=4, num_nodes=2, num_gpus=4
    )
    with pytest.raises(grpc.RpcError) as bad:
        stub.Rebalance(pb.RebalanceRequest(loads=encode(loads), topology=bad_topology), timeout=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(scrape before traffic, scrape after traffic) of one server started for this module."""
    workdir = tmp_path_factory.mktemp("metrics-live")
    port, metrics_port = free_port(), free_port()
    log = workdir / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [
        *server_command(),
        "--host=127.0.0.1",
        f"--port={port}",
        f"--metrics-port={metrics_port}",
        f"--state-dir={workdir / 'state'}",
        "--device=cpu",
    ]
    with log.open("w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, server, log)
            before = scrape(metrics_port)
            drive_traffic(RebalancerServiceStub(channel))
            yield before, scrape_when_settled(metrics_port, TRAFFIC_RPCS)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_every_expected_family_is_exported(scrapes: tuple[str, str]) -> None:
    _, after = scrapes
    exported = {family.name: family.type for family in text_string_to_metric_families(after)}
    missing = {name for name in EXPECTED_FAMILIES if exposition_name(name) not in exported}
    assert not missing, f"families missing from /metrics: {sorted(missing)}"
    wrong_type = {
        name: exported[exposition_name(name)]
        for name, family in EXPECTED_FAMILIES.items()
        if exported[exposition_name(name)] != family.type
    }
    assert not wrong_type, f"families of the wrong type: {wrong_type}"


def test_samples_carry_the_expected_labels(scrapes: tuple[str, str]) -> None:
    _, after = scrapes
    by_name = samples(after)
    for name, family in EXPECTED_FAMILIES.items():
        for sample_name, found in by_name.items():
            if family_of(sample_name) != name and sample_name != name:
                continue
            for sample in found:
                assert set(family.labels) <= set(sample.labels), f"{sample_name} {sample.labels} lacks {family.labels}"
                assert "layer" not in sample.labels, "no per-layer labels"


def test_rebalance_moves_the_solve_histogram(scrapes: tuple[str, str]) -> None:
    before, after = scrapes
    name = "rebalancer_solve_duration_seconds_count"
    assert total(after, name) > total(before, name)
    assert total(after, "rebalancer_batch_layers_count") > total(before, "rebalancer_batch_layers_count")
    assert total(after, "rebalancer_solver_calls_total") > total(before, "rebalancer_solver_calls_total")
    assert total(after, "rebalancer_placements_total", trigger="request") >= 1


def test_bad_request_counts_as_invalid_argument(scrapes: tuple[str, str]) -> None:
    _, after = scrapes
    handled = "grpc_server_handled_total"
    assert total(after, handled, grpc_method="Rebalance", grpc_code="INVALID_ARGUMENT") >= 1
    assert total(after, handled, grpc_method="Rebalance", grpc_code="OK") >= 2
    assert total(after, handled, grpc_method="StreamLoad", grpc_code="OK") >= 1
    assert total(after, "grpc_server_msg_received_total", grpc_method="StreamLoad") >= 3


def test_telemetry_and_deployment_series_move(scrapes: tuple[str, str]) -> None:
    _, after = scrapes
    reports = "rebalancer_telemetry_reports_total"
    assert total(after, reports, deployment=DEPLOYMENT, outcome="accepted") == 2
    assert total(after, reports, deployment=DEPLOYMENT, outcome="rejected") == 1
    assert total(after, "rebalancer_deployments") == 1
    balancedness = samples(after).get("rebalancer_balancedness", [])
    assert any(s.labels == {"deployment": DEPLOYMENT, "placement": "proposed"} for s in balancedness), balancedness


def deploy_queries() -> list[str]:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/rebalancer.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    groups = yaml.safe_load((ROOT / "deploy/prometheus/rules.yaml").read_text())["groups"]
    exprs += [rule["expr"] for group in groups for rule in group["rules"]]
    return [e.replace("$__rate_interval", "1m") for e in exprs]


def test_dashboard_and_rule_metrics_exist_in_the_scrape(scrapes: tuple[str, str]) -> None:
    _, after = scrapes
    exported = {family.name for family in text_string_to_metric_families(after)}
    for expr in deploy_queries():
        for series in queried_series(expr) - SCRAPE_SERIES:
            family = family_of(series)
            assert family is not None and exposition_name(family) in exported, f"{series} ({expr}) not exported"


def test_promtool_check_metrics(scrapes: tuple[str, str]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        reason = "promtool not installed (apt-get install -y prometheus); `promtool check metrics` skipped"
        print(reason)
        pytest.skip(reason)
    _, after = scrapes
    result = subprocess.run(
        [promtool, "check", "metrics"], input=after, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
