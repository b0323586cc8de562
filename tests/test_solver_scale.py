"""Placement does not depend on the unit of the loads: tokens, fractions or 1e37-sized counters give the
same maps (the solver plans on per-layer scaled loads, so float32 sums never overflow)."""

from __future__ import annotations

import pytest
import torch
from rebalancer.solver import rebalance_experts


@pytest.mark.parametrize("policy", ["auto", "global", "hierarchical"])
@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1e6, 1e37])
def test_maps_are_the_same_at_any_load_scale(policy, scale):
    generator = torch.Generator().manual_seed(5)
    weight = torch.rand(3, 32, generator=generator, dtype=torch.float64) ** 4 + 0.01
    unit = rebalance_experts(weight, 40, 4, 2, 8, policy=policy)
    scaled = rebalance_experts(weight * scale, 40, 4, 2, 8, policy=policy)
    for a, b in zip(unit, scaled, strict=True):
        assert torch.equal(a, b)
