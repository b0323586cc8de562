"""How far the solver's placements are from the exact optimum on small hard layers.

Each instance is one layer: E experts (8-16), R slots on G GPUs with 2-4 slots per GPU, where the
placement problem is hardest for heuristics (few slots leave little room to even out a bad copy choice).
Loads are integer token counts from the shared generators (zipf, lognormal, two very hot experts), many
seeds, plus three instances whose optima are known by hand. The MILP of `milp.py` gives the optimum,
cached in `milp_optima.json` keyed by a hash of the instance, so reruns only pay for new instances.
Proven optima and time-limited ones (best known placement, HiGHS's bound beside it) are reported apart;
the gap distribution of the default policy is taken over the proven ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import workloads
from harness import main, table
from milp import placement_max_load, solve_milp, solver_placement

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


@dataclass(frozen=True)
class Instance:
    """One layer to place; loads are integers (token counts), which keeps the cache key exact."""

    name: str
    loads: tuple[float, ...]
    num_replicas: int
    num_gpus: int

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps([list(self.loads), self.num_replicas, self.num_gpus]).encode()).hexdigest()[
            :16
        ]


def layer_loads(kind: str, experts: int, seed: int) -> tuple[float, ...]:
    """One layer of `kind`, scaled to about 100 tokens per expert and rounded to counts (at least 1)."""
    rng = np.random.default_rng(seed)
    raw = {
        "zipf": lambda: workloads.zipf(1, experts, rng.uniform(0.8, 1.5), rng),
        "lognormal": lambda: workloads.lognormal(1, experts, rng, sigma=rng.uniform(1.0, 1.5)),
        "two_hot": lambda: workloads.hot_experts(1, experts, rng, hot=2, factor=rng.uniform(4.0, 12.0)),
    }[kind]()[0]
    return tuple(float(v) for v in np.maximum(1, np.rint(raw / raw.sum() * 100 * experts)))


def instances() -> list[Instance]:
    """The fixed benchmark set: the known instances, then every kind x size x seed."""
    out = [Instance(name, tuple(float(w) for w in loads), 16, 8) for name, loads, _ in KNOWN]
    for kind in ("zipf", "lognormal", "two_hot"):
        for (experts, gpus, slots), seed in ((size, seed) for size in SIZES for seed in SEEDS):
            loads = layer_loads(kind, experts, 100 * seed + experts + gpus)
            out.append(Instance(f"{kind}-e{experts}-g{gpus}x{slots}-s{seed}", loads, gpus * slots, gpus))
    return out


def milp_entry(inst: Instance, cache: dict[str, dict], time_limit: float, starts: list, save: bool) -> dict:
    """Cached MILP result, re-solved only when missing, or unproven under a shorter time limit."""
    entry = cache.get(inst.key)
    if entry and (entry["status"] == "optimal" or entry["time_limit"] >= time_limit):
        return entry
    res = solve_milp(list(inst.loads), inst.num_replicas, inst.num_gpus, time_limit=time_limit, starts=starts)
    found = {key: value for key, value in asdict(res).items() if key != "gpu_experts"} | {
        "seconds": round(res.seconds, 3)
    }
    cache[inst.key] = entry = asdict(inst) | {"loads": list(inst.loads), "time_limit": time_limit} | found
    if save:  # after every solve, so an interrupted run keeps what it paid for
        CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return entry


def policy_max_load(loads: list[float], num_replicas: int, num_gpus: int, policy: str) -> float:
    """Max GPU load of the solver's placement for one layer under `policy`."""
    return placement_max_load(loads, *solver_placement(loads, num_replicas, num_gpus, policy))


def gap_pct(value: float, optimum: float) -> float:
    return 100.0 * (value - optimum) / optimum if optimum > 0 else 0.0


def distribution(gaps: list[float]) -> dict:
    """Mean, p50, p90 and worst of gaps in %, with how many are exactly optimal."""
    if not gaps:
        return {"count": 0}
    p50, p90 = np.percentile(gaps, [50, 90])
    return {
        "count": len(gaps),
        "mean": np.mean(gaps),
        "p50": p50,
        "p90": p90,
        "worst": max(gaps),
        "exact": sum(g <= 1e-9 for g in gaps),
    }


def score(inst: Instance, cache: dict[str, dict], time_limit: float, save: bool) -> dict:
    """One row: the optimum (or, time-limited, the best placement known, a policy's when better) and each
    policy's max load and gap to it; the policies' placements seed the MILP as incumbents."""
    placements = {p: solver_placement(inst.loads, inst.num_replicas, inst.num_gpus, p) for p in POLICIES}
    peaks = {p: placement_max_load(inst.loads, *placement) for p, placement in placements.items()}
    entry = milp_entry(inst, cache, time_limit, list(placements.values()), save)
    proven = entry["status"] == "optimal"
    optimum = entry["optimum"] if proven else min(entry["optimum"], *peaks.values())
    row = {"instance": inst.name, "E": len(inst.loads), "G": inst.num_gpus, "R": inst.num_replicas, "optimum": optimum}
    row |= {
        "proven": proven,
        "milp_status": entry["status"],
        "milp_gap_pct": gap_pct(optimum, entry["bound"]),
        "milp_seconds": entry["seconds"],
    }
    for policy, peak in peaks.items():
        row |= {f"{policy}_max": peak, f"{policy}_gap_pct": gap_pct(peak, optimum)}
    return row


def run(quick: bool = False, time_limit: float | None = None, save: bool = False) -> dict:
    """Solve (or read) every optimum and score the policies; returns {"rows": [...], "summary": {...}}.
    Uncached instances get `time_limit` seconds (default 2 quick, 20 full); `save` writes the cache."""
    current = instances()
    keys = {inst.key for inst in current}
    cached = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    cache = {key: entry for key, entry in cached.items() if key in keys}  # drops retired instances
    rows = [score(inst, cache, time_limit or (2.0 if quick else 20.0), save) for inst in current]
    summary = {
        f"{policy}_{label}": distribution([r[f"{policy}_gap_pct"] for r in rows if r["proven"] == proven])
        for policy in POLICIES
        for label, proven in (("proven", True), ("time_limited", False))
    }
    return {"rows": rows, "summary": summary, "instances": len(rows), "proven": sum(r["proven"] for r in rows)}


def markdown(result: dict) -> str:
    """The per-instance table (proven first), then the gap distributions."""
    cells = [
        [r["instance"], r["E"], r["G"], r["R"], f"{r['optimum']:.2f}"]
        + [f"{r[f'{p}_{field}']:.2f}" for p in POLICIES for field in ("max", "gap_pct")]
        + [
            f"{r['milp_seconds']:.1f}",
            "optimal" if r["proven"] else f"{r['milp_status']} (bound within {r['milp_gap_pct']:.2f} %)",
        ]
        for r in sorted(result["rows"], key=lambda r: not r["proven"])
    ]
    head = [
        "instance",
        "E",
        "G",
        "R",
        "optimum",
        *(h for p in POLICIES for h in (f"{p} max", "gap %")),
        "MILP s",
        "MILP status",
    ]
    distributions = [
        [
            key.replace("_", " ", 1),
            d["count"],
            *(f"{d[name]:.3f}" for name in ("mean", "p50", "p90", "worst")),
            d["exact"],
        ]
        for key, d in result["summary"].items()
        if d["count"]
    ]
    return "\n\n".join(
        [
            table(head, cells),
            f"{result['instances']} instances, {result['proven']} solved to proven optimality.",
            "**Gap to the optimum, %** (time-limited: to the best placement known, which may not be optimal)",
            table(["policy / optima", "instances", "mean", "p50", "p90", "worst", "exactly optimal"], distributions),
        ]
    )


if __name__ == "__main__":  # the command line saves what it solves and defaults to 60 s per uncached instance
    main(lambda quick, time_limit=60.0: run(quick, time_limit, save=True), markdown, __doc__, time_limit=60.0)
