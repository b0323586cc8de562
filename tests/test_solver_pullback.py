"""Swapping copies back towards the placement in force: fewer shipped copies, no GPU over its target,
copy counts unchanged."""

from __future__ import annotations

import pytest
import torch
from rebalancer.solver import maps, pullback
from rebalancer.solver.elastic import elastic_moves
from rebalancer.solver.pullback import pull_back
from rebalancer_testkit.workloads import make


def _gpu_loads(loads: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    return maps.gpu_loads(loads, phy2log, maps.logcnt_from_phy2log(phy2log, loads.shape[1]), num_gpus)


@pytest.mark.parametrize(
    ("loads", "target", "expected"),
    [
        # Experts 0 and 2 traded GPUs for nothing (equal loads): one swap puts both back.
        ([3.0, 1.0, 3.0, 1.0], 4.0, [[0, 1, 2, 3]]),
        # Putting expert 0 (5) back beside expert 1 (5) would carry 10 > 8: refused.
        ([5.0, 5.0, 2.0, 2.0], 8.0, [[2, 1, 0, 3]]),
    ],
)
def test_a_needless_exchange_is_swapped_back_unless_it_overloads_a_gpu(loads, target: float, expected) -> None:
    loads = torch.tensor([loads], dtype=torch.float64)
    before = torch.tensor([[0, 1, 2, 3]])
    plan = torch.tensor([[2, 1, 0, 3]])
    result = pull_back(loads, plan, before, 2, torch.tensor([target], dtype=torch.float64))
    assert result.tolist() == expected


def test_pulling_a_shuffled_plan_back_ships_fewer_copies_under_the_target(monkeypatch) -> None:
    # Blocks of 4 layers: the 6 layers go in two blocks.
    monkeypatch.setattr(pullback, "PULL_ROWS", 4)
    layers, experts, gpus, slots = 6, 32, 8, 5
    loads = make("zipf", layers, experts, seed=9).double()
    g = torch.Generator().manual_seed(9)
    spare = torch.randint(experts, (layers, gpus * slots - experts), generator=g)
    before = torch.cat([torch.arange(experts).repeat(layers, 1), spare], 1)
    before = before.gather(1, torch.rand(before.shape, generator=g).argsort(1))
    # The same copies in a different order: same counts, many copies shipped.
    plan = before.gather(1, torch.rand(before.shape, generator=g).argsort(1))
    targets = _gpu_loads(loads, plan, gpus).amax(1)
    result = pull_back(loads, plan, before, gpus, targets)
    assert torch.equal(maps.logcnt_from_phy2log(result, experts), maps.logcnt_from_phy2log(plan, experts))
    assert bool((_gpu_loads(loads, result, gpus).amax(1) <= targets * (1 + 1e-12)).all())
    ids = torch.arange(gpus)
    shipped_before, _ = elastic_moves(before, plan, experts, slots, ids)
    shipped_after, _ = elastic_moves(before, result, experts, slots, ids)
    assert bool((shipped_after <= shipped_before).all()) and int(shipped_after.sum()) < int(shipped_before.sum())
    # Each layer gets what it gets alone.
    for layer in range(layers):
        alone = pull_back(
            loads[layer : layer + 1],
            plan[layer : layer + 1],
            before[layer : layer + 1],
            gpus,
            targets[layer : layer + 1],
        )
        assert torch.equal(alone[0], result[layer])


@pytest.mark.parametrize("integral", [False, True])
@pytest.mark.parametrize("gpus, slots", [(8, 4), (4, 2), (11, 3)])
def test_partner_scores_on_the_cpu_equal_the_tensor_path(integral: bool, gpus: int, slots: int) -> None:
    # The CPU scores swap partners compiled (host_pullback), a GPU in tensor ops: the same scores and the
    # same first best partner, ties (integral loads), crowded GPUs and nothing-to-save slots included.
    from rebalancer.solver import host_pullback

    generator = torch.Generator().manual_seed(gpus * slots)
    rows, num_slots = 3, gpus * slots
    experts = max(1, num_slots * 2 // 3)
    phy = torch.randint(0, experts, (rows, num_slots), generator=generator)
    old = torch.randint(0, experts, (rows, num_slots), generator=generator)
    had = maps.expert_histogram(old, experts, gpus, compact=True) > 0
    hosts = maps.expert_histogram(phy, experts, gpus, compact=True) > 0
    loads = torch.rand(rows, experts, generator=generator, dtype=torch.float64)
    loads = (loads * 4).ceil() if integral else loads
    slot_load = loads.gather(1, phy)
    gpu_load = slot_load.view(rows, gpus, slots).sum(-1)
    slot_gpu = torch.arange(num_slots) // slots
    kept = had.gather(2, phy.unsqueeze(1).expand(-1, gpus, -1)).gather(1, slot_gpu.expand(rows, 1, -1)).squeeze(1)
    moved_in = kept.to(torch.int8).sort(dim=1, stable=True).indices[:, : max(1, int((~kept).sum(1).max()))]
    targets = gpu_load.max(1).values * torch.tensor([0.95, 1.05, 1.3], dtype=torch.float64)
    state = pullback.RoundState(phy, had, hosts, slot_load, gpu_load, kept, moved_in, targets, slots, pullback.LOAD_TIE)
    on_tensors, on_host = pullback.best_partners(state), host_pullback.best_partners(state)
    assert torch.equal(on_tensors[0], on_host[0]) and torch.equal(on_tensors[1], on_host[1])
    assert torch.isfinite(on_host[0]).any()
