"""The NumPy hierarchical path for small two-slot node problems places exactly as the torch path does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rebalancer.solver import hierarchical, small

# (experts, slots, groups, nodes, GPUs): two groups per node (the pairing of groups) and more.
SHAPES = [(12, 16, 4, 2, 8), (16, 32, 4, 2, 16), (12, 24, 4, 2, 12), (24, 32, 8, 4, 16), (12, 16, 6, 2, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("source", ["lognormal", "integers"])
def test_small_hierarchical_matches_torch_path(shape, source):
    num_experts, num_replicas, num_groups, num_nodes, num_gpus = shape
    assert small.applies(torch.device("cpu"), num_experts, num_replicas, num_nodes, num_gpus, False)
    rng = np.random.default_rng(num_experts * 100 + num_groups)
    for trial in range(6):
        num_layers = 1 + trial % 4
        if source == "integers":  # ties and all-zero layers
            loads = rng.integers(0, 4, (num_layers, num_experts)).astype(np.float64)
        else:
            loads = np.exp(1.5 * rng.standard_normal((num_layers, num_experts)))
        loads = torch.from_numpy(loads / np.maximum(loads.max(1, keepdims=True), 1e-9))
        # Half the trials with a ceiling that rules some layers out.
        ceiling = None if trial % 2 else loads.sum(1) / num_gpus * (1.0 + torch.from_numpy(rng.random(num_layers)))
        got, got_peak = small.plan_hierarchical(loads, num_replicas, num_groups, num_nodes, num_gpus, ceiling)
        seeds = torch.arange(num_layers)
        want, want_peak = hierarchical.plan_hierarchical(
            loads, num_replicas, num_groups, num_nodes, num_gpus, seeds, 4, ceiling
        )
        # A layer stays local where its plan is within the ceiling; beyond it the host path may stop early.
        bound = torch.full_like(want_peak, torch.inf) if ceiling is None else ceiling
        within = (want_peak <= bound) & torch.isfinite(want_peak)
        assert torch.equal((got_peak <= bound) & torch.isfinite(got_peak), within)
        assert torch.equal(got[within], want[within])
        assert torch.equal(got_peak[within], want_peak[within])


def test_small_path_only_where_exact_solves_the_nodes():
    cpu = torch.device("cpu")
    assert not small.applies(cpu, 256, 288, 4, 32, False)  # 9 slots per GPU
    assert not small.applies(cpu, 12, 16, 2, 8, True)  # scenarios steer a candidate choice
    assert not small.applies(torch.device("meta"), 12, 16, 2, 8, False)


@pytest.mark.parametrize("shape", [(12, 16, 4, 2, 8), (16, 32, 4, 2, 16), (16, 32, 8, 4, 16), (12, 24, 6, 3, 12)])
def test_host_auto_path_places_as_the_torch_route(shape, monkeypatch):
    """`small.plan_auto` (flat by exact or the climb, local host-side, the choice in NumPy) gives the
    placements and policy names of the general route through `planner.plan` and the hierarchical plan."""
    from rebalancer.solver import solve

    num_experts, num_replicas, num_groups, num_nodes, num_gpus = shape
    assert small.serves_auto(torch.device("cpu"), num_experts, num_replicas, num_nodes, num_gpus, 4, False)
    rng = np.random.default_rng(num_experts + num_groups)
    loads = torch.from_numpy(np.exp(1.3 * rng.standard_normal((6, num_experts))))
    loads[1] = 0.0
    loads[2] = 1.0
    host = solve(loads, num_replicas, num_groups, num_nodes, num_gpus, device="cpu")
    monkeypatch.setattr(small, "serves_auto", lambda *args: False)
    general = solve(loads, num_replicas, num_groups, num_nodes, num_gpus, device="cpu")
    assert torch.equal(host.phy2log, general.phy2log)
    assert host.policy_per_layer == general.policy_per_layer
