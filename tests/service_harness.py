"""A real rebalancer server for the service tests: in-process on 127.0.0.1, ephemeral port.

The server runs its own asyncio loop in a thread, exactly as `rebalancer-server` assembles it; tests talk
to it through the raw generated stub over a real channel, and read its metrics from its registry.
`real_service` is the same server for the client tests (they talk to it through the client library over
`target`), with a throw-away state directory and, where asked, a bearer token.
`launch` and `wait_serving` run the `rebalancer-server` console script as a subprocess instead, for tests
of what only a process shows (signals, exit codes, logs, SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from rebalancer.service.config import ServerConfig
from rebalancer.service.server import SERVICE_NAME, RebalancerServer
from rebalancer.solver import solve
from rebalancer_testkit.serving import free_port as free_port  # re-exported: the service tests take it from here
from rebalancer_wire.codec import decode, encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from rebalancer_wire.v1 import rebalancer_pb2_grpc

# A small topology that keeps every test fast: 4 layers of 16 experts on 32 slots, 4 groups, 2 nodes, 4 GPUs.
LAYERS, EXPERTS, REPLICAS, GROUPS, NODES, GPUS = 4, 16, 32, 4, 2, 4
TOPOLOGY = pb.Topology(
    num_layers=LAYERS, num_experts=EXPERTS, num_replicas=REPLICAS, num_groups=GROUPS, num_nodes=NODES, num_gpus=GPUS
)


def skewed_loads(seed: int, layers: int = LAYERS, experts: int = EXPERTS) -> np.ndarray:
    """Zipf-like loads [layers, experts] (float32), a different hot set per layer."""
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((layers, experts)), axis=1) + 1
    return (1000.0 / ranks**1.2 * rng.uniform(0.8, 1.2, (layers, experts))).astype(np.float32)


def library(loads: np.ndarray, prev: np.ndarray | None = None, history=None, **options):
    """The solver library on the same arguments the server uses."""
    return solve(
        torch.from_numpy(np.asarray(loads, dtype=np.float64)),
        REPLICAS,
        GROUPS,
        NODES,
        GPUS,
        prev_phy2log=None if prev is None else torch.tensor(prev),
        history=history,
        **options,
    )


def maps_of(placement: pb.Placement) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return decode(placement.phy2log), decode(placement.log2phy), decode(placement.logcnt)


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """BadRequest field -> description from a rich INVALID_ARGUMENT status."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details"
    violations = {}
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations.update({v.field: v.description for v in bad_request.field_violations})
    return violations


def slow_solver(server: ServerThread) -> tuple[threading.Event, threading.Event]:
    """Make solver calls wait for the returned gate, as a long solve would; `entered` is set when one does."""
    batcher, gate, entered = server.server.batcher, threading.Event(), threading.Event()
    solve_sync = batcher._solve_sync

    def slow_solve(batch):
        entered.set()
        gate.wait(30)
        return solve_sync(batch)

    batcher._solve_sync = slow_solve
    return gate, entered


def report(deployment_id: str, loads: np.ndarray, **fields) -> pb.StreamLoadRequest:
    return pb.StreamLoadRequest(deployment_id=deployment_id, loads=encode(loads), **fields)


def tampered_tensor(array: np.ndarray, **overrides) -> pb.Tensor:
    """`encode(array)` with fields overwritten (`shape` replaced as a whole): a malformed Tensor message."""
    message = encode(array)
    for name, value in overrides.items():
        if name == "shape":
            del message.shape[:]
            message.shape.extend(value)
        else:
            setattr(message, name, value)
    return message


def launch(state_dir: Path, *flags: str, prefix: Sequence[str] = (), **env: str) -> subprocess.Popen:
    """`rebalancer-server --state-dir state_dir *flags` with extra environment; stdout+stderr piped as text.
    `prefix` runs it through a wrapper command (e.g. setpriv, to drop root)."""
    script = Path(sys.executable).parent / "rebalancer-server"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "rebalancer.service.main"]
    return subprocess.Popen(
        [*prefix, *command, "--state-dir", str(state_dir), *flags],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def launch_local(state_dir: Path, *flags: str, **launch_args) -> tuple[subprocess.Popen, int]:
    """`launch` listening on 127.0.0.1 at a free port (returned), metrics on an ephemeral one."""
    port = free_port()
    flags = ("--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", *flags)
    return launch(state_dir, *flags, **launch_args), port


def wait_serving(channel: grpc.Channel, process: subprocess.Popen) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1).status == 1:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError("server not SERVING within 60 s")


class ServerThread:
    """Start/stop a RebalancerServer on its own loop; `stub` and `metric` for the test thread."""

    def __init__(self, state_dir: str, **overrides) -> None:
        defaults = dict(
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            state_dir=state_dir,
            auto_rebalance_threshold=0.0,
            auto_rebalance_period_s=0.05,
            grace_period_s=2.0,
        )
        self.config = replace(ServerConfig(), **{**defaults, **overrides})
        self.server = RebalancerServer(self.config)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-server")
        self.channel: grpc.Channel | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as error:  # surfaced by start()
            self._error = error
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    def start(self) -> ServerThread:
        self._thread.start()
        self._started.wait(60)
        if self._error is not None:
            raise self._error
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = rebalancer_pb2_grpc.RebalancerServiceStub(self.channel)
        return self

    def call(self, coroutine):
        """Run a coroutine on the server's loop (e.g. to inspect domain state) and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    @property
    def target(self) -> str:
        """host:port for a client (RebalancerClient, LoadReporter, the CLI's --target)."""
        return f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        """Graceful server stop (as on SIGTERM), then the test's channel; a second call does nothing."""
        if not self._thread.is_alive():
            return
        if self._error is None:
            self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        if self.channel is not None:
            self.channel.close()

    def metric(self, name: str, **labels: str) -> float:
        value = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def settled_metric(self, name: str, expected: float, **labels: str) -> float:
        """The metric once it reaches `expected` (or after 5 s): a status reaches the client a moment
        before the interceptor that counts it has finished."""
        deadline = time.monotonic() + 5
        while (value := self.metric(name, **labels)) != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return value

    def set_health(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        """Set one service's state on the server's own health servicer (what a client then reads)."""
        self.call(self.server.health.set(service, status))

    def window_loads(self, deployment_id: str) -> np.ndarray:
        """The sum of a deployment's telemetry window [L, E] (float64): the one piece of server state that
        no RPC returns, read so tests can check reports add up exactly and none is lost or counted twice."""
        return self.call(self.server.windows.snapshot(deployment_id)).loads.cpu().numpy()

    def rpcs_started(self, method: str) -> float:
        """How many calls of the unary RebalancerService `method` reached the server (its gRPC metrics)."""
        return self.metric(
            "grpc_server_started_total", grpc_type="unary", grpc_service=SERVICE_NAME, grpc_method=method
        )

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def real_service(state_dir: str | None = None, *, token: str = "", **overrides) -> Iterator[ServerThread]:
    """The real server in-process for client tests, stopped on exit.

    `state_dir` None: a temporary directory removed afterwards (pass one to restart on the same state);
    `token`: RPCs other than health must carry `authorization: Bearer <token>`; `overrides`: any
    ServerConfig field, e.g. `port=` to come back on the port of a server that was stopped.
    """
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="rebalancer-state-"))
        if token:
            overrides["auth_token"] = token
        yield stack.enter_context(ServerThread(state_dir, **overrides))
