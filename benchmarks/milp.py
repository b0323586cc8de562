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
  level cuts: if N_v pieces weigh >= v, some GPU holds m_v >= ceil(N_v / G) of them, so T >= v * m_v
  (the pigeonhole argument the LP relaxation, whose bound is just total / G, misses).
T starts at the lower bound max(sum w / G, best achievable max single-copy load) and the best known
placement is handed to HiGHS as the incumbent, so the search only has to close the gap between them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from rebalancer.solver import rebalance_experts
from workloads import lower_bound

try:  # a benchmark/test-only dependency; callers check `HAVE_HIGHS`
    import highspy

    HAVE_HIGHS = True
except ImportError:  # pragma: no cover - exercised only where highspy is absent
    highspy = None
    HAVE_HIGHS = False

Placement = tuple[list[int], list[list[int]]]  # (copies per expert, per GPU the expert of each of its S slots)


@dataclass
class MilpResult:
    """Best placement found: `optimum` is its exact max GPU load, `bound` HiGHS's proven lower bound."""

    optimum: float
    bound: float
    status: str  # "optimal" when proven, else HiGHS's model status (e.g. "time_limit")
    seconds: float
    copies: list[int]
    gpu_experts: list[list[int]]


def placement_max_load(loads: Sequence[float], copies: Sequence[int], gpu_experts: Sequence[Sequence[int]]) -> float:
    """Exact max GPU load of a placement (computed from the loads, free of solver tolerances)."""
    return max(sum(loads[e] / copies[e] for e in experts) for experts in gpu_experts)


def solver_placement(loads: Sequence[float], num_replicas: int, num_gpus: int, policy: str) -> Placement:
    """The project solver's placement of one layer (flat: one group, one node) under `policy`."""
    weight = torch.tensor([list(loads)], dtype=torch.float64)
    phy2log, _, logcnt = rebalance_experts(weight, num_replicas, 1, 1, num_gpus, policy=policy)
    return logcnt[0].tolist(), phy2log[0].view(num_gpus, -1).tolist()


def _valid(placement: Placement, num_replicas: int, num_gpus: int) -> bool:
    """A start placement is usable only if it is a real placement of this instance."""
    copies, gpu_experts = placement
    if len(gpu_experts) != num_gpus or any(len(g) != num_replicas // num_gpus for g in gpu_experts) or min(copies) < 1:
        return False
    return np.bincount([e for g in gpu_experts for e in g], minlength=len(copies)).tolist() == list(copies)


def _levels(loads: list[float], kmax: int, slots: int, lb: float, ub: float) -> list[float]:
    """Distinct piece loads v worth a level cut: only where m_v >= 2 can beat the lower bound."""
    levels: list[float] = []
    for v in sorted({w / k for w in loads for k in range(1, kmax + 1)}, reverse=True):
        if lb / slots < v <= ub and 2 * v > lb and (not levels or v < levels[-1] * (1 - 1e-9)):
            levels.append(v)
    return levels


class Model:
    """The MILP of the module docstring in HiGHS's modelling API: T, z[e][k], x[e][g][k] and one m per level."""

    def __init__(self, loads: list[float], num_replicas: int, num_gpus: int, lb: float, ub: float) -> None:
        self.loads, self.replicas, self.gpus, self.slots = loads, num_replicas, num_gpus, num_replicas // num_gpus
        self.ks = range(1, num_replicas - len(loads) + 2)
        self.levels = _levels(loads, len(self.ks), self.slots, lb, ub)
        self.highs = highspy.Highs()
        self.highs.setOptionValue("output_flag", False)
        self._variables(lb, ub)
        self._constraints()

    def _variables(self, lb: float, ub: float) -> None:
        add, integer = self.highs.addVariable, highspy.HighsVarType.kInteger
        self.t = add(lb=lb, ub=ub, obj=1.0)
        # A piece heavier than the incumbent can never be part of a better placement.
        self.z = [{k: add(0, 0.0 if w / k > ub else 1.0, type=integer) for k in self.ks} for w in self.loads]
        self.x = [
            [{k: add(0, min(k, self.slots), type=integer) for k in self.ks} for _ in range(self.gpus)]
            for _ in self.loads
        ]
        self.m = [add(0, min(self.slots, math.floor(ub / v + 1e-9)), type=integer) for v in self.levels]

    def _constraints(self) -> None:
        add, qsum, gpus = self.highs.addConstr, highspy.qsum, range(self.gpus)
        for z in self.z:
            add(qsum(z.values()) == 1)
        add(qsum(k * z[k] for z in self.z for k in self.ks) == self.replicas)
        for z, x in zip(self.z, self.x, strict=True):
            for k in self.ks:
                add(qsum(x[g][k] for g in gpus) - k * z[k] == 0)
                for g in gpus if k > self.slots else ():
                    add(x[g][k] - self.slots * z[k] <= 0)
        for g in gpus:
            add(qsum(x[g][k] for x in self.x for k in self.ks) == self.slots)
            add(qsum(w / k * x[g][k] for w, x in zip(self.loads, self.x, strict=True) for k in self.ks) - self.t <= 0)
        for v, m in zip(self.levels, self.m, strict=True):
            heavy = [(e, k) for e, w in enumerate(self.loads) for k in self.ks if w / k >= v * (1 - 1e-12)]
            add(self.gpus * m - qsum(k * self.z[e][k] for e, k in heavy) >= 0)
            add(self.t - v * m >= 0)

    def start(self, placement: Placement) -> None:
        """Hand HiGHS the incumbent as a full column vector (level columns at their smallest feasible value)."""
        copies, gpu_experts = placement
        # Heaviest GPU first: on the greedy trap instance HiGHS proved it up to 2x faster than in the given order.
        gpu_experts = sorted(gpu_experts, key=lambda experts: -sum(self.loads[e] / copies[e] for e in experts))
        values = np.zeros(self.highs.getNumCol())
        values[self.t.index] = placement_max_load(self.loads, copies, gpu_experts)
        for e, c in enumerate(copies):
            values[self.z[e][c].index] = 1.0
        for g, experts in enumerate(gpu_experts):
            for e in experts:
                values[self.x[e][g][copies[e]].index] += 1.0
        for v, m in zip(self.levels, self.m, strict=True):
            heavy = sum(c for w, c in zip(self.loads, copies, strict=True) if w / c >= v * (1 - 1e-12))
            values[m.index] = math.ceil(heavy / self.gpus)
        solution = highspy.HighsSolution()
        solution.col_value, solution.value_valid = list(values), True
        self.highs.setSolution(solution)

    def placement(self) -> Placement:
        """Copies per expert and experts per GPU read back from HiGHS's solution."""
        values = np.asarray(self.highs.getSolution().col_value)
        copies = [max(z, key=lambda k, z=z: values[z[k].index]) for z in self.z]
        count = [
            [int(np.rint(values[x[g][c].index])) for g in range(self.gpus)] for x, c in zip(self.x, copies, strict=True)
        ]
        return copies, [[e for e in range(len(copies)) for _ in range(count[e][g])] for g in range(self.gpus)]

    def search(self, incumbent: Placement, lb: float, time_limit: float) -> tuple[bool, Placement, float, str]:
        """Run HiGHS from the incumbent: (proven, best placement, proven lower bound, HiGHS's status name)."""
        for option, value in (
            ("time_limit", float(time_limit)),
            ("mip_rel_gap", 1e-7),
            ("mip_abs_gap", 1e-9 * max(lb, 1e-300)),
        ):
            self.highs.setOptionValue(option, value)
        self.start(incumbent)
        self.highs.run()
        status, info = self.highs.getModelStatus(), self.highs.getInfo()
        best = incumbent
        if info.primal_solution_status >= 2:  # never worse than handed in
            best = min((incumbent, self.placement()), key=lambda p: placement_max_load(self.loads, *p))
        proven = status == highspy.HighsModelStatus.kOptimal
        bound = placement_max_load(self.loads, *best) if proven else max(lb, float(info.mip_dual_bound))
        return proven, best, bound, self.highs.modelStatusToString(status).lower().replace(" ", "_")


def solve_milp(
    loads: Sequence[float],
    num_replicas: int,
    num_gpus: int,
    *,
    time_limit: float = 60.0,
    starts: Sequence[Placement] = (),
) -> MilpResult:
    """Solve one layer exactly (or to `time_limit` seconds).

    `starts` are known placements (e.g. a heuristic's): the best of them and the published greedy (the
    `deepseek` policy) becomes the incumbent, which prunes the search and never changes the optimum.
    """
    if not HAVE_HIGHS:
        raise RuntimeError("highspy is not installed: pip install highspy")
    loads = [float(w) for w in loads]
    if not loads or any(not math.isfinite(w) or w < 0 for w in loads):
        raise ValueError("loads must be a non-empty list of finite, non-negative numbers")
    if num_replicas < len(loads) or num_gpus < 1 or num_replicas % num_gpus:
        raise ValueError(f"need num_replicas >= experts and divisible by num_gpus, got {num_replicas}, {num_gpus}")
    started = time.perf_counter()
    lb = float(lower_bound(torch.tensor([loads]), num_replicas, num_gpus)[0])
    known = [
        solver_placement(loads, num_replicas, num_gpus, "deepseek"),
        *(p for p in starts if _valid(p, num_replicas, num_gpus)),
    ]
    incumbent = min(known, key=lambda p: placement_max_load(loads, *p))
    ub = placement_max_load(loads, *incumbent)
    if ub <= lb * (1 + 1e-12) or num_gpus == 1:
        return MilpResult(ub, lb, "optimal", time.perf_counter() - started, *incumbent)
    proven, best, bound, status = Model(loads, num_replicas, num_gpus, lb, ub).search(incumbent, lb, time_limit)
    seconds = time.perf_counter() - started
    return MilpResult(placement_max_load(loads, *best), bound, "optimal" if proven else status, seconds, *best)
