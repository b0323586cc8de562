"""GPU figures: `rebalance_experts` (policy auto) on CUDA, Triton kernels vs the torch path, CPU baselines beside.

Bars: 58 x 256 -> 288 slots < 3 ms at 64 candidates (aim < 1 ms), 94 x 128 -> 160 < 3 ms, 16 requests of the
first in one call < 10 ms; median CUDA-event ms after a warm-up. Raises without a CUDA device.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from unittest import mock

import torch
import workloads
from harness import interleaved_times, main, table
from rebalancer.solver import kernels as solver_kernels
from rebalancer.solver import rebalance_experts, solve

# (label, shape, requests batched along the layer axis)
CASES = (
    ("dsv3 58x256->288, 8g 4n 32 GPUs", workloads.SHAPES["dsv3_prefill"], 1),
    ("qwen3 94x128->160, 1g 2n 16 GPUs", workloads.SHAPES["qwen3_235b"], 1),
    ("batch 16 x dsv3 (928 layers)", workloads.SHAPES["dsv3_prefill"], 16),
)
CANDIDATES = (64, 8)


def cuda_median_ms(call, warmup: int, runs: int) -> tuple[float, float]:
    """(median ms between CUDA events around the call, median host wall ms with a final sync)."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    event_ms, wall_ms = [], []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began = time.perf_counter()
        start.record()
        call()
        end.record()
        end.synchronize()
        wall_ms.append((time.perf_counter() - began) * 1e3)
        event_ms.append(start.elapsed_time(end))
    return statistics.median(event_ms), statistics.median(wall_ms)


def measure(loads: torch.Tensor, shape, policy: str, candidates: int | None, path: str, runs: int, warmup: int):
    """(ms, host wall note, mean balancedness) of one solve on the loads' device under solver path `path`."""
    with mock.patch.dict(os.environ, {solver_kernels.PATH_ENV: path}):  # read at every solve
        quality = float(solve(loads, *shape.args(), policy=policy, num_candidates=candidates).balancedness.mean())
        call = functools.partial(rebalance_experts, loads, *shape.args(), policy=policy, num_candidates=candidates)
        if loads.is_cuda:
            event_ms, wall_ms = cuda_median_ms(call, warmup, runs)
            return f"{event_ms:.3f}", f" (host wall {wall_ms:.2f} ms)", f"{quality:.4f}"
        call()  # warm-up
        seconds = statistics.median(interleaved_times({"call": call}, runs)[0]["call"])
        return f"{1e3 * seconds:.2f}", "", f"{quality:.4f}"


def solver_rows(runs: int, warmup: int) -> list[tuple[str, ...]]:
    """(shape, candidates, what, ms, mean balancedness) rows for the table."""
    rows = []
    for name, shape, requests in CASES:
        cpu_loads = torch.cat([shape.loads("zipf", seed) for seed in range(requests)])
        cpu_runs = max(3, runs // (4 * requests))
        ms, _, quality = measure(cpu_loads, shape, "deepseek", None, "torch", cpu_runs, warmup)
        rows.append((name, "-", "deepseek, CPU", ms, quality))
        for candidates in CANDIDATES:
            for path, loads in (("torch", cpu_loads), ("torch", cpu_loads.cuda()), ("triton", cpu_loads.cuda())):
                where, repeats = ("CUDA", runs) if loads.is_cuda else ("CPU", cpu_runs)
                ms, wall, quality = measure(loads, shape, "auto", candidates, path, repeats, warmup)
                rows.append((name, str(candidates), f"auto, {path} path, {where}{wall}", ms, quality))
            print(f"  done: {name}, {candidates} candidates", file=sys.stderr)
    return rows


def run(quick: bool = False, runs: int | None = None, warmup: int = 5) -> dict:
    """Every GPU figure; raises without a CUDA device or without Triton."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here; run it on a GPU machine (benchmarks/gpu_bench.sh)")
    if not solver_kernels.triton_available():
        raise RuntimeError("triton does not import; the Triton path cannot be measured")
    runs = runs or (10 if quick else 50)
    return {
        "card": torch.cuda.get_device_name(),
        "setup": f"torch {torch.__version__}, triton {version('triton')}, CPU"
        f" {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch"
        f" threads); CUDA figures: median CUDA-event ms over {runs} runs after {warmup} warm-up runs; CPU figures:"
        " median wall ms.",
        "rows": solver_rows(runs, warmup),
    }


def markdown(result: dict) -> str:
    head = ["shape", "candidates", "what", "ms", "mean balancedness"]
    return f"**{result['card']}**: {result['setup']}\n\n" + table(head, result["rows"])


if __name__ == "__main__":
    main(run, markdown, __doc__, runs=50, warmup=5)
