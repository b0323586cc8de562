"""What a hostile or careless client can do to a `rebalancer-server` subprocess, measured over loopback.

Bars: a flood of new deployments stays within --memory-budget-mb + 10 % and every accepted one works after a
restart; a small Rebalance beside the largest admitted job takes <= its solve + 1 s; that job stops <= 1 s
after its deadline; SIGTERM under load exits 0 within grace + 1 s. Plus the cost model's estimates beside
measured solves.
"""

from __future__ import annotations

import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import grpc
import numpy as np
import torch
from harness import main, table, timed
from rebalancer.service.admission import Shape, solve_cost
from rebalancer.solver import solve
from rebalancer_testkit import workloads
from rebalancer_testkit.serving import Server, memory_mib, rebalance_request, topology, zipf_loads
from rebalancer_wire.codec import encode
from rebalancer_wire.v1 import rebalancer_pb2 as pb

BUDGET_MB, GRACE_S, DROPPED = 1000, 1.0, "rebalancer_dropped_requests_total"
DROP_WAIT_S = 30.0  # a job still running this long after its cancel or deadline counts as never stopped
SMALL = {"small_4x16": workloads.Shape("small", 4, 16, 32, 4, 2, 4), "small_58x256": workloads.SHAPES["dsv3_prefill"]}
# One expert on 3 x 2**16 slots of one GPU, 128 candidates: estimated just under --max-job-seconds (9.9 of 10 s) and
# at 1.8 GiB within the default per-job memory of a host with >= 12 GB. Candidates are the lever: the estimate
# counts sequential steps, which do not grow with them, while the solve does (6.4 s here, 0.13 s at 4).
LARGEST_SHAPE = Shape(1, 1, 3 * 2**16, 1, 1, 1, candidates=128)
LARGEST = pb.RebalanceRequest(
    loads=encode(np.ones((1, 1), np.float32)),
    topology=topology(workloads.Shape("largest", 1, 1, LARGEST_SHAPE.num_replicas, 1, 1, 1)),
    options=pb.SolveOptions(num_candidates=LARGEST_SHAPE.candidates),
)
ESTIMATED_SHAPES = {
    "largest_admitted": LARGEST_SHAPE,
    "dsv3_c4": Shape(58, 256, 288, 8, 4, 32, candidates=4),
    "dsv3_c64": Shape(58, 256, 288, 8, 4, 32, candidates=64),
    "kimi_c4": Shape(61, 384, 416, 1, 4, 32, candidates=4),
    "512_slots_per_gpu": Shape(8, 64, 1024, 1, 1, 2, candidates=4),
    "one_expert_2^16_slots": Shape(1, 1, 2**16, 1, 1, 1, candidates=4),
    "4096_experts_8192_slots_c16": Shape(8, 4096, 8192, 1, 8, 64, candidates=16),  # a quadratic table once
}


def flood(ids: int) -> dict:
    """`ids` new deployments on one stream under the budget, then a restart that serves every accepted one."""
    budget, shape = ("--memory-budget-mb", str(BUDGET_MB)), SMALL["small_58x256"]
    loads, dsv3 = zipf_loads(shape, 0), topology(shape)
    with tempfile.TemporaryDirectory() as state_dir:
        with Server(state_dir, *budget) as server:
            started = time.monotonic()
            reports = (pb.StreamLoadRequest(deployment_id=f"flood-{i}", loads=loads, topology=dsv3) for i in range(ids))
            summary = server.stub.StreamLoad(reports, timeout=600)
            figures = {"flood_ids": ids, "flood_accepted": summary.accepted, "flood_rejected": summary.rejected}
            figures["flood_seconds"] = time.monotonic() - started
            figures["flood_peak_rss_mib"] = memory_mib(server.process.pid, "VmHWM")
            accepted = [d.deployment_id for d in server.stub.ListDeployments(pb.ListDeploymentsRequest()).deployments]
        with Server(state_dir, *budget) as server:
            reports = (pb.StreamLoadRequest(deployment_id=d, loads=loads) for d in accepted)
            again = server.stub.StreamLoad(reports, timeout=600)
            working = [server.stub.Rebalance(pb.RebalanceRequest(deployment_id=d), timeout=120) for d in accepted]
    figures |= {"flood_budget_mib": BUDGET_MB, "flood_restart_reports_accepted": again.accepted}
    return figures | {"flood_restart_rebalances_committed": sum(response.committed for response in working)}


def wait_dropped(server: Server, before: float) -> bool:
    """Whether the server counted a dropped request (above `before`) within DROP_WAIT_S."""
    give_up = time.monotonic() + DROP_WAIT_S
    while server.metric(DROPPED) == before:
        if time.monotonic() > give_up:
            return False
        time.sleep(0.005)
    return True


def lanes_and_deadline() -> dict:
    """A small request beside the largest admitted job, on both topologies, then that job under a 1 s deadline."""
    figures: dict = {}
    with Server(None, "--batch-window-ms", "0") as server:
        for name, shape in SMALL.items():
            server.stub.Rebalance(rebalance_request(shape, 0), timeout=60)  # warm
            largest = server.stub.Rebalance.future(LARGEST, timeout=120)
            time.sleep(1.0)  # the largest job is solving
            small = rebalance_request(shape, 1)
            response, figures[f"{name}_round_trip_s"] = timed(server.stub.Rebalance, small, timeout=60)
            figures[f"{name}_solve_s"] = response.placement.stats.solve_seconds
            figures[f"{name}_largest_still_running"], dropped = not largest.done(), server.metric(DROPPED)
            largest.cancel()
            figures[f"{name}_largest_dropped_after_cancel"] = wait_dropped(server, dropped)
        dropped, deadline = server.metric(DROPPED), time.monotonic() + 1.0
        try:
            server.stub.Rebalance(LARGEST, timeout=1.0)
            figures["deadline_code"] = "OK"
        except grpc.RpcError as error:
            figures["deadline_code"] = error.code().name
        figures["deadline_dropped"] = wait_dropped(server, dropped)
        figures["deadline_stop_after_deadline_s"] = time.monotonic() - deadline
    return figures


def sigterm() -> dict:
    """SIGTERM while the largest job and 8 small requests run: exit code and seconds until exit."""
    server = Server(None, "--grace-period-s", str(GRACE_S), "--batch-window-ms", "0")
    requests = [LARGEST] + [rebalance_request(SMALL["small_58x256"], seed) for seed in range(8)]
    with ThreadPoolExecutor(len(requests)) as pool:
        calls = [pool.submit(server.stub.Rebalance, request, timeout=120) for request in requests]
        time.sleep(1.0)
        code, seconds = server.stop()
        for future in calls:
            future.exception()
    return {"sigterm_exit_code": code, "sigterm_exit_s": seconds, "sigterm_grace_s": GRACE_S}


def measure_solve(name: str) -> tuple[float, float]:
    """(seconds, MiB of peak RSS growth) of one solve of ESTIMATED_SHAPES[name], after a warm-up solve."""
    s = ESTIMATED_SHAPES[name]
    solve(torch.rand(2, 16), 32, 4, 2, 4, num_candidates=2)
    baseline, weight = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, torch.rand(s.num_layers, s.num_experts) ** 4
    layout = (s.num_replicas, s.num_groups, s.num_nodes, s.num_gpus)
    _, seconds = timed(solve, weight * 1000, *layout, num_candidates=s.candidates)
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024


def estimates() -> dict:
    """Each shape solved in a fresh process (so its peak RSS is its own) next to the cost model."""
    figures = {}
    for name, shape in ESTIMATED_SHAPES.items():
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            seconds, mib = pool.submit(measure_solve, name).result()
        cost = solve_cost(shape, "cpu")
        figures |= {f"estimate_{name}_measured_s": seconds, f"estimate_{name}_measured_mib": mib}
        figures[f"estimate_{name}_estimated_s"] = cost.work_seconds
        figures[f"estimate_{name}_estimated_mib"] = cost.peak_bytes / 2**20
    return figures


def run(quick: bool = False) -> dict:
    """Every figure (300 ids in the quick flood instead of 3,000) and whether each bar holds."""
    f = estimates() | lanes_and_deadline() | sigterm() | flood(300 if quick else 3000)
    restarted = (f["flood_accepted"], f["flood_restart_reports_accepted"], f["flood_restart_rebalances_committed"])
    # The small request counts only if the largest job ran beside it and its cancel stopped it.
    beside = [f[f"{n}_largest_still_running"] and f[f"{n}_largest_dropped_after_cancel"] for n in SMALL]
    small = [f[f"{n}_round_trip_s"] <= f[f"{n}_solve_s"] + 1.0 for n in SMALL]
    return f | {
        "bar_flood_rss_within_budget_plus_10pct": f["flood_peak_rss_mib"] <= 1.1 * BUDGET_MB,
        "bar_every_accepted_works_after_restart": len(set(restarted)) == 1,
        "bar_small_within_solve_plus_1s": all(beside) and all(small),
        "bar_deadline_stops_within_1s": f["deadline_dropped"] and f["deadline_stop_after_deadline_s"] <= 1.0,
        "bar_sigterm_exit_0_within_grace_plus_1s": f["sigterm_exit_code"] == 0 and f["sigterm_exit_s"] <= GRACE_S + 1.0,
    }


def markdown(figures: dict) -> str:
    return table(["figure", "value"], [(k, f"{v:.3f}" if isinstance(v, float) else v) for k, v in figures.items()])


if __name__ == "__main__":
    main(run, markdown, __doc__)
