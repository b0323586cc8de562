"""A `rebalancer-server` subprocess on loopback for the service benchmarks (its RSS and CPU are part of the
figures), and `free_port`, which the client tests share: this module imports no torch."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rebalancer_wire.codec import encode
from rebalancer_wire.topology import FIELDS
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from rebalancer_wire.v1 import rebalancer_pb2_grpc

START_TIMEOUT_S = 120
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def topology(shape) -> pb.Topology:
    """The wire topology of a `workloads.Shape`, its fields in the wire's own order."""
    return pb.Topology(**dict(zip(FIELDS, (shape.layers, shape.experts, *shape.args()), strict=True)))


def zipf_loads(shape, seed: int) -> pb.Tensor:
    """Seeded zipf loads [L, E] of a `workloads.Shape` as a wire tensor."""
    return encode(shape.loads("zipf", seed).numpy())


def rebalance_request(shape, load_seed: int, **options: object) -> pb.RebalanceRequest:
    """A stateless Rebalance of `shape` on its zipf loads of `load_seed`; `options` are SolveOptions fields."""
    options = pb.SolveOptions(**options)
    return pb.RebalanceRequest(loads=zipf_loads(shape, load_seed), topology=topology(shape), options=options)


def memory_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of process `pid` from /proc, in MiB: VmRSS (resident now) or VmHWM (its peak)."""
    found = re.search(rf"^{field}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(found.group(1)) / 1024 if found else float("nan")


class Server:
    """`rebalancer-server` on 127.0.0.1, SERVING once constructed; `flags` override the defaults. Without a
    `state_dir` it keeps its state in a temporary directory removed at `stop`."""

    def __init__(self, state_dir: str | None = None, *flags: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.scratch = None if state_dir else tempfile.TemporaryDirectory(prefix="rebalancer-bench-")
        script = Path(sys.executable).parent / "rebalancer-server"
        command = [str(script)] if script.is_file() else [sys.executable, "-m", "rebalancer.service.main"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        command += ["--state-dir", state_dir or self.scratch.name, "--auto-rebalance-threshold", "0"]
        command += ["--log-level", "WARNING", *flags]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self.stub = rebalancer_pb2_grpc.RebalancerServiceStub(self.channel)
        health, deadline = health_pb2_grpc.HealthStub(self.channel), time.monotonic() + START_TIMEOUT_S
        serving = health_pb2.HealthCheckResponse.SERVING
        while self.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == serving:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"rebalancer-server not SERVING within {START_TIMEOUT_S} s (exit {self.process.returncode})")

    def metric(self, name: str) -> float:
        """The sum over every label set of metric family `name` on /metrics."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def stop(self) -> tuple[int, float]:
        """SIGTERM, whatever calls are still open; (exit code, seconds until exit)."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        self.channel.close()
        if self.scratch:
            self.scratch.cleanup()
        return self.process.returncode, time.monotonic() - started

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
