"""The exact two-slot search: the CPU's pruned, compiled scoring reaches the optimum the torch path finds
by scoring the whole count table, on skewed, rounded (tied) and all-zero rows. Among tied optima the two
may pick different placements (the CPU indexes the table over experts sorted by load)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from rebalancer.solver import exact


@pytest.mark.parametrize(("num_experts", "num_replicas"), [(4, 8), (5, 10), (6, 8), (8, 16), (12, 16)])
def test_cpu_search_equals_scoring_the_whole_table(num_experts: int, num_replicas: int) -> None:
    rng = np.random.default_rng(num_experts * 100 + num_replicas)
    loads = rng.random((12, num_experts)) ** 3
    loads[::3] = np.round(loads[::3] * 4) / 4  # equal loads: the tie rule decides
    loads[5] = 0.0
    loads /= np.where(loads.max(1, keepdims=True) > 0, loads.max(1, keepdims=True), 1.0)
    num_gpus = num_replicas // 2
    phy2log, peak = exact.host_optimum(loads, num_replicas, num_gpus)
    counts = exact.count_vectors(num_experts, num_replicas, torch.device("cpu"))
    whole_table = torch.arange(counts.shape[0]).unsqueeze(0)
    expected, expected_peak, _ = exact._score(torch.from_numpy(loads), counts, whole_table, num_gpus)
    assert torch.equal(torch.from_numpy(peak), expected_peak)
    hosted = np.sort(phy2log, axis=1)
    assert all(set(row.tolist()) == set(range(num_experts)) for row in hosted)
    counts_per_row = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
    gpu_loads = loads[np.arange(len(loads))[:, None], phy2log] / np.take_along_axis(counts_per_row, phy2log, 1)
    assert np.allclose(gpu_loads.reshape(len(loads), num_gpus, 2).sum(-1).max(1), peak, rtol=1e-12, atol=0)
    assert expected.shape == phy2log.shape


def test_few_count_vectors_agrees_with_the_binomial_without_computing_it_whole():
    for experts in range(1, 25):
        for replicas in range(experts, 50):
            for limit in (0, 1, 9, 1365, 10**6):
                expected = math.comb(replicas - 1, experts - 1) <= limit
                assert exact.few_count_vectors(experts, replicas, limit) == expected, (experts, replicas, limit)
    # A shape the service costs on its event loop: answered from the first terms of the product.
    assert not exact.few_count_vectors(2**16, 2**19, 1365)
