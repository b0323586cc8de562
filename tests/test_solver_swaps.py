"""The incremental plan's swaps: the cheapest swap that reaches the target, never a second copy of an expert
on one GPU, copy counts unchanged, at most `max_swaps` a layer, and fewer copies shipped than swapping by
load alone."""

from __future__ import annotations

import pytest
import torch
from rebalancer.solver import maps, solve
from rebalancer.solver.packing import swap_refine
from rebalancer.solver.refinement import RefineLimits
from rebalancer.solver.swaps import cheapest_swaps
from rebalancer_testkit.workloads import drift_series

LAYERS, EXPERTS, SLOTS, GPUS = 12, 64, 80, 8


def _loads_of_gpus(copy_loads: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    return copy_loads.gather(1, phy2log).view(phy2log.shape[0], num_gpus, -1).sum(-1)


def _drifted(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(copy loads of the next window, the placement in force, a target 1 % above the fresh plan's peak)."""
    series = drift_series(LAYERS, EXPERTS, 2, seed=seed)
    prev = solve(series[0], SLOTS, 1, 1, GPUS, device="cpu").phy2log
    loads = series[1].double()
    copy_loads = loads / maps.logcnt_from_phy2log(prev, EXPERTS)
    fresh_peak = loads.sum(-1) / GPUS / solve(series[1], SLOTS, 1, 1, GPUS, device="cpu").balancedness.double()
    return copy_loads, prev, fresh_peak * 1.01


def _levelling_swaps(copy_loads, prev, targets, max_swaps) -> torch.Tensor:
    """Swapping by load alone: the heaviest GPU levelled against the best of its 8 lightest partners."""
    slot_loads = copy_loads.gather(1, prev).to(torch.float32).view(LAYERS, GPUS, -1)
    limits = RefineLimits(num_partners=8, pair_rounds=0, heaviest_rounds=max_swaps)
    _, items = swap_refine(slot_loads, prev.view(LAYERS, GPUS, -1), targets.to(torch.float32), limits)
    return items.reshape(LAYERS, -1)


@pytest.mark.parametrize("seed", range(4))
def test_swaps_reach_the_target_shipping_fewer_copies_than_levelling(seed: int) -> None:
    copy_loads, prev, targets = _drifted(seed)
    swapped = cheapest_swaps(copy_loads, prev, prev, GPUS, targets, 40)
    levelled = _levelling_swaps(copy_loads, prev, targets, 40)
    peaks = _loads_of_gpus(copy_loads, swapped, GPUS).max(-1).values
    levelled_peaks = _loads_of_gpus(copy_loads, levelled, GPUS).max(-1).values
    reached, levelled_reached = peaks <= targets * (1 + 1e-9), levelled_peaks <= targets * (1 + 1e-6)
    assert bool((reached | ~levelled_reached).all()), "a layer levelling balances is left above its target"
    shipped = int(maps.moved_copies(prev, swapped, EXPERTS, GPUS).sum())
    assert shipped < int(maps.moved_copies(prev, levelled, EXPERTS, GPUS).sum())
    assert torch.equal(maps.logcnt_from_phy2log(swapped, EXPERTS), maps.logcnt_from_phy2log(prev, EXPERTS))
    per_gpu = maps.expert_histogram(swapped, EXPERTS, GPUS)
    assert int(per_gpu.max()) <= int(maps.expert_histogram(prev, EXPERTS, GPUS).max()), "a second copy on a GPU"


def test_of_the_swaps_that_reach_the_target_the_one_shipping_fewest_copies_wins() -> None:
    # 3 GPUs x 2 slots. Before: GPU 0 [0, 1], GPU 1 [2, 3], GPU 2 [4, 5]; now 2 and 1 have traded places.
    # GPU 0 (loads 1 + 2) is over the target 2.6. Swapping its 0 with 5 (GPU 2) and its 2 with 4 both
    # leave 2.5 at most, but the first ships two copies (0 and 5 are new where they land) and the second
    # one (4; 2 was shipped to GPU 0 already, so it only changes destination).
    prev = torch.tensor([[0, 1, 2, 3, 4, 5]])
    now = torch.tensor([[0, 2, 1, 3, 4, 5]])
    copy_loads = torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0, 0.5]], dtype=torch.float64)
    target = torch.tensor([2.6], dtype=torch.float64)
    swapped = cheapest_swaps(copy_loads, prev, now, 3, target, 1)
    assert swapped.tolist() == [[0, 4, 1, 3, 2, 5]]
    assert int(maps.moved_copies(prev, swapped, 6, 3).sum()) == 3  # 2 and 1 as before, plus 4


def test_a_layer_at_its_target_and_the_swap_budget_are_respected() -> None:
    copy_loads, prev, targets = _drifted(5)
    loose = _loads_of_gpus(copy_loads, prev, GPUS).max(-1).values
    assert torch.equal(cheapest_swaps(copy_loads, prev, prev, GPUS, loose, 40), prev)
    for budget in (0, 1, 3):
        swapped = cheapest_swaps(copy_loads, prev, prev, GPUS, targets, budget)
        assert bool((maps.moved_copies(prev, swapped, EXPERTS, GPUS) <= 2 * budget).all())


def test_layers_swap_alone_whatever_the_batch() -> None:
    copy_loads, prev, targets = _drifted(6)
    whole = cheapest_swaps(copy_loads, prev, prev, GPUS, targets, 40)
    for layer in range(LAYERS):
        rows = slice(layer, layer + 1)
        assert torch.equal(
            cheapest_swaps(copy_loads[rows], prev[rows], prev[rows], GPUS, targets[rows], 40), whole[rows]
        )
