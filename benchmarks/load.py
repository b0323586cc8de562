"""Sustained load on a real `rebalancer-server` over loopback: throughput, latency, errors, memory.

Engine ranks stream DeepSeek-V3 reports for 2 deployments, each re-planned every second by a controller and
followed by a watcher; figures start once the server's window and history are full.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import grpc
import numpy as np
from harness import main, table
from rebalancer_testkit import workloads
from rebalancer_testkit.serving import CHANNEL_OPTIONS, Server, memory_mib, topology, zipf_loads
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from rebalancer_wire.v1 import rebalancer_pb2_grpc

REPORTS_PER_CALL = 50


@dataclass(frozen=True)
class Settings:
    """The traffic: ranks, deployments, rates and the problem shape."""

    duration_s: float = 30.0
    streams: int = 8
    controllers: int = 2
    warmup_s: float | None = None  # default: until the server's window (64) and history (8 of it) are full
    shape: workloads.Shape = workloads.SHAPES["dsv3_prefill"]
    report_hz: float = 40.0
    rebalance_interval_s: float = 1.0

    @property
    def warmup(self) -> float:
        return min(self.duration_s / 2, 64 * (8 + 1) / self.report_hz) if self.warmup_s is None else self.warmup_s


class Traffic:
    """The generator's tasks on one stub until `stop_at`: (time, seconds) per operation, counts, errors by kind."""

    def __init__(self, stub, cfg: Settings) -> None:
        self.stub, self.cfg, self.stop_at = stub, cfg, time.monotonic() + cfg.duration_s
        self.latencies: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.counts, self.errors, self.rss = Counter(), Counter(), []

    def latency(self, operation: str, began: float, seconds: float | None = None) -> None:
        now = time.monotonic()
        self.latencies[operation].append((now, now - began if seconds is None else seconds))

    async def stream_reports(self, deployment_id: str, rank: int, pool: list) -> None:
        """One engine rank: paced StreamLoad calls; `ingest_lag` is a call's half-close to its summary."""
        step, pause = itertools.count(1), 1.0 / self.cfg.report_hz

        async def reports(half_closed: list[float]):
            for index in itertools.islice(step, REPORTS_PER_CALL):
                if time.monotonic() >= self.stop_at:
                    break
                await asyncio.sleep(pause)
                loads = pool[index % len(pool)]
                yield pb.StreamLoadRequest(deployment_id=deployment_id, loads=loads, rank=rank, step=index)
            half_closed.append(time.monotonic())

        while time.monotonic() < self.stop_at:
            half_closed: list[float] = []
            try:
                summary = await self.stub.StreamLoad(reports(half_closed), timeout=60)
            except grpc.RpcError as error:
                self.errors[f"StreamLoad {error.code().name}"] += 1
                await asyncio.sleep(pause)
                continue
            self.latency("ingest_lag", half_closed[0])
            self.counts["reports"] += summary.accepted
            self.errors["rejected reports"] += summary.rejected

    async def control(self, deployment_id: str) -> None:
        """One controller: re-plan its deployment from the window on a fixed period, then read it back."""
        read = pb.GetPlacementRequest(deployment_id=deployment_id)
        version = (await self.stub.GetPlacement(read, timeout=30)).placement.version
        while time.monotonic() + self.cfg.rebalance_interval_s < self.stop_at:
            await asyncio.sleep(self.cfg.rebalance_interval_s)
            try:
                request = pb.RebalanceRequest(deployment_id=deployment_id, base_version=version)
                began = time.monotonic()
                placement = (await self.stub.Rebalance(request, timeout=60)).placement
                self.latency("rebalance", began)
                self.latency("solve (server stats)", began, placement.stats.solve_seconds)
                self.errors["version skipped"] += placement.version != version + 1
                version, began = placement.version, time.monotonic()
                self.counts["rebalances"] += 1
                read_back = await self.stub.GetPlacement(read, timeout=30)
                self.errors["stale read"] += read_back.placement.version != version
                self.latency("get_placement", began)
            except grpc.RpcError as error:
                self.errors[f"control {error.code().name}"] += 1

    async def watch(self, deployment_id: str) -> None:
        """Follow a deployment's versions from version 1; runs until cancelled at the end."""
        seen, request = 1, pb.WatchPlacementRequest(deployment_id=deployment_id, after_version=1)
        try:
            async for response in self.stub.WatchPlacement(request):
                self.errors["watch out of order"] += response.placement.version <= seen
                seen = response.placement.version
                self.counts["pushes"] += 1
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.errors[f"watch {error.code().name}"] += 1

    async def sample_rss(self, pid: int) -> None:
        while time.monotonic() < self.stop_at:
            self.rss.append((time.monotonic(), memory_mib(pid)))
            await asyncio.sleep(0.5)

    def figures(self, warm_at: float) -> dict:
        """Latency quantiles of each operation, and the RSS at warm-up end and at the end, its growth and slope."""
        out: dict = {"latency": {}}
        for operation, samples in self.latencies.items():
            values = [seconds for at, seconds in samples if at >= warm_at]
            p50, p99 = 1e3 * np.percentile(values, [50, 99]) if values else (float("nan"),) * 2
            out["latency"][operation] = {"count": len(values), "p50_ms": p50, "p99_ms": p99}
        after = np.array([(t, rss) for t, rss in self.rss if t >= warm_at])
        if len(after) >= 2:
            warm, end = statistics.median(after[:3, 1]), statistics.median(after[-3:, 1])
            out |= {"rss_warm_mib": warm, "rss_end_mib": end, "rss_growth_pct": 100 * (end - warm) / warm}
            out["rss_slope"] = float(np.polyfit(after[:, 0] - after[0, 0], after[:, 1], 1)[0]) * 60.0
        return out


async def drive(server: Server, cfg: Settings) -> dict:
    """Register the deployments, run every task for `duration_s`, gather the figures."""
    async with grpc.aio.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        stub, count = rebalancer_pb2_grpc.RebalancerServiceStub(channel), cfg.controllers
        deployments = [f"load-{index}" for index in range(count)]
        # Pre-encoded loads, so the generator spends its CPU on RPCs, not on random numbers.
        pools = [[zipf_loads(cfg.shape, 16 * n + i) for i in range(16)] for n in range(count)]
        for d, pool in zip(deployments, pools, strict=True):  # register, fill the window a little, commit version 1
            first = pb.StreamLoadRequest(deployment_id=d, topology=topology(cfg.shape), loads=pool[0])
            await stub.StreamLoad(iter([first]))
            await stub.Rebalance(pb.RebalanceRequest(deployment_id=d), timeout=120)
        traffic = Traffic(stub, cfg)
        started, watchers = time.monotonic(), [asyncio.create_task(traffic.watch(d)) for d in deployments]
        # Stream i is rank i // controllers of deployment i % controllers: ranks of one deployment add up.
        ranks = [(deployments[i % count], i // count, pools[i % count]) for i in range(cfg.streams)]
        streams = itertools.starmap(traffic.stream_reports, ranks)
        await asyncio.gather(*streams, *map(traffic.control, deployments), traffic.sample_rss(server.process.pid))
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.2)  # the last pushes
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    errors, counts = {kind: n for kind, n in traffic.errors.items() if n}, traffic.counts
    figures = {"settings": cfg, "duration_s": elapsed, "offered_reports_per_s": cfg.streams * cfg.report_hz}
    figures |= {"reports_per_s": counts["reports"] / elapsed, "rebalances_per_s": counts["rebalances"] / elapsed}
    figures |= {"rebalances": counts["rebalances"], "watch_pushes": counts["pushes"], "errors": sum(errors.values())}
    return figures | {"error_kinds": errors, "load_average": os.getloadavg(), **traffic.figures(started + cfg.warmup)}


def run(quick: bool = False, **settings) -> dict:
    """Start a server, drive it (5 s quick, 30 s full, or `Settings(**settings)`), stop it; returns the figures."""
    cfg = Settings(**{"duration_s": 5.0 if quick else 30.0, **settings})
    with Server() as server:
        figures = asyncio.run(drive(server, cfg))
    return {**figures, "server_exit_code": server.process.returncode}


def markdown(figures: dict) -> str:
    cfg, latency = figures["settings"], figures["latency"]
    rows = [
        ("shape", cfg.shape.describe()),
        ("streams x report rate", f"{cfg.streams} x {cfg.report_hz:g}/s"),
        ("controllers (deployments)", cfg.controllers),
        ("duration / warm-up (s)", f"{figures['duration_s']:.1f} / {cfg.warmup:.1f}"),
        ("reports accepted per s", f"{figures['reports_per_s']:.1f}"),
        ("rebalances committed per s", f"{figures['rebalances_per_s']:.2f}"),
        ("errors", f"{figures['errors']} {figures['error_kinds'] or ''}".strip()),
    ]
    for op, q in latency.items():
        rows.append((f"{op} p50 / p99 (ms)", f"{q['p50_ms']:.1f} / {q['p99_ms']:.1f} (n={q['count']})"))
    if "rss_warm_mib" in figures:
        rss = f"{figures['rss_warm_mib']:.0f} -> {figures['rss_end_mib']:.0f} ({figures['rss_growth_pct']:+.1f} %,"
        rows.append(("server RSS warm -> end (MiB)", f"{rss} slope {figures['rss_slope']:+.1f} MiB/min)"))
    rows.append(("CPUs / load average", f"{os.cpu_count()} / {', '.join(f'{x:.1f}' for x in figures['load_average'])}"))
    return table(["figure", "value"], rows)


if __name__ == "__main__":
    main(run, markdown, __doc__, duration_s=30.0)
