"""Sustained load on a real `rebalancer-server` over loopback: throughput, latency, errors, memory.

8 telemetry streams (engine ranks) report DeepSeek-V3 loads for 2 deployments at 40 reports/s each; every
deployment has a controller that re-plans it each second (with `base_version`, reading it back) and a
watcher that follows its versions. Figures exclude the warm-up, the time the server's window (64 slots)
and history (8 intervals) take to fill, since until then every re-plan works on more data than the last:
reports and rebalances per second; p50/p99 of `ingest_lag` (a stream's half-close to its summary),
`rebalance`, `get_placement` and the server's solve time; errors (must be 0); server RSS and its slope.
The generator shares the 2 cores with the server, so its own CPU use is part of what limits the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
import workloads
from rebalancer_client.codec import encode
from rebalancer_client.v1 import rebalancer_pb2 as pb
from rebalancer_client.v1 import rebalancer_pb2_grpc
from serving import CHANNEL_OPTIONS, free_port, rss_mib, start_server, wait_serving

# Slots until the server's default window (64) and history (8 intervals of it) are full.
HISTORY_FILL_SLOTS = 64 * (8 + 1)
SETTINGS = {"streams": 8, "controllers": 2, "report_hz": 40.0, "reports_per_call": 50, "rebalance_interval_s": 1.0}


@dataclass
class Tally:
    """What every task records: latencies (time, seconds) per operation, counts and errors by kind."""

    started: float
    warmup_s: float
    latencies: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

    def latency(self, operation: str, began: float) -> None:
        now = time.monotonic()
        self.latencies.setdefault(operation, []).append((now, now - began))

    def after_warmup(self, operation: str) -> list[float]:
        cut = self.started + self.warmup_s
        return [seconds for at, seconds in self.latencies.get(operation, []) if at >= cut]


def loads_pool(topology: pb.Topology, seed: int, size: int = 16) -> list[pb.Tensor]:
    """Pre-encoded zipf loads [L, E] (float32), so the generator spends its CPU on RPCs, not RNG."""
    layers, experts = topology.num_layers, topology.num_experts
    return [encode(workloads.make("zipf", layers, experts, seed * size + i).numpy()) for i in range(size)]


async def stream_reports(stub, tally: Tally, deployment_id: str, rank: int, pool, stop_at: float, args) -> None:
    """One engine rank: StreamLoad calls of `reports_per_call` reports, paced at `report_hz`."""
    step = itertools.count(1)
    interval = 1.0 / args["report_hz"]

    async def reports(half_closed: list[float]):
        for _ in range(args["reports_per_call"]):
            if time.monotonic() >= stop_at:
                break
            await asyncio.sleep(interval)
            index = next(step)
            yield pb.StreamLoadRequest(
                deployment_id=deployment_id, loads=pool[index % len(pool)], rank=rank, step=index
            )
        half_closed.append(time.monotonic())

    while time.monotonic() < stop_at:
        half_closed: list[float] = []
        try:
            summary = await stub.StreamLoad(reports(half_closed), timeout=60)
        except grpc.RpcError as error:
            tally.errors[f"StreamLoad {error.code().name}"] += 1
            await asyncio.sleep(interval)
            continue
        tally.latency("ingest_lag", half_closed[0])
        tally.counts["reports"] += summary.accepted
        if summary.rejected:
            tally.errors["rejected reports"] += summary.rejected


async def control(stub, tally: Tally, deployment_id: str, stop_at: float, args) -> None:
    """One controller: re-plan its deployment from the window on a fixed period, then read it back."""
    version = (await stub.GetPlacement(pb.GetPlacementRequest(deployment_id=deployment_id), timeout=30)).placement
    version = version.version
    while time.monotonic() + args["rebalance_interval_s"] < stop_at:
        await asyncio.sleep(args["rebalance_interval_s"])
        began = time.monotonic()
        try:
            response = await stub.Rebalance(
                pb.RebalanceRequest(deployment_id=deployment_id, base_version=version), timeout=60
            )
            tally.latency("rebalance", began)
            tally.latencies.setdefault("solve (server stats)", []).append(
                (time.monotonic(), response.placement.stats.solve_seconds)
            )
            if response.placement.version != version + 1:
                tally.errors["version skipped"] += 1
            version = response.placement.version
            tally.counts["rebalances"] += 1
            began = time.monotonic()
            placement = await stub.GetPlacement(pb.GetPlacementRequest(deployment_id=deployment_id), timeout=30)
            tally.latency("get_placement", began)
            if placement.placement.version != version:
                tally.errors["stale read"] += 1
        except grpc.RpcError as error:
            tally.errors[f"control {error.code().name}"] += 1


async def watch(stub, tally: Tally, deployment_id: str, after: int) -> None:
    """Follow a deployment's versions; runs until cancelled at the end."""
    seen = after
    try:
        async for response in stub.WatchPlacement(
            pb.WatchPlacementRequest(deployment_id=deployment_id, after_version=after)
        ):
            if response.placement.version <= seen:
                tally.errors["watch out of order"] += 1
            seen = response.placement.version
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.CANCELLED:
            tally.errors[f"watch {error.code().name}"] += 1


async def sample_rss(pid: int, samples: list[tuple[float, float]], stop_at: float) -> None:
    while time.monotonic() < stop_at:
        samples.append((time.monotonic(), rss_mib(pid)))
        await asyncio.sleep(0.5)


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    p50, p99 = np.percentile(values, [50, 99])
    return {"count": len(values), "p50_ms": 1e3 * p50, "p99_ms": 1e3 * p99}


def _rss_figures(samples: list[tuple[float, float]], warm_at: float) -> dict:
    """RSS when the warm-up ends, at the end, the growth in between and the post-warm-up slope."""
    after = [(t, rss) for t, rss in samples if t >= warm_at]
    if len(after) < 2:
        return {}
    times = np.array([t for t, _ in after]) - after[0][0]
    values = np.array([rss for _, rss in after])
    slope = float(np.polyfit(times, values, 1)[0]) * 60.0
    warm, end = statistics.median(values[:3]), statistics.median(values[-3:])
    growth = 100.0 * (end - warm) / warm
    return {"rss_warm_mib": warm, "rss_end_mib": end, "rss_growth_pct": growth, "rss_slope_mib_per_min": slope}


async def drive(target: str, pid: int, topology: pb.Topology, args) -> dict:
    """Register the deployments, run every task until `duration_s` has passed, gather the figures."""
    streams, controllers = args["streams"], args["controllers"]
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = rebalancer_pb2_grpc.RebalancerServiceStub(channel)
        deployments = [f"load-{index}" for index in range(controllers)]
        pools = {d: loads_pool(topology, seed) for seed, d in enumerate(deployments)}
        for deployment_id in deployments:  # register, fill the window a little, commit version 1
            first = pb.StreamLoadRequest(deployment_id=deployment_id, topology=topology, loads=pools[deployment_id][0])
            await stub.StreamLoad(iter([first]), timeout=60)
            await stub.Rebalance(pb.RebalanceRequest(deployment_id=deployment_id), timeout=120)

        started = time.monotonic()
        stop_at = started + args["duration_s"]
        tally = Tally(started=started, warmup_s=args["warmup_s"])
        rss: list[tuple[float, float]] = []
        watchers = [asyncio.create_task(watch(stub, tally, d, 1)) for d in deployments]
        workers = []
        for index in range(streams):  # ranks of one deployment add up on the server
            deployment_id = deployments[index % controllers]
            rank = index // controllers
            workers.append(stream_reports(stub, tally, deployment_id, rank, pools[deployment_id], stop_at, args))
        workers += [control(stub, tally, d, stop_at, args) for d in deployments]
        await asyncio.gather(*workers, sample_rss(pid, rss, stop_at))
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.2)  # the last pushes
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    figures = {
        "duration_s": elapsed,
        "warmup_s": args["warmup_s"],
        "streams": streams,
        "controllers": controllers,
        "shape": f"{topology.num_layers}x{topology.num_experts} -> {topology.num_replicas} slots, "
        f"{topology.num_groups} groups, {topology.num_nodes} nodes, {topology.num_gpus} GPUs",
        "offered_reports_per_s": streams * args["report_hz"],
        "reports_per_s": tally.counts["reports"] / elapsed,
        "rebalances_per_s": tally.counts["rebalances"] / elapsed,
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "latency": {op: _percentiles(tally.after_warmup(op)) for op in tally.latencies},
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    figures.update(_rss_figures(rss, started + args["warmup_s"]))
    return figures


def run(quick: bool = False, duration_s: float | None = None) -> dict:
    """Start a server, drive it for `duration_s` (5 s quick, 30 s full), stop it; returns the figures."""
    duration_s = duration_s or (5.0 if quick else 30.0)
    args = dict(
        SETTINGS, duration_s=duration_s, warmup_s=min(duration_s / 2, HISTORY_FILL_SLOTS / SETTINGS["report_hz"])
    )
    shape = workloads.SHAPES["dsv3_prefill"]
    topology = pb.Topology(
        num_layers=shape.layers,
        num_experts=shape.experts,
        num_replicas=shape.replicas,
        num_groups=shape.groups,
        num_nodes=shape.nodes,
        num_gpus=shape.gpus,
    )
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="load-") as state_dir:
        process = start_server(state_dir, port)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                wait_serving(channel, process)
            figures = asyncio.run(drive(f"127.0.0.1:{port}", process.pid, topology, args))
        finally:
            process.terminate()
            process.wait(timeout=60)
    return figures


def markdown(figures: dict) -> str:
    """One row per figure (what benchmarks/report.py puts in RESULTS.md)."""
    per_stream = figures["offered_reports_per_s"] / figures["streams"]
    rows = [
        ("shape", figures["shape"]),
        ("streams x report rate", f"{figures['streams']} x {per_stream:g}/s"),
        ("controllers (deployments)", figures["controllers"]),
        ("duration / warm-up (s)", f"{figures['duration_s']:.1f} / {figures['warmup_s']:.1f}"),
        ("reports accepted per s", f"{figures['reports_per_s']:.1f}"),
        ("rebalances committed per s", f"{figures['rebalances_per_s']:.2f}"),
        ("errors", f"{figures['errors']} {figures['error_kinds'] or ''}".strip()),
    ]
    for operation, stats in figures["latency"].items():
        rows.append(
            (f"{operation} p50 / p99 (ms)", f"{stats['p50_ms']:.1f} / {stats['p99_ms']:.1f} (n={stats['count']})")
        )
    if "rss_warm_mib" in figures:
        rss = f"{figures['rss_warm_mib']:.0f} -> {figures['rss_end_mib']:.0f} ({figures['rss_growth_pct']:+.1f} %"
        rows.append(("server RSS warm -> end (MiB)", rss + f", slope {figures['rss_slope_mib_per_min']:+.1f} MiB/min)"))
    rows.append(
        ("CPUs / load average", f"{figures['cpus']} / {', '.join(f'{x:.1f}' for x in figures['load_average'])}")
    )
    return "\n".join(["| figure | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (default %(default)s)")
    print(markdown(run(duration_s=parser.parse_args().duration)))
