"""Where a CUDA solve spends its time: per-phase wall ms (synchronised), host syncs per phase, top ops.

For a lent GPU (benchmarks/gpu_bench.sh runs the figures; this says why they are what they are):
`python3 benchmarks/gpu_profile.py [shape] [candidates]`, default dsv3_prefill and 64.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import defaultdict

import torch
from rebalancer.solver import planner, policies, repartition, solve
from rebalancer_testkit import workloads
from torch.profiler import ProfilerActivity, profile

PHASES = {
    "candidate_placements": (planner, "candidate_placements"),
    "best_candidate": (planner, "best_candidate"),
    "improve_replication": (planner, "improve_replication"),
    "repartition": (repartition, "repartition"),
    "plan_hierarchical": (policies, "plan_hierarchical"),
}


def timed_phases(totals: dict, syncs: dict) -> None:
    """Wrap each phase: synchronised wall time and the host syncs it causes (sync debug warnings)."""
    for label, (module, name) in PHASES.items():
        original = getattr(module, name)

        def wrapper(*args, _original=original, _label=label, **kwargs):
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                started = time.perf_counter()
                result = _original(*args, **kwargs)
                torch.cuda.synchronize()
            totals[_label] += time.perf_counter() - started
            syncs[_label] += sum("synchroniz" in str(w.message) for w in caught)
            return result

        setattr(module, name, wrapper)


def main() -> None:
    shape = workloads.SHAPES[sys.argv[1] if len(sys.argv) > 1 else "dsv3_prefill"]
    candidates = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    loads = shape.loads("zipf", 0).cuda()
    call = lambda: solve(loads, *shape.args(), num_candidates=candidates)  # noqa: E731
    for _ in range(3):
        call()
    totals, syncs = defaultdict(float), defaultdict(int)
    timed_phases(totals, syncs)
    torch.cuda.set_sync_debug_mode("warn")
    torch.cuda.synchronize()
    started, runs = time.perf_counter(), 5
    for _ in range(runs):
        call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(0)
    per_solve = 1e3 * (time.perf_counter() - started) / runs
    print(f"{shape.name}, {torch.cuda.get_device_name()}, {candidates} candidates: {per_solve:.1f} ms a solve")
    for label in PHASES:
        print(f"  {label}: {1e3 * totals[label] / runs:.2f} ms, {syncs[label] / runs:.0f} host syncs")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
