"""Exact expert placement for one MoE layer by mixed-integer programming (HiGHS via `highspy`).

The solver's heuristics are judged against the true optimum of small instances; this module computes it.
Problem: E experts with loads w_e >= 0, R slots, G GPUs with S = R/G slots each. Choose copies c_e >= 1
with sum c_e = R, put every copy on a GPU (S per GPU; an expert may have several copies on one GPU), each
copy carrying w_e / c_e, and minimise the maximum GPU load T.

Formulation (linear because the copy count is chosen from a menu rather than being a variable divisor):
  z[e,k] in {0,1}: expert e has k copies (k = 1..kmax);   sum_k z[e,k] = 1;   sum_{e,k} k z[e,k] = R
  x[e,g,k] in Z+  : copies of e on GPU g if e has k copies; sum_g x[e,g,k] = k z[e,k]
                    (and x[e,g,k] <= S z[e,k] when k > S, a cut the bounds alone do not give)
  per GPU: sum_{e,k} x[e,g,k] = S;   load_g = sum_{e,k} (w_e / k) x[e,g,k] <= T
  GPUs are interchangeable, so load_1 >= load_2 >= ... >= load_G removes their permutations.
T starts at the lower bound max(sum w / G, best achievable max single-copy load) and a greedy incumbent is
handed to HiGHS, so the search only has to close the gap between them.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

try:  # a benchmark/test-only dependency; callers check `HAVE_HIGHS`
    import highspy

    HAVE_HIGHS = True
except ImportError:  # pragma: no cover - exercised only where highspy is absent
    highspy = None
    HAVE_HIGHS = False


@dataclass
class MilpResult:
    """Best placement found: `optimum` is its exact max GPU load, `bound` HiGHS's proven lower bound."""

    optimum: float
    bound: float
    status: str  # "optimal" when proven, else HiGHS's model status (e.g. "time_limit")
    seconds: float
    copies: list[int]
    gpu_experts: list[list[int]]  # per GPU, the expert of each of its S slots


def _check(loads: list[float], num_replicas: int, num_gpus: int) -> None:
    if not loads or any(not math.isfinite(w) or w < 0 for w in loads):
        raise ValueError("loads must be a non-empty list of finite, non-negative numbers")
    if num_replicas < len(loads) or num_gpus < 1 or num_replicas % num_gpus:
        raise ValueError(f"need num_replicas >= experts and divisible by num_gpus, got {num_replicas}, {num_gpus}")


def copy_lower_bound(loads: list[float], num_replicas: int) -> float:
    """Smallest achievable max per-copy load: give each spare slot to the currently heaviest copy."""
    counts = [1] * len(loads)
    heap = [(-w, e) for e, w in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(num_replicas - len(loads)):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-loads[e] / counts[e], e))
    return max(w / c for w, c in zip(loads, counts, strict=True))


def lower_bound(loads: list[float], num_replicas: int, num_gpus: int) -> float:
    """max(total / G, best max single-copy load): no placement can beat either."""
    return max(sum(loads) / num_gpus, copy_lower_bound(loads, num_replicas))


def _greedy(loads: list[float], num_replicas: int, num_gpus: int) -> tuple[list[int], list[list[int]]]:
    """Incumbent for HiGHS: replicate the heaviest copy, then LPT into the lightest GPU with a free slot."""
    counts = [1] * len(loads)
    heap = [(-w, e) for e, w in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(num_replicas - len(loads)):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-loads[e] / counts[e], e))
    slots = num_replicas // num_gpus
    items = sorted(((loads[e] / counts[e], e) for e in range(len(loads)) for _ in range(counts[e])), reverse=True)
    gpu_load = [0.0] * num_gpus
    gpu_experts: list[list[int]] = [[] for _ in range(num_gpus)]
    for load, e in items:
        g = min((g for g in range(num_gpus) if len(gpu_experts[g]) < slots), key=lambda g: gpu_load[g])
        gpu_load[g] += load
        gpu_experts[g].append(e)
    return counts, gpu_experts


def _valid(copies: Sequence[int], gpu_experts: Sequence[Sequence[int]], num_replicas: int, num_gpus: int) -> bool:
    """A start placement is usable only if it is a real placement of this instance."""
    slots = num_replicas // num_gpus
    if len(gpu_experts) != num_gpus or any(len(g) != slots for g in gpu_experts) or min(copies) < 1:
        return False
    seen = [0] * len(copies)
    for g in gpu_experts:
        for e in g:
            seen[e] += 1
    return seen == list(copies)


def placement_max_load(loads: list[float], copies: list[int], gpu_experts: list[list[int]]) -> float:
    """Exact max GPU load of a placement (computed from integers, free of solver tolerances)."""
    return max(sum(loads[e] / copies[e] for e in experts) for experts in gpu_experts)


def solve_milp(
    loads: list[float],
    num_replicas: int,
    num_gpus: int,
    *,
    time_limit: float = 60.0,
    threads: int | None = None,
    verbose: bool = False,
    symmetry_rows: bool = False,
    level_cuts: bool = True,
    starts: Sequence[tuple[list[int], list[list[int]]]] = (),
) -> MilpResult:
    """Solve one layer exactly (or to `time_limit` seconds); see the module docstring for the model.

    `starts` are known placements (copies per expert, experts per GPU), e.g. a heuristic's: the best of them
    and the built-in greedy becomes the incumbent, which prunes the search and never changes the optimum.
    """
    if not HAVE_HIGHS:
        raise RuntimeError("highspy is not installed: pip install highspy")
    loads = [float(w) for w in loads]
    _check(loads, num_replicas, num_gpus)
    started = time.perf_counter()
    num_experts, slots = len(loads), num_replicas // num_gpus
    kmax = num_replicas - num_experts + 1
    lb = lower_bound(loads, num_replicas, num_gpus)
    candidates = [_greedy(loads, num_replicas, num_gpus)]
    candidates += [(list(c), [list(g) for g in p]) for c, p in starts if _valid(c, p, num_replicas, num_gpus)]
    greedy_copies, greedy_gpus = min(candidates, key=lambda cp: placement_max_load(loads, *cp))
    ub = placement_max_load(loads, greedy_copies, greedy_gpus)
    if ub <= lb * (1 + 1e-12) or num_gpus == 1:
        return MilpResult(ub, lb, "optimal", time.perf_counter() - started, greedy_copies, greedy_gpus)

    # Column layout: T, then z[e,k], then x[e,g,k], then one integer m_v per "level" v (see below).
    ks = np.arange(1, kmax + 1)
    n_z = num_experts * kmax
    n_x = num_experts * num_gpus * kmax

    def zi(e: int, k: int) -> int:
        return 1 + e * kmax + (k - 1)

    def xi(e: int, g: int, k: int) -> int:
        return 1 + n_z + (e * num_gpus + g) * kmax + (k - 1)

    # Level cuts carry the pigeonhole argument the LP relaxation (whose bound is just total / G) misses:
    # if N_v pieces weigh >= v, some GPU holds m_v >= ceil(N_v / G) of them, so T >= v * m_v.
    # Only levels where m_v >= 2 can beat the lower bound are worth a column.
    piece = {(e, k): loads[e] / k for e in range(num_experts) for k in ks}
    levels: list[float] = []
    if level_cuts:
        for v in sorted({p for p in piece.values() if lb / slots < p <= ub and 2 * p > lb}, reverse=True):
            if not levels or v < levels[-1] * (1 - 1e-9):
                levels.append(v)
    n_m = len(levels)
    num_cols = 1 + n_z + n_x + n_m
    col_lower = np.zeros(num_cols)
    col_upper = np.empty(num_cols)
    col_upper[0] = ub
    col_lower[0] = lb
    # A piece heavier than the incumbent can never be part of a better placement.
    col_upper[1 : 1 + n_z] = [0.0 if piece[e, k] > ub else 1.0 for e in range(num_experts) for k in ks]
    col_upper[1 + n_z : 1 + n_z + n_x] = np.tile(np.minimum(ks, slots), num_experts * num_gpus)
    col_upper[1 + n_z + n_x :] = [min(slots, math.floor(ub / v + 1e-9)) for v in levels]
    cost = np.zeros(num_cols)
    cost[0] = 1.0
    integrality = np.full(num_cols, highspy.HighsVarType.kInteger)
    integrality[0] = highspy.HighsVarType.kContinuous

    rows: list[tuple[list[int], list[float], float, float]] = []
    inf = highspy.kHighsInf
    for e in range(num_experts):
        rows.append(([zi(e, k) for k in ks], [1.0] * kmax, 1.0, 1.0))
    total_idx = [zi(e, k) for e in range(num_experts) for k in ks]
    rows.append((total_idx, [float(k) for _ in range(num_experts) for k in ks], num_replicas, num_replicas))
    for e in range(num_experts):
        for k in ks:
            idx = [xi(e, g, k) for g in range(num_gpus)] + [zi(e, k)]
            rows.append((idx, [1.0] * num_gpus + [-float(k)], 0.0, 0.0))
            if k > slots:
                for g in range(num_gpus):
                    rows.append(([xi(e, g, k), zi(e, k)], [1.0, -float(slots)], -inf, 0.0))
    per_copy = [piece[e, k] for e in range(num_experts) for k in ks]
    for g in range(num_gpus):
        idx = [xi(e, g, k) for e in range(num_experts) for k in ks]
        rows.append((idx, [1.0] * len(idx), slots, slots))
        rows.append((idx + [0], per_copy + [-1.0], -inf, 0.0))
    for g in range(num_gpus - 1 if symmetry_rows else 0):
        idx = [xi(e, g, k) for e in range(num_experts) for k in ks]
        nxt = [xi(e, g + 1, k) for e in range(num_experts) for k in ks]
        rows.append((idx + nxt, per_copy + [-c for c in per_copy], 0.0, inf))
    for j, v in enumerate(levels):
        heavy = [(e, k) for (e, k), p in piece.items() if p >= v * (1 - 1e-12)]
        m_col = 1 + n_z + n_x + j
        rows.append(
            ([m_col] + [zi(e, k) for e, k in heavy], [float(num_gpus)] + [-float(k) for _, k in heavy], 0.0, inf)
        )
        rows.append(([0, m_col], [1.0, -v], 0.0, inf))

    h = highspy.Highs()
    h.setOptionValue("output_flag", verbose)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", 1e-7)
    h.setOptionValue("mip_abs_gap", 1e-9 * max(lb, 1e-300))
    if threads is not None:
        h.setOptionValue("threads", int(threads))
    lp = highspy.HighsLp()
    lp.num_col_ = num_cols
    lp.num_row_ = len(rows)
    lp.col_cost_ = cost
    lp.col_lower_ = col_lower
    lp.col_upper_ = col_upper
    lp.row_lower_ = np.array([r[2] for r in rows], dtype=float)
    lp.row_upper_ = np.array([r[3] for r in rows], dtype=float)
    starts, index, value = [0], [], []
    for idx, val, _, _ in rows:
        index.extend(idx)
        value.extend(val)
        starts.append(len(index))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.array(value, dtype=float)
    lp.a_matrix_.num_col_ = num_cols
    lp.a_matrix_.num_row_ = len(rows)
    lp.integrality_ = list(integrality)
    h.passModel(lp)

    # Hand over the greedy placement (GPUs sorted by load to satisfy the symmetry rows) as the incumbent.
    order = sorted(range(num_gpus), key=lambda g: -sum(loads[e] / greedy_copies[e] for e in greedy_gpus[g]))
    start = np.zeros(num_cols)
    start[0] = ub
    for e in range(num_experts):
        start[zi(e, greedy_copies[e])] = 1.0
    for rank, g in enumerate(order):
        for e in greedy_gpus[g]:
            start[xi(e, rank, greedy_copies[e])] += 1.0
    for j, v in enumerate(levels):
        heavy = sum(c for e, c in enumerate(greedy_copies) if loads[e] / c >= v * (1 - 1e-12))
        start[1 + n_z + n_x + j] = math.ceil(heavy / num_gpus)
    sol = highspy.HighsSolution()
    sol.col_value = list(start)
    sol.value_valid = True
    h.setSolution(sol)

    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    values = np.asarray(h.getSolution().col_value) if info.primal_solution_status >= 2 else None
    seconds = time.perf_counter() - started
    copies, gpu_experts = greedy_copies, greedy_gpus
    if values is not None and len(values) == num_cols:
        z = values[1 : 1 + n_z].reshape(num_experts, kmax)
        x = np.rint(values[1 + n_z : 1 + n_z + n_x]).astype(int).reshape(num_experts, num_gpus, kmax)
        copies = [int(ks[z[e].argmax()]) for e in range(num_experts)]
        gpu_experts = [[e for e in range(num_experts) for _ in range(x[e, g, copies[e] - 1])] for g in range(num_gpus)]
    best = placement_max_load(loads, copies, gpu_experts)
    if best > ub:  # never report worse than the incumbent we handed in
        best, copies, gpu_experts = ub, greedy_copies, greedy_gpus
    proven = status == highspy.HighsModelStatus.kOptimal
    bound = best if proven else max(lb, float(info.mip_dual_bound))
    name = "optimal" if proven else h.modelStatusToString(status).lower().replace(" ", "_")
    return MilpResult(best, bound, name, seconds, copies, gpu_experts)


def optimal_max_load(
    loads: list[float], num_replicas: int, num_gpus: int, time_limit: float = 60.0
) -> tuple[float, str, float]:
    """(optimal max GPU load, status, seconds); status is "optimal" unless the time limit cut the search."""
    res = solve_milp(loads, num_replicas, num_gpus, time_limit=time_limit)
    return res.optimum, res.status, res.seconds


if __name__ == "__main__":
    for case in (
        [600, 560, 120, 120, 20, 10, 10, 10],
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ):
        r = solve_milp(case, 16, 8)
        print(f"{case}: optimum {r.optimum:.4f} ({r.status}, {r.seconds:.2f} s) copies {r.copies}")
