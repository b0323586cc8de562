"""GPU figures: `rebalance_experts` (policy auto) on CUDA, Triton kernels vs the torch path, CPU baselines beside.

Bars: 58 x 256 -> 288 slots < 3 ms at 64 candidates (aim < 1 ms), 94 x 128 -> 160 < 3 ms, 16 requests of the
first in one call < 10 ms. Times are `torch.utils.benchmark` medians, which synchronise the device around each
block of calls, so they are what a caller waits. Raises without a CUDA device.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from importlib.metadata import version
from unittest import mock

import torch
from harness import main, table
from rebalancer.solver import kernels as solver_kernels
from rebalancer.solver import rebalance_experts, solve
from rebalancer_testkit import workloads
from torch.utils.benchmark import Timer

# (label, shape, requests batched along the layer axis)
CASES = (
    ("dsv3 58x256->288, 8g 4n 32 GPUs", workloads.SHAPES["dsv3_prefill"], 1),
    ("qwen3 94x128->160, 1g 2n 16 GPUs", workloads.SHAPES["qwen3_235b"], 1),
    ("batch 16 x dsv3 (928 layers)", workloads.SHAPES["dsv3_prefill"], 16),
)
CANDIDATES = (64, 8)


def measure(loads: torch.Tensor, shape, policy: str, candidates: int | None, path: str, min_s: float) -> tuple:
    """(median ms, mean balancedness) of one solve on the loads' device under solver path `path`."""
    with mock.patch.dict(os.environ, {solver_kernels.PATH_ENV: path}):  # read at every solve
        quality = float(solve(loads, *shape.args(), policy=policy, num_candidates=candidates).balancedness.mean())
        call = functools.partial(rebalance_experts, loads, *shape.args(), policy=policy, num_candidates=candidates)
        call()  # warm-up: compiled kernels and the caching allocator
        median = Timer("call()", globals={"call": call}).blocked_autorange(min_run_time=min_s).median
    return f"{1e3 * median:.3f}", f"{quality:.4f}"


def solver_rows(min_s: float) -> list[tuple[str, ...]]:
    """(shape, candidates, what, ms, mean balancedness) rows for the table."""
    rows = []
    for name, shape, requests in CASES:
        cpu_loads = torch.cat([shape.loads("zipf", seed) for seed in range(requests)])
        rows.append((name, "-", "deepseek, CPU", *measure(cpu_loads, shape, "deepseek", None, "torch", min_s)))
        for candidates in CANDIDATES:
            for path, loads in (("torch", cpu_loads), ("torch", cpu_loads.cuda()), ("triton", cpu_loads.cuda())):
                figures = measure(loads, shape, "auto", candidates, path, min_s)
                rows.append(
                    (name, str(candidates), f"auto, {path} path, {'CUDA' if loads.is_cuda else 'CPU'}", *figures)
                )
            print(f"  done: {name}, {candidates} candidates", file=sys.stderr)
    return rows


def run(quick: bool = False, min_s: float = 0.0) -> dict:
    """Every GPU figure, each timed for at least `min_s` s (0.2 quick, 1 full); raises without CUDA or Triton."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here; run it on a GPU machine (benchmarks/gpu_bench.sh)")
    if not solver_kernels.triton_available():
        raise RuntimeError("triton does not import; the Triton path cannot be measured")
    min_s = min_s or (0.2 if quick else 1.0)
    cpu = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    setup = f"torch {torch.__version__}, triton {version('triton')}, CPU {cpu}; median wall ms over >= {min_s:g} s"
    return {"card": torch.cuda.get_device_name(), "setup": setup, "rows": solver_rows(min_s)}


def markdown(result: dict) -> str:
    head = ["shape", "candidates", "what", "ms", "mean balancedness"]
    return f"**{result['card']}**: {result['setup']}\n\n" + table(head, result["rows"])


if __name__ == "__main__":
    main(run, markdown, __doc__, min_s=1.0)
