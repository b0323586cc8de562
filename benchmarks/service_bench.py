"""Service figures on a real `rebalancer-server` subprocess over loopback, policy auto beside deepseek.

Bars: Rebalance round trip <= the reported solve + 5 ms; 16 concurrent requests < 3x one (batching);
telemetry ingest of full 58 x 256 reports >= 200 per s, the server's RSS flat; a rebalance through the vLLM
policy plugin (called as vLLM calls it, on drifting windows) <= the solve + 10 ms.
"""

from __future__ import annotations

import functools
import operator
import os
import statistics
from concurrent.futures import ThreadPoolExecutor

import torch
from harness import main, timed
from rebalancer_client.engines.vllm import ServiceConfig, ServiceEplbPolicy
from rebalancer_testkit import workloads
from rebalancer_testkit.serving import Server, memory_mib, rebalance_request, topology, zipf_loads
from rebalancer_wire.v1 import rebalancer_pb2 as pb

SHAPE = workloads.SHAPES["dsv3_prefill"]
POLICIES = {"auto": pb.POLICY_AUTO, "deepseek": pb.POLICY_DEEPSEEK}
ROWS = {  # result key -> row label
    "round_trip_ms": "Rebalance round trip (ms)",
    "solve_ms": "solve in stats (ms)",
    "overhead_ms": "round trip - solve (ms)",
    "single_ms": "1 request (ms)",
    "concurrent_ms": "16 concurrent requests (ms)",
    "concurrent_ratio": "16 concurrent / 1",
    "max_batch_requests": "largest batch (requests)",
}


def request(seed: int, policy: str) -> pb.RebalanceRequest:
    return rebalance_request(SHAPE, seed, policy=POLICIES[policy], seed=seed)


def solves(stub, policy: str, repeats: int, concurrent_repeats: int, clients: int = 16) -> dict:
    """Medians of round trip, reported solve and their difference; `clients` simultaneous requests vs one."""
    rebalance = functools.partial(stub.Rebalance, timeout=120)
    rebalance(request(0, policy))  # first call of a policy pays its lazy start-up
    calls = [timed(rebalance, request(seed, policy)) for seed in range(repeats)]
    trips, reported = [seconds for _, seconds in calls], [r.placement.stats.solve_seconds for r, _ in calls]
    requests, singles, bursts, batches = [request(seed, policy) for seed in range(clients)], [], [], []
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(concurrent_repeats):
            singles.append(timed(rebalance, requests[0])[1])
            responses, seconds = timed(lambda: list(pool.map(rebalance, requests)))
            bursts.append(seconds)
            batches.append(max(r.placement.stats.batch_requests for r in responses))
    single, burst = statistics.median(singles), statistics.median(bursts)
    seconds = {"round_trip_ms": trips, "solve_ms": reported, "overhead_ms": list(map(operator.sub, trips, reported))}
    figures = {key: 1e3 * statistics.median(values) for key, values in seconds.items()}
    figures |= {"single_ms": 1e3 * single, "concurrent_ms": 1e3 * burst, "concurrent_ratio": burst / single}
    return figures | {"max_batch_requests": max(batches)}


def ingest(stub, pid: int, reports: int) -> dict:
    """Stream `reports` full [58, 256] float32 reports on one stream; rate and server RSS before/after."""
    messages = [pb.StreamLoadRequest(deployment_id="bench-ingest", loads=zipf_loads(SHAPE, 100 + i)) for i in range(64)]
    messages[0].topology.CopyFrom(topology(SHAPE))
    stub.StreamLoad(iter(messages[:1] + messages[1:] * 2))  # window full: steady state from here on
    rss_before = memory_mib(pid)
    summary, seconds = timed(stub.StreamLoad, (messages[1 + i % 63] for i in range(reports)))
    if summary.accepted != reports:
        raise RuntimeError(f"ingest accepted {summary.accepted} of {reports}")
    return {"ingest_reports_per_s": reports / seconds, "rss_before_mib": rss_before, "rss_after_mib": memory_mib(pid)}


def plugin(target: str, rounds: int) -> dict:
    """`ServiceEplbPolicy.rebalance_experts` as vLLM calls it on `rounds` drifting windows (after two that open the
    channel): median and p90 of wall minus the reported solve, and the median spent in the plugin itself."""
    series = workloads.drift_series(SHAPE.layers, SHAPE.experts, rounds + 2).long()  # int64 window sums
    ServiceEplbPolicy.configure(
        ServiceConfig(target=target, deployment_id="bench-plugin", deadline_s=30.0, commit=True)
    )
    stats, old = ServiceEplbPolicy.stats, (torch.arange(SHAPE.replicas) % SHAPE.experts).repeat(SHAPE.layers, 1)
    overhead, local = [], []
    for window in series:
        old, wall = timed(ServiceEplbPolicy.rebalance_experts, window, *SHAPE.args(), old)
        if stats.fallbacks:
            raise RuntimeError(f"the plugin fell back: {stats.last_error}")
        overhead.append(1e3 * (wall - stats.last_solve_s))
        local.append(1e3 * (wall - stats.last_round_trip_s))
    ms, local_ms = sorted(overhead[2:]), statistics.median(local[2:])
    p90_ms = ms[int(0.9 * (len(ms) - 1))]
    return {"rebalances": len(ms), "overhead_ms": statistics.median(ms), "p90_ms": p90_ms, "local_ms": local_ms}


def run(quick: bool = False) -> dict:
    """Start a server, measure every figure for policy auto and deepseek, stop it; returns the figures."""
    repeats, concurrent_repeats, reports = (2, 1, 100) if quick else (5, 2, 500)
    figures: dict = {"shape": SHAPE.describe(), "cpus": os.cpu_count()}
    with Server() as server:
        figures |= {policy: solves(server.stub, policy, repeats, concurrent_repeats) for policy in POLICIES}
        figures["ingest"] = ingest(server.stub, server.process.pid, reports)
        figures["plugin"] = plugin(server.target, 5 if quick else 20)
    figures["bars"] = {
        "round_trip_within_solve_plus_5ms": figures["auto"]["overhead_ms"] <= 5.0,
        "concurrent_16_under_3x": figures["auto"]["concurrent_ratio"] < 3.0,
        "ingest_at_least_200_per_s": figures["ingest"]["ingest_reports_per_s"] >= 200.0,
        "plugin_within_solve_plus_10ms": figures["plugin"]["overhead_ms"] <= 10.0,
    }
    return figures


def markdown(figures: dict) -> str:
    """The figures as a fixed-width block: auto, deepseek and their ratio per figure, then the bars."""
    lines = [
        f"service benchmark: {figures['shape']} ({figures['cpus']} CPUs)",
        f"{'figure':<34}{'auto':>12}{'deepseek':>12}{'auto/deepseek':>15}",
    ]
    for key, label in ROWS.items():
        a, d = figures["auto"][key], figures["deepseek"][key]
        lines.append(f"{label:<34}{a:>12.2f}{d:>12.2f}{a / d if d else float('nan'):>15.2f}")
    ingest = figures["ingest"]
    lines.append(f"{'telemetry ingest (reports/s)':<34}{ingest['ingest_reports_per_s']:>12.0f}")
    rss = f"{ingest['rss_before_mib']:>12.1f}{ingest['rss_after_mib']:>12.1f}"
    lines.append(f"{'server RSS before/after (MiB)':<34}{rss}")
    p = figures["plugin"]
    lines.append(f"vLLM plugin, {p['rebalances']} rebalances: wall - solve median {p['overhead_ms']:.2f} ms, p90")
    lines[-1] += f" {p['p90_ms']:.2f} ms; of it in the plugin (conversions, map checks) {p['local_ms']:.2f} ms"
    lines += [f"{'PASS' if ok else 'FAIL'} {bar}" for bar, ok in figures["bars"].items()]
    return "```\n" + "\n".join(lines) + "\n```"


if __name__ == "__main__":
    main(run, markdown, __doc__)
