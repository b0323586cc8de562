"""The solver against exact optima: the MILP is checked on hand-known optima, the solver on the optima
cached in `benchmarks/milp_optima.json` by `benchmarks/optimality_bench.py`, so no long MILP runs here."""

from __future__ import annotations

import json

import pytest
import torch
from optimality_bench import CACHE, KNOWN, gap_pct, instances, placement_max_load, solve_milp, solver_placement
from rebalancer_testkit.workloads import lower_bound

# Instances HiGHS proves in well under a second (the published trap and the other README layer take
# 5-40 s, so their cached optima are checked instead): (name, loads, replicas, GPUs, optimum). Three copies
# of the heavy expert, one per GPU beside a light one, reach the bound 13 / 3.
FAST_KNOWN = [
    ("one-heavy-expert", [10.0, 1.0, 1.0, 1.0], 6, 3, 13 / 3),
    *((name, loads, 16, 8, optimum) for name, loads, optimum in KNOWN if name == "deepseek-readme-l1"),
]


def policy_max_load(loads: list[float], num_replicas: int, num_gpus: int, policy: str) -> float:
    return placement_max_load(loads, *solver_placement(loads, num_replicas, num_gpus, policy))


def _cached() -> list[dict]:
    return list(json.loads(CACHE.read_text()).values()) if CACHE.exists() else []


@pytest.mark.parametrize(("name", "loads", "replicas", "gpus", "optimum"), FAST_KNOWN, ids=[k[0] for k in FAST_KNOWN])
def test_milp_reproduces_known_optimum(name: str, loads: list[float], replicas: int, gpus: int, optimum: float) -> None:
    res = solve_milp(loads, replicas, gpus, time_limit=60)
    assert res["status"] == "optimal", f"{name}: MILP did not prove optimality ({res['status']})"
    assert res["optimum"] == pytest.approx(optimum, rel=1e-9)
    # The returned placement is a real one: R slots, R / G per GPU, every expert present, load = optimum.
    assert sorted(len(g) for g in res["gpu_experts"]) == [replicas // gpus] * gpus
    assert sum(res["copies"]) == replicas and min(res["copies"]) >= 1
    assert placement_max_load(loads, res["copies"], res["gpu_experts"]) == pytest.approx(optimum, rel=1e-12)


def test_lower_bound_is_tight_on_trivial_cases() -> None:
    # Equal loads, one copy each: the bound total / G is reached exactly.
    assert float(lower_bound(torch.full((1, 8), 5.0), 8, 4)[0]) == 10.0
    # One expert with all the load: best max per-copy load w / (R - E + 1) beats total / G.
    assert float(lower_bound(torch.tensor([[90.0, 0.0, 0.0]]), 5, 5)[0]) == 30.0


@pytest.mark.parametrize(("name", "loads", "optimum"), KNOWN, ids=[k[0] for k in KNOWN])
def test_auto_within_one_percent_of_known_optimum(name: str, loads: list[float], optimum: float) -> None:
    got = policy_max_load(loads, 16, 8, "auto")
    gap = gap_pct(got, optimum)
    assert got <= optimum * 1.01, f"{name}: auto max load {got:.2f} is {gap:.2f} % above {optimum:.2f}"


def test_cache_covers_the_benchmark() -> None:
    by_key = {(tuple(e["loads"]), e["num_replicas"], e["num_gpus"]): e for e in _cached()}
    missing = [i["name"] for i in instances() if (tuple(i["loads"]), i["num_replicas"], i["num_gpus"]) not in by_key]
    assert not missing, f"run benchmarks/optimality_bench.py to fill milp_optima.json: {missing}"
    assert sum(e["status"] == "optimal" for e in by_key.values()) >= 60
    for name, loads, optimum in KNOWN:
        entry = by_key[(tuple(float(w) for w in loads), 16, 8)]
        assert entry["status"] == "optimal" and entry["optimum"] == pytest.approx(optimum, rel=1e-9), name


def test_no_policy_beats_a_proven_bound() -> None:
    # Consistency of MILP and solver: a placement below the MILP's proven bound would mean a wrong model.
    for entry in _cached():
        for policy in ("deepseek", "auto"):
            got = policy_max_load(entry["loads"], entry["num_replicas"], entry["num_gpus"], policy)
            assert got >= entry["bound"] * (1 - 1e-9), (entry["name"], policy)


def test_auto_gap_within_the_bars_over_proven_optima() -> None:
    # The figures to reach on small skewed layers: mean gap <= 0.3 %, worst <= 2 %.
    proven = [e for e in _cached() if e["status"] == "optimal"]
    if not proven:
        pytest.skip("no cached optima: run benchmarks/optimality_bench.py")
    gaps = {
        e["name"]: gap_pct(policy_max_load(e["loads"], e["num_replicas"], e["num_gpus"], "auto"), e["optimum"])
        for e in proven
    }
    mean = sum(gaps.values()) / len(gaps)
    worst = max(gaps, key=gaps.__getitem__)
    summary = f"auto mean gap {mean:.3f} % over {len(gaps)} instances (worst {worst}: {gaps[worst]:.3f} %)"
    assert mean <= 0.3 and gaps[worst] <= 2.0, summary
