"""How far the solver's placements are from the exact optimum on small hard layers, by MILP (HiGHS).

Layers of 8-16 experts with 2-4 slots per GPU, plus three hand-checked optima; optima are cached in
`milp_optima.json` by a hash of the instance. Two-slot layers beyond exact.py's count table (12-16
experts on 20-32 slots, where HiGHS proves nothing in a minute) are proven by enumeration instead: with
two slots per GPU, heaviest copy with lightest is the best packing of given copies, so the optimum is
the best count vector, and exact.py's search visits every vector that could beat its bound.

The MILP, S = R / G slots per GPU, minimises T:
  z[e,k] in {0,1}: expert e has k copies; sum_k z[e,k] = 1; sum_{e,k} k z[e,k] = R (a menu of copy counts
  keeps it linear); x[e,g,k] in Z+ copies on GPU g: sum_g x[e,g,k] = k z[e,k], x[e,g,k] <= S z[e,k] if k > S;
  per GPU sum_{e,k} x[e,g,k] = S and sum_{e,k} (w_e / k) x[e,g,k] <= T; level cuts: if N_v pieces weigh
  >= v, some GPU holds m_v >= ceil(N_v / G) of them, so T >= v m_v. The best known placement is the incumbent.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import highspy  # a dev dependency (make install), for the benchmark and its tests
import numpy as np
import torch
from harness import filled, main
from rebalancer.solver import exact, rebalance_experts
from rebalancer_testkit import workloads

Placement = tuple[list[int], list[list[int]]]  # (copies per expert, per GPU the expert of each of its S slots)
CACHE = Path(__file__).resolve().parent / "milp_optima.json"
POLICIES = ("auto", "deepseek")
# Hand-checked optima (the joint replication trap and the DeepSeek EPLB README layers), all on 8 GPUs x 2 slots.
KNOWN: list[tuple[str, list[float], float]] = [
    ("spec-greedy-trap", [600, 560, 120, 120, 20, 10, 10, 10], 590 / 3),
    ("deepseek-readme-l0", workloads.README_WEIGHT[0], 136.0),
    ("deepseek-readme-l1", workloads.README_WEIGHT[1], 172.0),
]
# (experts, GPUs, slots per GPU): every R = G * S > E, so some experts get copies.
SIZES = ((8, 4, 3), (8, 5, 2), (8, 6, 2), (10, 4, 3), (10, 6, 2), (12, 4, 4), (12, 5, 3), (12, 7, 2), (16, 6, 3))
SEEDS = (1, 2, 3)
# (experts, GPUs) of two-slot layers proven by enumeration: the CPU climb and branch and bound serve them.
TWO_SLOT_SIZES = ((12, 10), (16, 12), (16, 16))
# Vectors the enumeration keeps for its tie rule: only the optimum's value is used here.
ENUMERATION_TIES = 1 << 12


def placement_max_load(loads: Sequence[float], copies: Sequence[int], gpu_experts: Sequence[Sequence[int]]) -> float:
    """Exact max GPU load of a placement (computed from the loads, free of solver tolerances)."""
    return max(sum(loads[e] / copies[e] for e in experts) for experts in gpu_experts)


def solver_placement(loads: Sequence[float], num_replicas: int, num_gpus: int, policy: str) -> Placement:
    """The project solver's placement of one layer (flat: one group, one node) under `policy`."""
    weight = torch.tensor([list(loads)], dtype=torch.float64)
    phy2log, _, logcnt = rebalance_experts(weight, num_replicas, 1, 1, num_gpus, policy=policy)
    return logcnt[0].tolist(), phy2log[0].view(num_gpus, -1).tolist()


class Model:
    """The MILP of the module docstring in HiGHS's modelling API: T, z[e][k], x[e][g][k] and one m per level."""

    def __init__(self, loads: list[float], num_replicas: int, num_gpus: int, lb: float, ub: float) -> None:
        self.loads, self.gpus, self.slots = loads, num_gpus, num_replicas // num_gpus
        self.ks, self.highs = range(1, num_replicas - len(loads) + 2), highspy.Highs()
        self.highs.setOptionValue("output_flag", False)
        # Level cuts only where m_v >= 2 can beat the lower bound; distinct piece loads only.
        self.levels: list[float] = []
        for v in sorted({w / k for w in loads for k in self.ks}, reverse=True):
            if lb / self.slots < v <= ub and 2 * v > lb and (not self.levels or v < self.levels[-1] * (1 - 1e-9)):
                self.levels.append(v)
        add, integer, gpus = self.highs.addVariable, highspy.HighsVarType.kInteger, range(num_gpus)
        self.t = add(lb=lb, ub=ub, obj=1.0)
        # A piece heavier than the incumbent can never be part of a better placement.
        self.z = [{k: add(0, 0.0 if w / k > ub else 1.0, type=integer) for k in self.ks} for w in loads]
        self.x = [[{k: add(0, min(k, self.slots), type=integer) for k in self.ks} for _ in gpus] for _ in loads]
        self.m = [add(0, min(self.slots, math.floor(ub / v + 1e-9)), type=integer) for v in self.levels]
        add, qsum = self.highs.addConstr, highspy.qsum
        add(qsum(k * z[k] for z in self.z for k in self.ks) == num_replicas)
        for z, x in zip(self.z, self.x, strict=True):
            add(qsum(z.values()) == 1)
            for k in self.ks:
                add(qsum(x[g][k] for g in gpus) - k * z[k] == 0)
                for g in gpus if k > self.slots else ():
                    add(x[g][k] - self.slots * z[k] <= 0)
        for g in gpus:
            add(qsum(x[g][k] for x in self.x for k in self.ks) == self.slots)
            add(qsum(w / k * x[g][k] for w, x in zip(loads, self.x, strict=True) for k in self.ks) - self.t <= 0)
        for v, m in zip(self.levels, self.m, strict=True):
            heavy = [(e, k) for e, w in enumerate(loads) for k in self.ks if w / k >= v * (1 - 1e-12)]
            add(num_gpus * m - qsum(k * self.z[e][k] for e, k in heavy) >= 0)
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
        values, gpus = np.asarray(self.highs.getSolution().col_value), range(self.gpus)
        copies = [max(z, key=lambda k, z=z: values[z[k].index]) for z in self.z]
        count = [[int(np.rint(values[x[g][c].index])) for g in gpus] for x, c in zip(self.x, copies, strict=True)]
        return copies, [[e for e in range(len(copies)) for _ in range(count[e][g])] for g in gpus]

    def search(self, incumbent: Placement, lb: float, time_limit: float) -> tuple[bool, Placement, float, str]:
        """Run HiGHS from the incumbent: (proven, best placement, proven lower bound, HiGHS's status name)."""
        for option, value in (("time_limit", float(time_limit)), ("mip_rel_gap", 1e-7), ("mip_abs_gap", 1e-9 * lb)):
            self.highs.setOptionValue(option, value)
        self.start(incumbent)
        self.highs.run()
        status, info, best = self.highs.getModelStatus(), self.highs.getInfo(), incumbent
        if info.primal_solution_status >= 2:  # never worse than handed in
            best = min((incumbent, self.placement()), key=lambda p: placement_max_load(self.loads, *p))
        proven = status == highspy.HighsModelStatus.kOptimal
        bound = placement_max_load(self.loads, *best) if proven else max(lb, float(info.mip_dual_bound))
        return proven, best, bound, self.highs.modelStatusToString(status).lower().replace(" ", "_")


def solve_milp(loads: Sequence[float], num_replicas: int, num_gpus: int, time_limit: float = 60.0, starts=()) -> dict:
    """One layer to optimality or `time_limit` s, from the best of `starts` and the `deepseek` placement: optimum,
    bound, status ("optimal" or HiGHS's), seconds, copies, gpu_experts."""
    loads, started = [float(w) for w in loads], time.perf_counter()
    lb = float(workloads.lower_bound(torch.tensor([loads]), num_replicas, num_gpus)[0])
    known = [solver_placement(loads, num_replicas, num_gpus, "deepseek"), *starts]
    best = min(known, key=lambda p: placement_max_load(loads, *p))
    proven, bound, status, ub = True, lb, "optimal", placement_max_load(loads, *best)
    if ub > lb * (1 + 1e-12) and num_gpus > 1:
        proven, best, bound, status = Model(loads, num_replicas, num_gpus, lb, ub).search(best, lb, time_limit)
    found = {"optimum": placement_max_load(loads, *best), "bound": bound, "status": "optimal" if proven else status}
    return found | {"seconds": time.perf_counter() - started, "copies": best[0], "gpu_experts": best[1]}


def solve_by_enumeration(loads: Sequence[float], num_replicas: int, num_gpus: int) -> dict:
    """One two-slot layer's proven optimum by exact.py's search over every count vector, as `solve_milp` reports."""
    started = time.perf_counter()
    phy2log, peak = exact.host_optimum(
        np.array([loads], dtype=np.float64), num_replicas, num_gpus, None, ENUMERATION_TIES
    )
    slots = phy2log[0].tolist()
    copies = np.bincount(phy2log[0], minlength=len(loads)).tolist()
    optimum = float(peak[0])
    found = {"optimum": optimum, "bound": optimum, "status": "optimal", "prover": "enumeration"}
    gpu_experts = [slots[2 * g : 2 * g + 2] for g in range(num_gpus)]
    return found | {"seconds": time.perf_counter() - started, "copies": copies, "gpu_experts": gpu_experts}


def instance_key(inst: dict) -> str:
    """The cache key: loads are integers (token counts), which keeps it exact."""
    return hashlib.sha256(json.dumps([inst["loads"], inst["num_replicas"], inst["num_gpus"]]).encode()).hexdigest()[:16]


def layer_loads(kind: str, experts: int, seed: int) -> list[float]:
    """One layer of `kind`, scaled to about 100 tokens per expert and rounded to counts (at least 1)."""
    rng = np.random.default_rng(seed)
    raw = {
        "zipf": lambda: workloads.zipf(1, experts, rng.uniform(0.8, 1.5), rng),
        "lognormal": lambda: workloads.lognormal(1, experts, rng, sigma=rng.uniform(1.0, 1.5)),
        "two_hot": lambda: workloads.hot_experts(1, experts, rng, hot=2, factor=rng.uniform(4.0, 12.0)),
    }[kind]()[0]
    return [float(v) for v in np.maximum(1, np.rint(raw / raw.sum() * 100 * experts))]


def instances() -> list[dict]:
    """The fixed benchmark set of {name, loads, num_replicas, num_gpus}: the known ones, then kind x size x seed."""
    out = [{"name": name, "loads": list(map(float, w)), "num_replicas": 16, "num_gpus": 8} for name, w, _ in KNOWN]
    for kind in ("zipf", "lognormal", "two_hot"):
        for (experts, gpus, slots), seed in ((size, seed) for size in SIZES for seed in SEEDS):
            loads = layer_loads(kind, experts, 100 * seed + experts + gpus)
            out.append({"name": f"{kind}-e{experts}-g{gpus}x{slots}-s{seed}", "loads": loads, "num_gpus": gpus})
            out[-1]["num_replicas"] = gpus * slots
        for (experts, gpus), seed in ((size, seed) for size in TWO_SLOT_SIZES for seed in SEEDS):
            loads = layer_loads(kind, experts, 100 * seed + experts + gpus)
            name = f"{kind}-e{experts}-g{gpus}x2-s{seed}"
            out.append(
                {"name": name, "loads": loads, "num_replicas": 2 * gpus, "num_gpus": gpus, "prover": "enumeration"}
            )
    return out


def gap_pct(value: float, optimum: float) -> float:
    return 100.0 * (value - optimum) / optimum if optimum > 0 else 0.0


def distribution(gaps: list[float]) -> dict:
    """Mean, p50, p90 and worst of gaps in %, with how many are exactly optimal."""
    if not gaps:
        return {"count": 0}
    p50, p90 = np.percentile(gaps, [50, 90])
    figures = {"mean": np.mean(gaps), "p50": p50, "p90": p90, "worst": max(gaps)}
    return {"count": len(gaps), **figures, "exact": sum(g <= 1e-9 for g in gaps)}


def score(inst: dict, cache: dict[str, dict], time_limit: float, save: bool) -> dict:
    """One row: the optimum (or the best placement known) and each policy's max load and gap; the MILP runs on a
    cache miss or an unproven entry of a shorter time limit, and `save` writes the cache."""
    loads, replicas, gpus, key = inst["loads"], inst["num_replicas"], inst["num_gpus"], instance_key(inst)
    placements = {p: solver_placement(loads, replicas, gpus, p) for p in POLICIES}
    entry = cache.get(key)
    if not entry or (entry["status"] != "optimal" and entry["time_limit"] < time_limit):
        if inst.get("prover") == "enumeration":
            found = solve_by_enumeration(loads, replicas, gpus)
        else:
            found = solve_milp(loads, replicas, gpus, time_limit, list(placements.values()))
        del found["gpu_experts"]
        cache[key] = entry = inst | {"time_limit": time_limit} | found | {"seconds": round(found["seconds"], 3)}
        if save:  # after every solve, so an interrupted run keeps what it paid for
            CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    peaks = {p: placement_max_load(loads, *placed) for p, placed in placements.items()}
    proven = entry["status"] == "optimal"
    # The enumeration scores in float32 (its winner's peak exact): a placement may match it within ~1e-7.
    optimum = entry["optimum"] if proven and "prover" not in entry else min(entry["optimum"], *peaks.values())
    row = {"instance": inst["name"], "E": len(loads), "G": gpus, "R": replicas, "optimum": optimum, "proven": proven}
    row |= {"milp_status": entry["status"], "milp_seconds": entry["seconds"], "prover": entry.get("prover", "MILP")}
    for policy, peak in peaks.items():
        row |= {f"{policy}_max": peak, f"{policy}_gap_pct": gap_pct(peak, optimum)}
    return row | {"milp_gap_pct": gap_pct(optimum, entry["bound"])}


def run(quick: bool = False, time_limit: float | None = None, save: bool = False) -> dict:
    """Every instance scored; uncached ones get `time_limit` seconds (default 2 quick, 20 full)."""
    current = instances()
    cached = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    cache = {key: cached[key] for key in map(instance_key, current) if key in cached}  # drops retired instances
    rows = [score(inst, cache, time_limit or (2.0 if quick else 20.0), save) for inst in current]
    summary = {
        f"{policy}_{label}": distribution([r[f"{policy}_gap_pct"] for r in rows if r["proven"] == proven])
        for policy in POLICIES
        for label, proven in (("proven", True), ("time_limited", False))
    }
    for policy in POLICIES:  # the two-slot layers beyond the count table again, apart (among the proven above)
        enumerated = [r[f"{policy}_gap_pct"] for r in rows if r["prover"] == "enumeration"]
        summary[f"{policy}_two_slot_enumerated"] = distribution(enumerated)
    return {"rows": rows, "summary": summary, "instances": len(rows), "proven": sum(r["proven"] for r in rows)}


INSTANCES = (
    "instance | E | G | R | optimum | auto max | gap % | deepseek max | gap % | MILP s | MILP status",
    "{instance} | {E} | {G} | {R} | {optimum:.2f} | {auto_max:.2f} | {auto_gap_pct:.2f} | {deepseek_max:.2f} |"
    " {deepseek_gap_pct:.2f} | {milp_seconds:.1f} | {milp_outcome}",
)
GAPS = (
    "policy / optima | instances | mean | p50 | p90 | worst | exactly optimal",
    "{optima} | {count} | {mean:.3f} | {p50:.3f} | {p90:.3f} | {worst:.3f} | {exact}",
)


def markdown(result: dict) -> str:
    rows = sorted(result["rows"], key=lambda r: not r["proven"])
    for r in rows:
        outcome = "optimal" if r["proven"] else f"{r['milp_status']} (bound within {r['milp_gap_pct']:.2f} %)"
        r["milp_outcome"] = outcome if r["prover"] == "MILP" else f"{outcome} ({r['prover']})"
    gaps = [d | {"optima": key.replace("_", " ", 1)} for key, d in result["summary"].items() if d["count"]]
    proven = f"{result['instances']} instances, {result['proven']} solved to proven optimality."
    out = [filled(*INSTANCES, rows), proven]
    out += ["**Gap to the optimum, %** (time-limited: to the best placement known, which may not be optimal)"]
    return "\n\n".join([*out, filled(*GAPS, gaps)])


if __name__ == "__main__":  # the command line saves what it solves and defaults to 60 s per uncached instance
    main(lambda quick, time_limit=60.0: run(quick, time_limit, save=True), markdown, __doc__, time_limit=60.0)
