"""Test doubles for the client tests: an in-process fake RebalancerService (with standard health) that
speaks the proto contract with trivial placements, plus checks of placement maps.

The fake keeps the semantics the client relies on (versions, NOT_FOUND, FAILED_PRECONDITION,
INVALID_ARGUMENT with BadRequest, reports adding up, watch pushes) so every client path runs without torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from rebalancer_client import RebalancerClient
from rebalancer_client.codec import TensorDecodeError, decode, encode
from rebalancer_client.v1 import rebalancer_pb2 as pb
from rebalancer_client.v1 import rebalancer_pb2_grpc
from serving import free_port

SERVICE_NAME = "rebalancer.v1.RebalancerService"


def assert_valid_maps(phy2log: np.ndarray, log2phy: np.ndarray, logcnt: np.ndarray, num_experts: int) -> None:
    """The three maps describe one placement: every expert has a copy, counts and slot lists agree."""
    num_layers, num_replicas = phy2log.shape
    assert logcnt.shape == (num_layers, num_experts)
    assert log2phy.shape[:2] == (num_layers, num_experts)
    assert ((phy2log >= 0) & (phy2log < num_experts)).all()
    assert (logcnt >= 1).all() and (logcnt.sum(axis=1) == num_replicas).all()
    for layer in range(num_layers):
        for expert in range(num_experts):
            slots = log2phy[layer, expert]
            listed = sorted(int(s) for s in slots if s >= 0)
            assert listed == sorted(np.flatnonzero(phy2log[layer] == expert).tolist())
            assert len(listed) == logcnt[layer, expert]


def fake_placement(loads: np.ndarray, num_replicas: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A valid (not optimal) placement: one copy each, extra copies to the heaviest per-copy load."""
    num_layers, num_experts = loads.shape
    logcnt = np.ones((num_layers, num_experts), dtype=np.int64)
    for layer in range(num_layers):
        for _ in range(num_replicas - num_experts):
            logcnt[layer, np.argmax(loads[layer] / logcnt[layer])] += 1
    phy2log = np.stack([np.repeat(np.arange(num_experts), logcnt[layer]) for layer in range(num_layers)])
    width = int(logcnt.max())
    log2phy = np.full((num_layers, num_experts, width), -1, dtype=np.int64)
    for layer in range(num_layers):
        for expert in range(num_experts):
            slots = np.flatnonzero(phy2log[layer] == expert)
            log2phy[layer, expert, : len(slots)] = slots
    return phy2log.astype(np.int64), log2phy, logcnt


def _abort(context: grpc.ServicerContext, code: int, message: str, violations: dict[str, str] | None = None):
    details = []
    if violations:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations.items()
                ]
            )
        )
        details.append(detail)
    context.abort_with_status(rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details)))


@dataclass
class FakeDeployment:
    topology: pb.Topology
    window: np.ndarray
    reports: int = 0
    version: int = 0
    placement: pb.Placement | None = None
    ranks: set[int] = field(default_factory=set)


class FakeRebalancer(rebalancer_pb2_grpc.RebalancerServiceServicer):
    """The service contract with a trivial solver; records requests and metadata for assertions."""

    def __init__(self) -> None:
        self.deployments: dict[str, FakeDeployment] = {}
        self.requests: list[pb.RebalanceRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.cond = threading.Condition()

    def _placement(self, deployment_id: str, version: int, loads: np.ndarray, topology: pb.Topology) -> pb.Placement:
        phy2log, log2phy, logcnt = fake_placement(loads, topology.num_replicas)
        stats = pb.PlacementStats(
            balancedness_after=0.5,
            replicas_moved=3,
            moved_per_layer=[1] * loads.shape[0],
            solve_seconds=0.001,
            device="fake",
            policies=[pb.PolicyLayers(policy="auto", layers=loads.shape[0])],
        )
        return pb.Placement(
            deployment_id=deployment_id,
            version=version,
            topology=topology,
            phy2log=encode(phy2log),
            log2phy=encode(log2phy),
            logcnt=encode(logcnt),
            stats=stats,
            trigger="request",
            created_unix_ms=1,
        )

    def Rebalance(self, request, context):
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        with self.cond:
            deployment = self.deployments.get(request.deployment_id) if request.deployment_id else None
            if request.deployment_id and deployment is None:
                _abort(context, code_pb2.NOT_FOUND, f"unknown deployment {request.deployment_id!r}")
            if deployment and request.base_version and request.base_version != deployment.version:
                _abort(context, code_pb2.FAILED_PRECONDITION, f"version is {deployment.version}")
            topology = deployment.topology if deployment else request.topology
        if request.HasField("loads"):
            try:
                loads = decode(request.loads)
            except TensorDecodeError as exc:
                _abort(context, code_pb2.INVALID_ARGUMENT, exc.reason, {"loads": exc.reason})
            if not np.isfinite(loads).all() or (loads < 0).any():
                _abort(context, code_pb2.INVALID_ARGUMENT, "bad loads", {"loads": "NaN, inf or negative"})
        elif deployment is not None:
            loads = deployment.window
        else:
            _abort(context, code_pb2.INVALID_ARGUMENT, "no loads", {"loads": "required without deployment_id"})
        if not topology.num_replicas:
            _abort(context, code_pb2.INVALID_ARGUMENT, "no topology", {"topology": "required with inline loads"})
        with self.cond:
            committed = deployment is not None and not request.options.dry_run
            version = deployment.version + 1 if committed else 0
            placement = self._placement(request.deployment_id, version, loads, topology)
            if committed:
                deployment.version, deployment.placement = version, placement
                self.cond.notify_all()
        return pb.RebalanceResponse(placement=placement, committed=committed)

    def StreamLoad(self, request_iterator, context):
        accepted, rejections = 0, []
        for index, report in enumerate(request_iterator):
            try:
                loads = decode(report.loads)
            except TensorDecodeError as exc:
                rejections.append(pb.ReportRejection(index=index, field="loads", reason=exc.reason))
                continue
            with self.cond:
                deployment = self.deployments.get(report.deployment_id)
                if deployment is None:
                    if not report.HasField("topology"):
                        rejections.append(pb.ReportRejection(index=index, field="topology", reason="required"))
                        continue
                    shape = (report.topology.num_layers, report.topology.num_experts)
                    deployment = FakeDeployment(report.topology, np.zeros(shape))
                    self.deployments[report.deployment_id] = deployment
                rows = list(report.layer_indices) or list(range(deployment.window.shape[0]))
                if not np.isfinite(loads).all() or loads.shape != (len(rows), deployment.window.shape[1]):
                    rejections.append(pb.ReportRejection(index=index, field="loads", reason="bad shape or value"))
                    continue
                deployment.window[rows] += loads
                deployment.reports += 1
                deployment.ranks.add(report.rank)
                accepted += 1
        return pb.StreamLoadResponse(accepted=accepted, rejected=len(rejections), rejections=rejections[:8])

    def GetPlacement(self, request, context):
        with self.cond:
            deployment = self.deployments.get(request.deployment_id)
            if deployment is None or deployment.placement is None:
                _abort(context, code_pb2.NOT_FOUND, f"no placement for {request.deployment_id!r}")
            return pb.GetPlacementResponse(placement=deployment.placement)

    def WatchPlacement(self, request, context):
        sent = request.after_version
        while context.is_active():
            with self.cond:
                deployment = self.deployments.get(request.deployment_id)
                if deployment is None:
                    _abort(context, code_pb2.NOT_FOUND, f"unknown deployment {request.deployment_id!r}")
                if deployment.version <= sent:
                    self.cond.wait(0.05)
                    continue
                placement, sent = deployment.placement, deployment.version
            yield pb.WatchPlacementResponse(placement=placement)

    def ListDeployments(self, request, context):
        with self.cond:
            infos = [
                pb.DeploymentInfo(deployment_id=name, topology=d.topology, version=d.version, reports=d.reports)
                for name, d in sorted(self.deployments.items())
            ]
        return pb.ListDeploymentsResponse(deployments=infos)

    def DeleteDeployment(self, request, context):
        with self.cond:
            return pb.DeleteDeploymentResponse(deleted=self.deployments.pop(request.deployment_id, None) is not None)


@dataclass
class FakeServer:
    server: grpc.Server
    servicer: FakeRebalancer
    health: health.HealthServicer
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_fake(port: int = 0) -> FakeServer:
    """A fake service on 127.0.0.1 (an ephemeral port unless `port`), SERVING on "" and the service name."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    servicer = FakeRebalancer()
    rebalancer_pb2_grpc.add_RebalancerServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return FakeServer(server, servicer, health_servicer, bound)


@contextlib.contextmanager
def fake_service() -> Iterator[FakeServer]:
    fake = start_fake()
    try:
        yield fake
    finally:
        fake.server.stop(grace=None)


SERVER_BIN = pathlib.Path(sys.executable).with_name("rebalancer-server")


def real_server_available() -> bool:
    """True where the real server can run here (its package and torch are installed)."""
    return all(importlib.util.find_spec(name) for name in ("torch", "rebalancer.service.main"))


@dataclass
class ServerProcess:
    """A `rebalancer-server` subprocess on 127.0.0.1 with its own state directory."""

    process: subprocess.Popen
    target: str

    def stop(self) -> None:
        stop_all([self])


def stop_all(servers: list[ServerProcess]) -> None:
    """SIGTERM every server first, then wait for each: the drains overlap."""
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def launch_servers(state_dirs: list[pathlib.Path], startup_s: float = 90.0) -> list[ServerProcess]:
    """Start one server per state directory (in parallel) and wait until each is SERVING."""
    servers = []
    for state_dir in state_dirs:
        port = free_port()
        args = [
            str(SERVER_BIN),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(free_port()),
        ]
        args += ["--state-dir", str(state_dir), "--device", "cpu", "--auto-rebalance-threshold", "0"]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        servers.append(ServerProcess(process, f"127.0.0.1:{port}"))
    deadline = time.monotonic() + startup_s
    for server in servers:
        with RebalancerClient(server.target, timeout=2) as client:
            while True:
                with contextlib.suppress(grpc.RpcError):
                    if client.health() == "SERVING":
                        break
                if server.process.poll() is not None or time.monotonic() > deadline:
                    for other in servers:
                        other.process.kill()
                    raise RuntimeError(f"rebalancer-server did not become SERVING:\n{server.process.stdout.read()}")
                time.sleep(0.1)
    return servers
