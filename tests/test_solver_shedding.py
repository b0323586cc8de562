"""Excess shedding and re-hosting (the elastic moves): every expert stays hosted, the copy budget holds, a
reachable target is met, and each layer's result is the one it gets alone."""

from __future__ import annotations

import pytest
import torch
from rebalancer.solver import maps
from rebalancer.solver.shedding import excess, rehost_by_chains, shed_excess
from rebalancer_testkit.workloads import make


def _peaks(loads: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    return maps.gpu_loads(loads, phy2log, maps.logcnt_from_phy2log(phy2log, loads.shape[1]), num_gpus).amax(-1)


def _random_placement(layers: int, experts: int, replicas: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spare = torch.randint(experts, (layers, replicas - experts), generator=g)
    prev = torch.cat([torch.arange(experts).repeat(layers, 1), spare], 1)
    return prev.gather(1, torch.rand(layers, replicas, generator=g).argsort(1))


def test_one_swap_meets_a_target_the_placement_misses_by_one_pair() -> None:
    # GPU 0 holds the two heavy experts, GPU 1 the two light ones: one swap (two copies) levels them.
    loads = torch.tensor([[10.0, 10.0, 1.0, 1.0]], dtype=torch.float64)
    prev = torch.tensor([[0, 1, 2, 3]])
    target = torch.tensor([11.0], dtype=torch.float64)
    result = shed_excess(loads, prev, 2, target, 8)
    assert float(_peaks(loads, result, 2)) <= 11.0
    assert int(maps.moved_copies(prev, result, 4, 2)) == 2


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [0, 1, 2, 5, 12])
def test_shedding_keeps_every_expert_hosted_within_its_copy_budget(seed: int, budget: int) -> None:
    layers, experts, replicas, gpus = 3, 16, 24, 6
    loads = make("zipf", layers, experts, seed=seed).double()
    prev = _random_placement(layers, experts, replicas, seed)
    mean = loads.sum(-1) / gpus
    targets = mean * 1.01
    result = shed_excess(loads, prev, gpus, targets, budget)
    assert bool((maps.logcnt_from_phy2log(result, experts) > 0).all())
    assert bool((maps.moved_copies(prev, result, experts, gpus) <= budget).all())
    before = excess(maps.gpu_loads(loads, prev, maps.logcnt_from_phy2log(prev, experts), gpus), targets.view(-1, 1))
    after = excess(maps.gpu_loads(loads, result, maps.logcnt_from_phy2log(result, experts), gpus), targets.view(-1, 1))
    assert bool((after <= before + 1e-9).all()), (before.tolist(), after.tolist())
    if budget == 0:
        assert torch.equal(result, prev)


def test_shedding_gives_each_layer_the_result_it_gets_alone() -> None:
    layers, experts, replicas, gpus = 5, 32, 48, 8
    loads = make("lognormal", layers, experts, seed=3).double()
    prev = _random_placement(layers, experts, replicas, 3)
    targets = loads.sum(-1) / gpus * 1.02
    together = shed_excess(loads, prev, gpus, targets, 20)
    for layer in range(layers):
        alone = shed_excess(loads[layer : layer + 1], prev[layer : layer + 1], gpus, targets[layer : layer + 1], 20)
        assert torch.equal(alone[0], together[layer])


def test_rehosting_gives_every_homeless_expert_one_slot_from_a_spare_copy() -> None:
    layers, experts, replicas, gpus = 4, 24, 36, 6
    loads = make("zipf", layers, experts, seed=5).double()
    prev = _random_placement(layers, experts, replicas, 5)
    # Drop the copies on GPU 0 as a lost GPU would: the layout keeps GPUs 1..5.
    seed = prev.view(layers, gpus, -1)[:, 1:].reshape(layers, -1)
    homeless = maps.logcnt_from_phy2log(seed, experts) == 0
    assert bool(homeless.any())
    targets = loads.sum(-1) / (gpus - 1) * 1.01
    for move_cost, over_cost in [(0.0, 0.0), (1e9, 0.0), (0.0, 0.5)]:
        costs = (
            torch.full((layers,), move_cost, dtype=torch.float64),
            torch.full((layers,), over_cost, dtype=torch.float64),
        )
        result = rehost_by_chains(loads, seed, gpus - 1, targets, *costs)
        assert bool((maps.logcnt_from_phy2log(result, experts) > 0).all())
        # One or two changed slots (a direct placement or a chain) per homeless expert.
        changed = (result != seed).sum(1)
        assert bool((changed >= homeless.sum(1)).all()) and bool((changed <= 2 * homeless.sum(1)).all())
        if move_cost > 0:
            # Copies priced far above any load: never a chain, one shipped copy per homeless expert.
            assert torch.equal(changed, homeless.sum(1))


def test_rehosting_chains_a_copy_where_every_direct_placement_leaves_a_gpu_over_the_target() -> None:
    # 3 GPUs x 2 slots; expert 4 (load 3) is homeless, expert 0 (load 4) has copies on GPUs 0 and 1.
    # Taking either copy's slot directly leaves GPU 1 at 9 or 8, over the target of 7; moving a copy
    # out of one GPU into the freed slot and expert 4 into its place keeps every GPU at 7 or less.
    loads = torch.tensor([[4.0, 5.0, 5.0, 1.0, 3.0, 1.0]], dtype=torch.float64)
    seed = torch.tensor([[0, 3, 0, 1, 2, 5]])
    targets = torch.tensor([7.0], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    result = rehost_by_chains(loads, seed, 3, targets, zero, zero)
    counts = maps.logcnt_from_phy2log(result, 6)
    assert bool((counts > 0).all())
    assert int((result != seed).sum()) == 2
    assert float(maps.gpu_loads(loads, result, counts, 3).max()) <= 7.0
