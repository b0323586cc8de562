"""What a hostile or careless client can do to a `rebalancer-server` subprocess, measured over loopback.

* flood: 3,000 reports of the 58 x 256 topology, each under a new deployment id, on one stream: the
  server's peak RSS (VmHWM) against --memory-budget-mb (bar: <= budget + 10 %), then a restart and one
  report plus one committed Rebalance on every accepted deployment (bar: all of them work).
* lanes: while the largest job the default limits admit (one expert on 3 x 2**16 slots, estimated just
  under --max-job-seconds) solves, a small Rebalance's round trip against its own solve time
  (bar: round trip <= solve + 1 s), for the 4 x 16 test topology and the 58 x 256 one.
* deadline: that job with a 1 s deadline: seconds from the deadline until the server counts it stopped
  (rebalancer_dropped_requests_total; bar: <= 1 s).
* sigterm: SIGTERM with --grace-period-s 1 while that job and 8 small requests run: exit code and
  seconds to exit (bar: 0, <= grace + 1 s).
* estimates: the cost model's time and memory estimates against the measured solve time and peak RSS
  growth (each shape in a fresh process) of a few shapes.

`python benchmarks/hostile_bench.py [--quick]` prints the figures; `run()` returns them as a dict.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import resource
import signal
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import torch
from rebalancer.service.admission import Shape, solve_cost
from rebalancer.solver import solve
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from rebalancer_wire.v1 import rebalancer_pb2_grpc
from service_bench import TOPOLOGY, free_port, start_server, wait_serving, zipf_loads

BUDGET_MB = 1000
GRACE_S = 1.0
LARGEST = pb.Topology(num_layers=1, num_experts=1, num_replicas=3 * 2**16, num_groups=1, num_nodes=1, num_gpus=1)
SMALL = pb.Topology(num_layers=4, num_experts=16, num_replicas=32, num_groups=4, num_nodes=2, num_gpus=4)


class Server:
    """A server subprocess with its gRPC stub and /metrics port."""

    def __init__(self, state_dir: str, *flags: str) -> None:
        port, self.metrics_port = free_port(), free_port()
        self.process = start_server(state_dir, port, "--metrics-port", str(self.metrics_port), *flags)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        wait_serving(self.channel, self.process)
        self.stub = rebalancer_pb2_grpc.RebalancerServiceStub(self.channel)

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024

    def stop(self) -> tuple[int, float]:
        """SIGTERM with the client's calls still open; (exit code, seconds until exit)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        seconds = time.monotonic() - started
        self.channel.close()
        return self.process.returncode, seconds


def largest_request() -> pb.RebalanceRequest:
    return pb.RebalanceRequest(loads=encode(np.ones((1, 1), np.float32)), topology=LARGEST)


def small_request(topology: pb.Topology, seed: int) -> pb.RebalanceRequest:
    rng = np.random.default_rng(seed)
    loads = (rng.pareto(1.5, (topology.num_layers, topology.num_experts)) * 100).astype(np.float32)
    return pb.RebalanceRequest(loads=encode(loads), topology=topology)


def flood(state_dir: str, ids: int) -> dict:
    flags = ("--memory-budget-mb", str(BUDGET_MB))
    server = Server(state_dir, *flags)
    loads = zipf_loads(0)
    reports = (
        pb.StreamLoadRequest(deployment_id=f"flood-{i:05d}", loads=encode(loads), topology=TOPOLOGY) for i in range(ids)
    )
    started = time.monotonic()
    summary = server.stub.StreamLoad(reports, timeout=600)
    seconds = time.monotonic() - started
    peak = server.peak_rss_mib()
    accepted = sorted(d.deployment_id for d in server.stub.ListDeployments(pb.ListDeploymentsRequest()).deployments)
    server.stop()
    server = Server(state_dir, *flags)
    again = server.stub.StreamLoad(
        (pb.StreamLoadRequest(deployment_id=name, loads=encode(loads)) for name in accepted), timeout=600
    )
    working = sum(
        server.stub.Rebalance(pb.RebalanceRequest(deployment_id=name), timeout=120).committed for name in accepted
    )
    server.stop()
    return {
        "flood_ids": ids,
        "flood_accepted": summary.accepted,
        "flood_rejected": summary.rejected,
        "flood_seconds": seconds,
        "flood_peak_rss_mib": peak,
        "flood_budget_mib": BUDGET_MB,
        "flood_restart_reports_accepted": again.accepted,
        "flood_restart_rebalances_committed": working,
    }


def lanes_and_deadline(state_dir: str) -> dict:
    server = Server(state_dir, "--batch-window-ms", "0")
    figures = {}
    for name, topology in (("small_4x16", SMALL), ("small_58x256", TOPOLOGY)):
        server.stub.Rebalance(small_request(topology, 0), timeout=60)  # warm
        largest = server.stub.Rebalance.future(largest_request(), timeout=120)
        time.sleep(1.0)  # the largest job is solving
        started = time.monotonic()
        response = server.stub.Rebalance(small_request(topology, 1), timeout=60)
        figures[f"{name}_round_trip_s"] = time.monotonic() - started
        figures[f"{name}_solve_s"] = response.placement.stats.solve_seconds
        figures[f"{name}_largest_still_running"] = not largest.done()
        largest.cancel()
        stopped = server.metric("rebalancer_dropped_requests_total")
        while server.metric("rebalancer_dropped_requests_total") == stopped:
            time.sleep(0.01)
    before = server.metric("rebalancer_dropped_requests_total")
    started = time.monotonic()
    try:
        server.stub.Rebalance(largest_request(), timeout=1.0)
        figures["deadline_code"] = "OK"
    except grpc.RpcError as error:
        figures["deadline_code"] = error.code().name
    deadline = started + 1.0
    while server.metric("rebalancer_dropped_requests_total") == before:
        time.sleep(0.005)
    figures["deadline_stop_after_deadline_s"] = time.monotonic() - deadline
    server.stop()
    return figures


def sigterm(state_dir: str) -> dict:
    server = Server(state_dir, "--grace-period-s", str(GRACE_S), "--batch-window-ms", "0")
    with ThreadPoolExecutor(9) as pool:
        load = [pool.submit(server.stub.Rebalance, largest_request(), timeout=120)]
        load += [pool.submit(server.stub.Rebalance, small_request(TOPOLOGY, s), timeout=120) for s in range(8)]
        time.sleep(1.0)
        code, seconds = server.stop()
        for future in load:
            future.exception()
    return {"sigterm_exit_code": code, "sigterm_exit_s": seconds, "sigterm_grace_s": GRACE_S}


ESTIMATED_SHAPES = {
    "dsv3_c4": Shape(58, 256, 288, 8, 4, 32, candidates=4),
    "dsv3_c64": Shape(58, 256, 288, 8, 4, 32, candidates=64),
    "kimi_c4": Shape(61, 384, 416, 1, 4, 32, candidates=4),
    "512_slots_per_gpu": Shape(8, 64, 1024, 1, 1, 2, candidates=4),
    "one_expert_2^16_slots": Shape(1, 1, 2**16, 1, 1, 1, candidates=4),
}


def measure_solve(name: str) -> tuple[float, float]:
    """(seconds, MiB of peak RSS growth) of one solve of ESTIMATED_SHAPES[name], after a warm-up solve."""
    shape = ESTIMATED_SHAPES[name]
    solve(torch.rand(2, 16), 32, 4, 2, 4, num_candidates=2)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    weight = torch.rand(shape.num_layers, shape.num_experts) ** 4 * 1000
    started = time.perf_counter()
    solve(
        weight, shape.num_replicas, shape.num_groups, shape.num_nodes, shape.num_gpus, num_candidates=shape.candidates
    )
    seconds = time.perf_counter() - started
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024


def estimates() -> dict:
    """Each shape solved in a fresh process (so its peak RSS is its own) next to the cost model."""
    figures = {}
    context = multiprocessing.get_context("spawn")
    measured = {}
    for name in ESTIMATED_SHAPES:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            measured[name] = pool.submit(measure_solve, name).result()
    for name, shape in ESTIMATED_SHAPES.items():
        cost = solve_cost(shape, "cpu")
        figures[f"estimate_{name}_measured_s"], figures[f"estimate_{name}_measured_mib"] = measured[name]
        figures[f"estimate_{name}_estimated_s"] = cost.work_seconds
        figures[f"estimate_{name}_estimated_mib"] = cost.peak_bytes / 2**20
    return figures


def run(quick: bool = False) -> dict:
    figures = estimates()
    with tempfile.TemporaryDirectory() as root:
        figures.update(lanes_and_deadline(f"{root}/lanes"))
        figures.update(sigterm(f"{root}/sigterm"))
        figures.update(flood(f"{root}/flood", 300 if quick else 3000))
    figures["bar_flood_rss_within_budget_plus_10pct"] = figures["flood_peak_rss_mib"] <= 1.1 * BUDGET_MB
    figures["bar_every_accepted_works_after_restart"] = (
        figures["flood_restart_reports_accepted"]
        == figures["flood_restart_rebalances_committed"]
        == figures["flood_accepted"]
    )
    figures["bar_small_within_solve_plus_1s"] = all(
        figures[f"{n}_round_trip_s"] <= figures[f"{n}_solve_s"] + 1.0 for n in ("small_4x16", "small_58x256")
    )
    figures["bar_deadline_stops_within_1s"] = figures["deadline_stop_after_deadline_s"] <= 1.0
    figures["bar_sigterm_exit_0_within_grace_plus_1s"] = (
        figures["sigterm_exit_code"] == 0 and figures["sigterm_exit_s"] <= GRACE_S + 1.0
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 ids in the flood instead of 3,000")
    figures = run(parser.parse_args().quick)
    width = max(map(len, figures))
    for name, value in figures.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {shown}")


if __name__ == "__main__":
    main()
