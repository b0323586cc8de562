"""How far the solver's placements are from the exact optimum on small hard layers.

Each instance is one layer: E experts (8-16), R slots on G GPUs with 2-4 slots per GPU, where the
placement problem is hardest for heuristics (few slots leave little room to even out a bad copy choice).
Loads are integer token counts from the shared generators (zipf, lognormal, two very hot experts), many
seeds, plus three instances whose optima are known by hand. The MILP of `milp.py` gives the optimum,
cached in `milp_optima.json` keyed by a hash of the instance, so reruns only pay for new instances.
Proven optima and time-limited ones (best known placement, HiGHS's bound beside it) are reported apart;
the gap distribution of the default policy is taken over the proven ones.
Run: `python benchmarks/optimality_bench.py [--time-limit S]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import workloads
from milp import placement_max_load, solve_milp, solver_placement
from tables import table

CACHE = Path(__file__).resolve().parent / "milp_optima.json"
POLICIES = ("auto", "deepseek")
# Hand-checked optima (the joint replication trap and the DeepSeek EPLB README layers), all on 8 GPUs x 2 slots.
KNOWN: list[tuple[str, list[float], float]] = [
    ("spec-greedy-trap", [600, 560, 120, 120, 20, 10, 10, 10], 590 / 3),
    ("deepseek-readme-l0", [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], 136.0),
    ("deepseek-readme-l1", [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27], 172.0),
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
        blob = json.dumps([list(self.loads), self.num_replicas, self.num_gpus])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
        for experts, gpus, slots in SIZES:
            for seed in SEEDS:
                name = f"{kind}-e{experts}-g{gpus}x{slots}-s{seed}"
                out.append(Instance(name, layer_loads(kind, experts, 100 * seed + experts + gpus), gpus * slots, gpus))
    return out


def load_cache(path: Path = CACHE) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.exists() else {}


def save_cache(cache: dict[str, dict], path: Path = CACHE) -> None:
    path.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")


def milp_entry(inst: Instance, cache: dict[str, dict], time_limit: float, starts: list, save: bool) -> dict:
    """Cached MILP result, re-solved only when missing, or unproven under a shorter time limit."""
    entry = cache.get(inst.key)
    if entry and (entry["status"] == "optimal" or entry["time_limit"] >= time_limit):
        return entry
    res = solve_milp(list(inst.loads), inst.num_replicas, inst.num_gpus, time_limit=time_limit, starts=starts)
    cache[inst.key] = entry = {
        "name": inst.name,
        "loads": list(inst.loads),
        "num_replicas": inst.num_replicas,
        "num_gpus": inst.num_gpus,
        "optimum": res.optimum,
        "bound": res.bound,
        "status": res.status,
        "seconds": round(res.seconds, 3),
        "time_limit": time_limit,
        "copies": res.copies,
    }
    if save:  # after every solve, so an interrupted run keeps what it paid for
        save_cache(cache)
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


def run(quick: bool = False, time_limit: float | None = None, save: bool = False) -> dict:
    """Solve (or read) every optimum and score the policies; returns {"rows": [...], "summary": {...}}.

    The policies' placements seed the MILP as incumbents. When the MILP stops at its time limit, "optimum"
    is the best placement known (a policy's, when better) and `milp_gap_pct` says how far the proven
    bound is below it. Uncached instances get `time_limit` seconds (default 2 quick, 20 full).
    """
    time_limit = time_limit or (2.0 if quick else 20.0)
    current = instances()
    keys = {inst.key for inst in current}
    cache = {key: entry for key, entry in load_cache().items() if key in keys}  # drops retired instances
    rows = []
    for inst in current:
        placements = {p: solver_placement(inst.loads, inst.num_replicas, inst.num_gpus, p) for p in POLICIES}
        scored = {p: (placement_max_load(inst.loads, *placement), placement) for p, placement in placements.items()}
        entry = milp_entry(inst, cache, time_limit, list(placements.values()), save)
        proven = entry["status"] == "optimal"
        optimum = entry["optimum"] if proven else min(entry["optimum"], *(peak for peak, _ in scored.values()))
        row = {
            "instance": inst.name,
            "E": len(inst.loads),
            "G": inst.num_gpus,
            "R": inst.num_replicas,
            "optimum": optimum,
            "proven": proven,
            "milp_status": entry["status"],
            "milp_gap_pct": gap_pct(optimum, entry["bound"]),
            "milp_seconds": entry["seconds"],
        }
        for policy, (peak, _) in scored.items():
            row[f"{policy}_max"] = peak
            row[f"{policy}_gap_pct"] = gap_pct(peak, optimum)
        rows.append(row)
    summary = {
        f"{policy}_{label}": distribution([r[f"{policy}_gap_pct"] for r in rows if r["proven"] == proven])
        for policy in POLICIES
        for label, proven in (("proven", True), ("time_limited", False))
    }
    return {"rows": rows, "summary": summary, "instances": len(rows), "proven": sum(r["proven"] for r in rows)}


def _status(row: dict) -> str:
    return "optimal" if row["proven"] else f"{row['milp_status']} (bound within {row['milp_gap_pct']:.2f} %)"


def markdown(result: dict) -> str:
    """The per-instance table (proven first), then the gap distributions."""
    cells = [
        [r["instance"], r["E"], r["G"], r["R"], f"{r['optimum']:.2f}"]
        + [f"{r[f'{p}_{field}']:.2f}" for p in POLICIES for field in ("max", "gap_pct")]
        + [f"{r['milp_seconds']:.1f}", _status(r)]
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
    return "\n".join(
        [
            table(head, cells),
            "",
            f"{result['instances']} instances, {result['proven']} solved to proven optimality.",
            "",
            "**Gap to the optimum, %** (time-limited: to the best placement known, which may not be optimal)",
            "",
            table(["policy / optima", "instances", "mean", "p50", "p90", "worst", "exactly optimal"], distributions),
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=60.0, help="MILP seconds per uncached instance")
    print(markdown(run(time_limit=parser.parse_args().time_limit, save=True)))
