"""What a rebalance through the vLLM policy plugin costs beyond the solve, on loopback.

Starts `rebalancer-server` as its own process (as in a deployment: the engine and the service never share
an interpreter), then calls `ServiceEplbPolicy.rebalance_experts` exactly as vLLM does (int64 window sum,
the map in force, CPU tensors back) on drifting windows, committing every version. Overhead = wall time
of the policy call - the solve seconds the server reports for it: encoding, the RPC, queueing, decoding
and the map checks. Target: at most 10 ms.

    python benchmarks/vllm_plugin_bench.py [--rounds 20] [--shape deepseek|small] [-- server flags...]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from rebalancer_client import RebalancerClient
from rebalancer_client.engines.vllm import ServiceConfig, ServiceEplbPolicy
from serving import free_port

SHAPES = {
    # layers, experts, replicas, groups, nodes, ranks
    "deepseek": (58, 256, 288, 8, 4, 32),
    "small": (8, 64, 80, 8, 2, 16),
}


def windows(layers: int, experts: int, rounds: int) -> list[torch.Tensor]:
    """Zipf-like int64 window sums that drift a few percent per round."""
    rng = np.random.default_rng(0)
    ranks = np.argsort(rng.random((layers, experts)), axis=1) + 1
    base = 1e5 / ranks**1.1
    return [
        torch.from_numpy(np.rint(base * rng.uniform(0.95, 1.05, base.shape)).astype(np.int64)) for _ in range(rounds)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="deepseek")
    parser.add_argument("server_flags", nargs="*", help="extra rebalancer-server flags, after --")
    args = parser.parse_args()
    layers, experts, replicas, groups, nodes, ranks = SHAPES[args.shape]
    port = free_port()
    state = tempfile.mkdtemp(prefix="plugin-bench-")
    server_bin = pathlib.Path(sys.executable).with_name("rebalancer-server")
    command = [str(server_bin), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
    command += ["--state-dir", state, *args.server_flags]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with RebalancerClient(f"127.0.0.1:{port}") as probe:
            if not probe.wait_ready(120):
                raise SystemExit("the server did not start")
        ServiceEplbPolicy.configure(
            ServiceConfig(target=f"127.0.0.1:{port}", deployment_id="bench", deadline_s=30.0, commit=True)
        )
        old = torch.from_numpy(np.tile(np.arange(replicas) % experts, (layers, 1)))
        overheads, solves, local = [], [], []
        for round_, window in enumerate(windows(layers, experts, args.rounds + 2)):
            started = time.perf_counter()
            new = ServiceEplbPolicy.rebalance_experts(window, replicas, groups, nodes, ranks, old)
            wall = time.perf_counter() - started
            if ServiceEplbPolicy.stats.fallbacks:
                raise SystemExit(f"fell back: {ServiceEplbPolicy.stats.last_error}")
            if round_ >= 2:  # the first calls open the channel and warm the solver up
                solves.append(ServiceEplbPolicy.stats.last_solve_s)
                overheads.append(wall - ServiceEplbPolicy.stats.last_solve_s)
                local.append(wall - ServiceEplbPolicy.stats.last_round_trip_s)
            old = new
        ms = [x * 1e3 for x in overheads]
        print(
            f"shape {args.shape} (L={layers} E={experts} R={replicas} G={ranks}), {len(ms)} rebalances, "
            f"committed version {ServiceEplbPolicy.stats.committed_version}, {os.cpu_count()} CPUs "
            f"(load average {os.getloadavg()[0]:.1f}), server flags {args.server_flags or 'default'}"
        )
        print(f"solve (server-reported) median {statistics.median(solves) * 1e3:.1f} ms")
        print(
            f"of the overhead, in the plugin (conversions, map checks; the rest is the RPC and the service): "
            f"median {statistics.median(local) * 1e3:.2f} ms"
        )
        print(
            f"plugin overhead (wall - solve): median {statistics.median(ms):.2f} ms, "
            f"p90 {sorted(ms)[int(0.9 * (len(ms) - 1))]:.2f} ms, max {max(ms):.2f} ms (target <= 10 ms)"
        )
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
