"""Service figures of SPEC §8 on a real `rebalancer-server` subprocess over loopback.

* Rebalance round trip of the 58 x 256 -> 288 slot, 8-group, 4-node, 32-GPU problem vs the solve time the
  server reports in its stats (bar: round trip <= solve + 5 ms).
* 16 concurrent same-shape requests vs one (bar: < 3x, thanks to batching).
* Telemetry ingest of full 58 x 256 float32 reports (bar: >= 200 reports/s) and the server's RSS before
  and after (flat memory).

Each solve figure is also measured with policy=deepseek in the same run and printed as a ratio.
`run()` returns the figures as a dict; `python benchmarks/service_bench.py` prints a table.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from rebalancer_wire.v1 import rebalancer_pb2_grpc

LAYERS, EXPERTS, REPLICAS, GROUPS, NODES, GPUS = 58, 256, 288, 8, 4, 32
TOPOLOGY = pb.Topology(
    num_layers=LAYERS, num_experts=EXPERTS, num_replicas=REPLICAS, num_groups=GROUPS, num_nodes=NODES, num_gpus=GPUS
)
POLICIES = {"auto": pb.POLICY_AUTO, "deepseek": pb.POLICY_DEEPSEEK}


def zipf_loads(seed: int) -> np.ndarray:
    """Skewed per-layer expert loads [58, 256] float32 (a different hot set per layer)."""
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((LAYERS, EXPERTS)), axis=1) + 1
    return (1e4 / ranks**1.1 * rng.uniform(0.7, 1.3, (LAYERS, EXPERTS))).astype(np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(state_dir: str, port: int, *extra_flags: str) -> subprocess.Popen:
    """`rebalancer-server` on loopback, auto-rebalance off (benchmarks drive every plan), quiet."""
    script = Path(sys.executable).parent / "rebalancer-server"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "rebalancer.service.main"]
    flags = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--state-dir", state_dir]
    flags += ["--auto-rebalance-threshold", "0", "--log-level", "WARNING", *extra_flags]
    return subprocess.Popen([*command, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_serving(channel: grpc.Channel, process: subprocess.Popen) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"rebalancer-server exited with {process.returncode}")
        try:
            if (
                health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise RuntimeError("rebalancer-server not SERVING within 120 s")


def _request(seed: int, policy: str) -> pb.RebalanceRequest:
    return pb.RebalanceRequest(
        loads=encode(zipf_loads(seed)), topology=TOPOLOGY, options=pb.SolveOptions(policy=POLICIES[policy], seed=seed)
    )


def _round_trip(stub, policy: str, repeats: int) -> dict:
    """Median round trip, median reported solve time and the median of their per-call difference."""
    stub.Rebalance(_request(0, policy))  # first call of a policy pays its lazy start-up
    trips, solves = [], []
    for seed in range(repeats):
        request = _request(seed, policy)
        started = time.perf_counter()
        response = stub.Rebalance(request, timeout=120)
        trips.append(time.perf_counter() - started)
        solves.append(response.placement.stats.solve_seconds)
    return {
        "round_trip_ms": 1e3 * statistics.median(trips),
        "solve_ms": 1e3 * statistics.median(solves),
        "overhead_ms": 1e3 * statistics.median(t - s for t, s in zip(trips, solves, strict=True)),
    }


def _concurrent(stub, policy: str, clients: int, repeats: int) -> dict:
    """Wall time of `clients` simultaneous requests vs one request alone (medians over repeats)."""
    requests = [_request(seed, policy) for seed in range(clients)]
    singles, bursts, batch_sizes = [], [], []
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            stub.Rebalance(requests[0], timeout=120)
            singles.append(time.perf_counter() - started)
            started = time.perf_counter()
            responses = list(pool.map(lambda r: stub.Rebalance(r, timeout=120), requests))
            bursts.append(time.perf_counter() - started)
            batch_sizes.append(max(r.placement.stats.batch_requests for r in responses))
    single, burst = statistics.median(singles), statistics.median(bursts)
    return {
        "single_ms": 1e3 * single,
        "concurrent_ms": 1e3 * burst,
        "concurrent_ratio": burst / single,
        "max_batch_requests": max(batch_sizes),
    }


def _ingest(stub, pid: int, reports: int) -> dict:
    """Stream `reports` full [58, 256] float32 reports on one stream; rate and server RSS before/after."""
    messages = [
        pb.StreamLoadRequest(deployment_id="bench-ingest", loads=encode(zipf_loads(100 + i)), step=0) for i in range(64)
    ]
    messages[0].topology.CopyFrom(TOPOLOGY)
    stub.StreamLoad(iter(messages[:1] + messages[1:] * 2))  # window full: steady state from here on
    rss_before = rss_mib(pid)
    started = time.perf_counter()
    summary = stub.StreamLoad(messages[1 + i % 63] for i in range(reports))
    elapsed = time.perf_counter() - started
    rss_after = rss_mib(pid)
    if summary.accepted != reports:
        raise RuntimeError(f"ingest accepted {summary.accepted} of {reports}")
    return {
        "ingest_reports_per_s": reports / elapsed,
        "rss_before_mib": rss_before,
        "rss_after_mib": rss_after,
        "rss_growth_mib": rss_after - rss_before,
    }


def run(repeats: int = 10, concurrent_repeats: int = 3, reports: int = 2000) -> dict:
    """Start a server, measure every figure for policy auto and deepseek, stop it; returns the figures."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="service-bench-") as state_dir:
        process = start_server(state_dir, port)
        try:
            options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                wait_serving(channel, process)
                stub = rebalancer_pb2_grpc.RebalancerServiceStub(channel)
                figures: dict = {
                    "shape": f"{LAYERS}x{EXPERTS} -> {REPLICAS} slots, {GROUPS} groups, {NODES} nodes, {GPUS} GPUs"
                }
                for policy in POLICIES:
                    figures[policy] = {
                        **_round_trip(stub, policy, repeats),
                        **_concurrent(stub, policy, 16, concurrent_repeats),
                    }
                figures["ingest"] = _ingest(stub, process.pid, reports)
        finally:
            process.terminate()
            process.wait(timeout=60)
    auto, deepseek = figures["auto"], figures["deepseek"]
    figures["ratios_vs_deepseek"] = {
        "round_trip": auto["round_trip_ms"] / deepseek["round_trip_ms"],
        "solve": auto["solve_ms"] / deepseek["solve_ms"],
        "concurrent": auto["concurrent_ms"] / deepseek["concurrent_ms"],
    }
    figures["bars"] = {
        "round_trip_within_solve_plus_5ms": auto["overhead_ms"] <= 5.0,
        "concurrent_16_under_3x": auto["concurrent_ratio"] < 3.0,
        "ingest_at_least_200_per_s": figures["ingest"]["ingest_reports_per_s"] >= 200.0,
    }
    figures["cpus"] = os.cpu_count()
    return figures


def print_table(figures: dict) -> None:
    print(f"service benchmark: {figures['shape']} ({figures['cpus']} CPUs)")
    print(f"{'figure':<34}{'auto':>12}{'deepseek':>12}{'auto/deepseek':>15}")
    for key, label in (
        ("round_trip_ms", "Rebalance round trip (ms)"),
        ("solve_ms", "solve in stats (ms)"),
        ("overhead_ms", "round trip - solve (ms)"),
        ("single_ms", "1 request (ms)"),
        ("concurrent_ms", "16 concurrent requests (ms)"),
        ("concurrent_ratio", "16 concurrent / 1"),
        ("max_batch_requests", "largest batch (requests)"),
    ):
        a, d = figures["auto"][key], figures["deepseek"][key]
        print(f"{label:<34}{a:>12.2f}{d:>12.2f}{a / d if d else float('nan'):>15.2f}")
    ingest = figures["ingest"]
    print(f"{'telemetry ingest (reports/s)':<34}{ingest['ingest_reports_per_s']:>12.0f}")
    print(f"{'server RSS before/after (MiB)':<34}{ingest['rss_before_mib']:>12.1f}{ingest['rss_after_mib']:>12.1f}")
    for bar, ok in figures["bars"].items():
        print(f"{'PASS' if ok else 'FAIL'} {bar}")


if __name__ == "__main__":
    print_table(run())
