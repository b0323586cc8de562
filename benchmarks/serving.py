"""A `rebalancer-server` subprocess on loopback for the service benchmarks, and the port helper the tests share.

Benchmarks drive a real server process (what an operator runs), so its RSS and its own CPU use are part
of the figures; auto-rebalance is off so the benchmark drives every plan.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rebalancer_wire.v1 import rebalancer_pb2 as pb

if TYPE_CHECKING:  # workloads imports torch, which the client tests that share `free_port` must not need
    from workloads import Shape

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def topology(shape: Shape) -> pb.Topology:
    """The wire topology of a benchmark shape."""
    return pb.Topology(
        num_layers=shape.layers,
        num_experts=shape.experts,
        num_replicas=shape.replicas,
        num_groups=shape.groups,
        num_nodes=shape.nodes,
        num_gpus=shape.gpus,
    )


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` in MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(state_dir: str, port: int) -> subprocess.Popen:
    """`rebalancer-server` on 127.0.0.1:`port`, metrics on an ephemeral port, auto-rebalance off, quiet."""
    script = Path(sys.executable).parent / "rebalancer-server"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "rebalancer.service.main"]
    flags = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--state-dir", state_dir]
    flags += ["--auto-rebalance-threshold", "0", "--log-level", "WARNING"]
    return subprocess.Popen([*command, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_serving(channel: grpc.Channel, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Block until the server's health check says SERVING; raise if it exits or the time runs out."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"rebalancer-server exited with {process.returncode}")
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"rebalancer-server not SERVING within {timeout_s:.0f} s")
