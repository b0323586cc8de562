"""What a rebalance through the vLLM policy plugin costs beyond the solve, on loopback (target <= 10 ms).

`ServiceEplbPolicy.rebalance_experts` called as vLLM calls it, on drifting windows, against a server process.
"""

from __future__ import annotations

import os
import statistics

import torch
import workloads
from harness import main, timed
from rebalancer_client.engines.vllm import ServiceConfig, ServiceEplbPolicy
from serving import Server

SHAPES = {"deepseek": workloads.SHAPES["dsv3_prefill"], "small": workloads.Shape("small", 8, 64, 80, 8, 2, 16)}


def run(quick: bool = False, rounds: int = 20, shape: str = "deepseek") -> dict:
    """`rounds` rebalances (5 quick) after two warm-up calls that open the channel; seconds per call."""
    s, seconds = SHAPES[shape], {"solve": [], "overhead": [], "local": []}
    series = workloads.drift_series(s.layers, s.experts, (5 if quick else rounds) + 2).long()  # int64 window sums
    with Server() as server:
        config = ServiceConfig(target=server.target, deployment_id="bench", deadline_s=30.0, commit=True)
        ServiceEplbPolicy.configure(config)  # a fresh `stats`
        stats, old = ServiceEplbPolicy.stats, (torch.arange(s.replicas) % s.experts).repeat(s.layers, 1)
        for round_, window in enumerate(series):
            old, wall = timed(ServiceEplbPolicy.rebalance_experts, window, s.replicas, s.groups, s.nodes, s.gpus, old)
            if stats.fallbacks:
                raise RuntimeError(f"fell back: {stats.last_error}")
            if round_ >= 2:  # the first calls open the channel and warm the solver up
                seconds["solve"].append(stats.last_solve_s)
                seconds["overhead"].append(wall - stats.last_solve_s)
                seconds["local"].append(wall - stats.last_round_trip_s)
    return {"shape": shape, "version": stats.committed_version, **seconds}


def markdown(result: dict) -> str:
    ms, s = sorted(1e3 * x for x in result["overhead"]), SHAPES[result["shape"]]
    return "\n".join(
        [
            f"shape {result['shape']} (L={s.layers} E={s.experts} R={s.replicas} G={s.gpus}), {len(ms)} rebalances,"
            f" committed version {result['version']}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f})",
            f"solve (server-reported) median {statistics.median(result['solve']) * 1e3:.1f} ms",
            "of the overhead, in the plugin (conversions, map checks; the rest is the RPC and the service): median"
            f" {statistics.median(result['local']) * 1e3:.2f} ms",
            f"plugin overhead (wall - solve): median {statistics.median(ms):.2f} ms, p90"
            f" {ms[int(0.9 * (len(ms) - 1))]:.2f} ms, max {ms[-1]:.2f} ms (target <= 10 ms)",
        ]
    )


if __name__ == "__main__":
    main(run, markdown, __doc__, rounds=20, shape="deepseek")
