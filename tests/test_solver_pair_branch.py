"""The branch and bound over copy counts for two slots per GPU: exact without a budget (against the
enumeration of exact.py), never above the plan it starts from, within its budget, and what it adds to
the CPU climb."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rebalancer.solver import exact, maps, pair_branch, pair_search


def _ranked(num_experts: int, seed: int, kind: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    loads = [np.exp(1.3 * rng.standard_normal(num_experts)), 1.0 + 0.1 * rng.random(num_experts)][kind]
    if kind == 0 and seed % 3 == 0:
        loads[:2] *= 20.0  # two very hot experts
    return np.sort(loads / loads.max())[::-1].copy()


@pytest.mark.parametrize(("num_experts", "num_gpus"), [(8, 8), (10, 6), (12, 8), (7, 9)])
def test_without_a_budget_it_finds_the_exact_optimum(num_experts: int, num_gpus: int) -> None:
    for seed in range(12):
        ranked = _ranked(num_experts, seed, seed % 2)
        _, optimum = exact.host_optimum(ranked[None], 2 * num_gpus, num_gpus)
        counts = np.ones(num_experts, dtype=np.int64)
        counts[0] += 2 * num_gpus - num_experts  # any plan: the search must go below it
        start = pair_branch.sizes_peak(ranked / counts, counts, np.empty(num_experts, dtype=np.int64))
        found = pair_branch.lower_counts(ranked, 2 * num_gpus, counts, start, 10**9)
        assert found == pytest.approx(float(optimum[0]), rel=1e-6)
        assert int(counts.sum()) == 2 * num_gpus and int(counts.min()) >= 1
        assert pair_branch.sizes_peak(ranked / counts, counts, np.empty(num_experts, dtype=np.int64)) == found


def test_the_pairing_peak_is_the_optimal_pairing_score() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        num_experts = int(rng.integers(2, 17))
        num_replicas = 2 * int(rng.integers(num_experts // 2 + 1, 17))
        ranked = np.sort(rng.random(num_experts) ** 3)[::-1].copy()
        counts = 1 + rng.multinomial(num_replicas - num_experts, np.ones(num_experts) / num_experts)
        peak, _ = pair_search.pair_scores(ranked[None], counts[None], num_replicas // 2)
        order = np.empty(num_experts, dtype=np.int64)
        assert pair_branch.sizes_peak(ranked / counts, counts, order) == pytest.approx(float(peak[0]), rel=1e-12)


def test_it_keeps_the_plan_it_starts_from_without_steps_or_on_an_all_zero_layer() -> None:
    ranked = _ranked(16, 1, 1)
    counts = np.full(16, 2, dtype=np.int64)
    start = pair_branch.sizes_peak(ranked / counts, counts, np.empty(16, dtype=np.int64))
    assert pair_branch.lower_counts(ranked, 32, counts, start, 0) == start
    assert bool((counts == 2).all())
    zeros = np.zeros(16)
    assert pair_branch.lower_counts(zeros, 32, counts, 0.0, 10**6) == 0.0
    assert bool((counts == 2).all())


def test_the_cpu_climb_with_it_is_never_worse_and_lower_on_near_equal_loads(monkeypatch) -> None:
    # 16 near-equal experts on 14 GPUs x 2 slots: the climb stops about 10 % above the optimum (measured).
    loads = np.stack([_ranked(16, seed, 1) for seed in range(4)] + [_ranked(16, seed, 0) for seed in range(4)])
    with_search, with_peak = pair_search.pair_plan(torch.from_numpy(loads), 28, 14)
    monkeypatch.setattr(pair_search, "NODE_BUDGET", 0)
    _, climb_peak = pair_search.pair_plan(torch.from_numpy(loads), 28, 14)
    assert bool((with_peak <= climb_peak).all())
    assert bool((with_peak[:4] < climb_peak[:4] * 0.97).all())
    logcnt = maps.logcnt_from_phy2log(with_search, 16)
    assert bool((logcnt >= 1).all()) and bool((logcnt.sum(1) == 28).all())
    gpu_loads = maps.gpu_loads(torch.from_numpy(loads), with_search, logcnt, 14)
    torch.testing.assert_close(with_peak, gpu_loads.max(1).values, rtol=1e-12, atol=0.0)


def test_the_enumeration_with_few_kept_ties_and_the_unbounded_search_agree_beyond_the_table() -> None:
    # Two independent exact searches (exact.py's table-order enumeration with its own cuts, and this one)
    # on 16 experts over 32 slots, where the count table (3e8 vectors) is far too large to keep.
    for seed in range(4):
        ranked = _ranked(16, seed, seed % 2)
        _, enumerated = exact.host_optimum(ranked[None], 32, 16, None, 256)
        counts = np.ones(16, dtype=np.int64)
        searched = pair_branch.lower_counts(ranked, 32, counts, float(ranked.sum()), 10**9)
        assert searched == pytest.approx(float(enumerated[0]), rel=1e-6)


def test_few_kept_ties_leave_the_optimum_unchanged_on_table_sized_rows() -> None:
    rng = np.random.default_rng(3)
    loads = rng.random((30, 10)) ** 3
    _, full = exact.host_optimum(loads, 16, 8)
    _, few = exact.host_optimum(loads, 16, 8, None, 2)
    np.testing.assert_array_equal(full, few)
