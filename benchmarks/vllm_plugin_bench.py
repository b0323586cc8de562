"""What a rebalance through the vLLM policy plugin costs beyond the solve, on loopback (target <= 10 ms).

`ServiceEplbPolicy.rebalance_experts` called as vLLM calls it, on drifting windows, against a server process.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import torch
from harness import main
from rebalancer_client.engines.vllm import ServiceConfig, ServiceEplbPolicy
from serving import Server

SHAPES = {"deepseek": (58, 256, 288, 8, 4, 32), "small": (8, 64, 80, 8, 2, 16)}  # L, E, R, groups, nodes, ranks


def windows(layers: int, experts: int, rounds: int) -> list[torch.Tensor]:
    """Zipf-like int64 window sums that drift a few percent per round."""
    rng = np.random.default_rng(0)
    base = 1e5 / (np.argsort(rng.random((layers, experts)), axis=1) + 1) ** 1.1
    sums = (np.rint(base * rng.uniform(0.95, 1.05, base.shape)).astype(np.int64) for _ in range(rounds))
    return [torch.from_numpy(window) for window in sums]


def run(quick: bool = False, rounds: int = 20, shape: str = "deepseek") -> dict:
    """`rounds` rebalances (5 quick) after two warm-up calls that open the channel; seconds per call."""
    layers, experts, replicas, groups, nodes, ranks = SHAPES[shape]
    seconds: dict[str, list[float]] = {"solve": [], "overhead": [], "local": []}
    with tempfile.TemporaryDirectory(prefix="plugin-bench-") as state_dir, Server(state_dir) as server:
        config = ServiceConfig(target=server.target, deployment_id="bench", deadline_s=30.0, commit=True)
        ServiceEplbPolicy.configure(config)  # a fresh `stats`
        stats, old = ServiceEplbPolicy.stats, torch.from_numpy(np.tile(np.arange(replicas) % experts, (layers, 1)))
        for round_, window in enumerate(windows(layers, experts, (5 if quick else rounds) + 2)):
            started = time.perf_counter()
            old = ServiceEplbPolicy.rebalance_experts(window, replicas, groups, nodes, ranks, old)
            wall = time.perf_counter() - started
            if stats.fallbacks:
                raise RuntimeError(f"fell back: {stats.last_error}")
            if round_ >= 2:  # the first calls open the channel and warm the solver up
                seconds["solve"].append(stats.last_solve_s)
                seconds["overhead"].append(wall - stats.last_solve_s)
                seconds["local"].append(wall - stats.last_round_trip_s)
    return {"shape": shape, "dims": (layers, experts, replicas, ranks), "version": stats.committed_version, **seconds}


def markdown(result: dict) -> str:
    ms = sorted(1e3 * x for x in result["overhead"])
    layers, experts, replicas, ranks = result["dims"]
    return "\n".join(
        [
            f"shape {result['shape']} (L={layers} E={experts} R={replicas} G={ranks}), {len(ms)} rebalances, committed"
            f" version {result['version']}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f})",
            f"solve (server-reported) median {statistics.median(result['solve']) * 1e3:.1f} ms",
            "of the overhead, in the plugin (conversions, map checks; the rest is the RPC and the service): median"
            f" {statistics.median(result['local']) * 1e3:.2f} ms",
            f"plugin overhead (wall - solve): median {statistics.median(ms):.2f} ms, p90"
            f" {ms[int(0.9 * (len(ms) - 1))]:.2f} ms, max {ms[-1]:.2f} ms (target <= 10 ms)",
        ]
    )


if __name__ == "__main__":
    main(run, markdown, __doc__, rounds=20, shape="deepseek")
