"""Slot advice: the balancedness each slots-per-GPU count reaches, as the solver plans it."""

from __future__ import annotations

import pytest
import torch
from rebalancer.solver import advise_slots, solve
from rebalancer.solver.planner import TARGET_SLACK
from rebalancer_testkit.workloads import lower_bound, make

SHAPE = dict(num_groups=4, num_nodes=2, num_gpus=8)


@pytest.mark.parametrize("kind", ["zipf", "hot", "lognormal"])
def test_more_slots_never_balance_worse(kind: str) -> None:
    loads = make(kind, 4, 32, seed=3)
    advice = advise_slots(loads, **SHAPE)
    assert advice.slots_per_gpu == [4, 5, 6, 7, 8]
    # Refinement stops within TARGET_SLACK of a count's lower bound, so two counts that both reach their
    # bound may come out in either order by up to that much; anything larger would be a real dip.
    steps = advice.balancedness.diff()
    assert bool((steps >= -TARGET_SLACK).all()), advice.rows()
    assert bool((advice.ceiling.diff() >= -1e-12).all())
    # Skewed loads gain from the first redundant slots.
    assert float(advice.balancedness[-1]) > float(advice.balancedness[0])


def test_each_count_matches_solving_at_that_count() -> None:
    loads = make("zipf", 3, 32, seed=1)
    advice = advise_slots(loads, **SHAPE, slots_per_gpu=[6, 4], seed=7)
    assert advice.slots_per_gpu == [4, 6]
    assert advice.num_replicas == [32, 48]
    for row, replicas in enumerate(advice.num_replicas):
        solved = solve(loads, replicas, **SHAPE, seed=7)
        assert torch.equal(advice.balancedness_per_layer[row], solved.balancedness.double())


def test_bound_and_ceiling_bracket_the_plan() -> None:
    loads = make("hot", 2, 16, seed=2)
    advice = advise_slots(loads, **SHAPE)
    assert bool((advice.max_over_bound >= 1 - 1e-9).all())
    assert bool((advice.ceiling >= advice.balancedness - 1e-9).all())
    # The ceiling is the mean over the layers of mean load / lower bound.
    replicas = advice.num_replicas[0]
    bound = lower_bound(loads.double(), replicas, SHAPE["num_gpus"])
    expected = (loads.double().sum(-1) / SHAPE["num_gpus"] / bound).mean()
    assert float(advice.ceiling[0]) == pytest.approx(float(expected), rel=1e-9)


def test_a_window_is_planned_on_its_sum() -> None:
    window = torch.stack([make("zipf", 2, 16, seed=s) for s in range(3)])
    from_window = advise_slots(window, **SHAPE)
    from_sum = advise_slots(window.sum(0), **SHAPE)
    assert torch.equal(from_window.balancedness_per_layer, from_sum.balancedness_per_layer)


def test_all_zero_layers_are_perfectly_balanced_at_every_count() -> None:
    advice = advise_slots(torch.zeros(2, 16), **SHAPE, slots_per_gpu=[2, 3])
    assert torch.equal(advice.balancedness, torch.ones(2, dtype=torch.float64))
    assert torch.equal(advice.max_over_bound, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("counts", [[1], [], [2.5]])
def test_counts_that_cannot_host_every_expert_are_refused(counts: list) -> None:
    with pytest.raises(ValueError, match="slots_per_gpu"):
        advise_slots(make("zipf", 1, 16), **SHAPE, slots_per_gpu=counts)


def test_rows_are_plain_records() -> None:
    rows = advise_slots(make("zipf", 1, 16), **SHAPE, slots_per_gpu=[2]).rows()
    assert rows[0]["slots_per_gpu"] == 2 and rows[0]["num_replicas"] == 16
    assert 0 < rows[0]["balancedness"] <= rows[0]["ceiling"] <= 1
