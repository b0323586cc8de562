"""Greedy LPT and swap refinement (the CPU's compiled path, checked against plain LPT and the torch rounds):
exchanges move items between packs, never copy or drop one, even where pack loads tie (integer token
counts tie often), and a problem's result does not depend on the rest of the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rebalancer.solver import packing
from rebalancer.solver.refinement import RefineLimits


def tied_problems(seed: int, num_problems: int = 64) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Small integer slot loads (many equal pack loads) and a distinct item id per slot."""
    generator = torch.Generator().manual_seed(seed)
    num_packs = int(torch.randint(4, 12, (1,), generator=generator))
    capacity = int(torch.randint(2, 5, (1,), generator=generator))
    slot_loads = torch.randint(0, 4, (num_problems, num_packs, capacity), generator=generator).float()
    slot_items = torch.stack([torch.randperm(num_packs * capacity, generator=generator) for _ in range(num_problems)])
    return slot_loads, slot_items.view(num_problems, num_packs, capacity), num_packs, capacity


def assert_items_moved_not_copied(before_loads, before_items, after_loads, after_items) -> None:
    """Every problem keeps its multiset of items, and each slot's load is the load its item came with."""
    num_problems = before_items.shape[0]
    flat_before, flat_after = before_items.view(num_problems, -1), after_items.view(num_problems, -1)
    assert torch.equal(flat_before.sort(1).values, flat_after.sort(1).values)
    flat_loads = before_loads.view(num_problems, -1)
    load_of_item = torch.empty_like(flat_loads).scatter_(1, flat_before, flat_loads)
    assert torch.equal(load_of_item.gather(1, flat_after), after_loads.view(num_problems, -1))


def test_pair_round_with_a_pack_among_the_heaviest_and_the_lightest_keeps_every_item():
    # Packs 1-3 tie at 3: one of them can be both among the two heaviest and the two lightest. The
    # heaviest pair swaps 3 for a 2 of that pack, whose own pair (3 against 3) does not improve.
    slot_loads = torch.tensor([[[3.0, 2.0], [2.0, 1.0], [2.0, 1.0], [2.0, 1.0]]])
    slot_items = torch.arange(8).view(1, 4, 2)
    limits = RefineLimits(pair_rounds=1, heaviest_rounds=0)
    loads, items = packing.swap_refine(slot_loads, slot_items, torch.zeros(1), limits)
    assert_items_moved_not_copied(slot_loads, slot_items, loads, items)
    assert loads.sum(-1).max() == 4.0


@pytest.mark.parametrize("seed", range(8))
def test_refinement_on_tied_loads_moves_items_and_never_raises_the_max(seed: int):
    slot_loads, slot_items, _, _ = tied_problems(seed)
    loads, items = packing.swap_refine(slot_loads, slot_items, torch.zeros(slot_loads.shape[0]))
    assert_items_moved_not_copied(slot_loads, slot_items, loads, items)
    assert (loads.sum(-1).max(-1).values <= slot_loads.sum(-1).max(-1).values).all()


@pytest.mark.parametrize("seed", range(4))
def test_each_problem_refines_alone_as_in_the_batch(seed: int):
    slot_loads, slot_items, _, _ = tied_problems(100 + seed, num_problems=12)
    slot_loads = slot_loads + torch.rand(slot_loads.shape, generator=torch.Generator().manual_seed(seed))
    targets = torch.zeros(slot_loads.shape[0])
    batch_loads, batch_items = packing.swap_refine(slot_loads, slot_items, targets)
    for problem in range(slot_loads.shape[0]):
        alone = slice(problem, problem + 1)
        loads, items = packing.swap_refine(slot_loads[alone], slot_items[alone], targets[alone])
        assert torch.equal(loads, batch_loads[alone]) and torch.equal(items, batch_items[alone])


def reference_greedy(item_loads: list[float], order: list[int], num_packs: int) -> list[list[int]]:
    """LPT with capacity in plain Python: each item in `order` to the first lightest pack with a free slot."""
    capacity = len(item_loads) // num_packs
    totals, packs = [0.0] * num_packs, [[] for _ in range(num_packs)]
    for item in order:
        pack = min((p for p in range(num_packs) if len(packs[p]) < capacity), key=totals.__getitem__)
        packs[pack].append(item)
        totals[pack] = float(torch.tensor(totals[pack], dtype=torch.float32) + item_loads[item])
    return packs


@pytest.mark.parametrize("seed", range(6))
def test_greedy_on_the_cpu_fills_the_slots_plain_lpt_fills(seed: int):
    slot_loads, _, num_packs, capacity = tied_problems(200 + seed, num_problems=6)
    item_loads = slot_loads.view(6, -1) + (seed % 2) * torch.rand(6, num_packs * capacity)  # ties and no ties
    order = item_loads.sort(dim=1, descending=True, stable=True).indices
    slot_items = packing.greedy_pack(item_loads, order, num_packs)
    for problem in range(6):
        expected = reference_greedy(item_loads[problem].tolist(), order[problem].tolist(), num_packs)
        assert slot_items[problem].tolist() == expected


@pytest.mark.parametrize("chunk_work", [1 << 22, 50])
def test_greedy_tree_over_many_packs_picks_the_packs_plain_lpt_picks(chunk_work: int, monkeypatch):
    # From TREE_MIN_PACKS packs the lightest open pack comes from a tournament tree; integer loads tie
    # often, and a small CHUNK_WORK splits every problem's steps over many compiled calls.
    from rebalancer.solver import host_packing

    monkeypatch.setattr(host_packing, "CHUNK_WORK", chunk_work)
    generator = torch.Generator().manual_seed(7)
    for num_packs, capacity in ((host_packing.TREE_MIN_PACKS, 3), (72, 4), (144, 2), (45, 1)):
        item_loads = torch.randint(0, 6, (3, num_packs * capacity), generator=generator).float()
        order = item_loads.sort(dim=1, descending=True, stable=True).indices
        slot_items = host_packing.greedy_pack(item_loads.numpy(), order.numpy(), num_packs)
        for problem in range(3):
            expected = reference_greedy(item_loads[problem].tolist(), order[problem].tolist(), num_packs)
            assert slot_items[problem].tolist() == expected


@pytest.mark.parametrize("seed", range(4))
def test_heaviest_phase_on_the_cpu_matches_the_masked_torch_rounds(seed: int):
    # The CPU (compiled) path stops problems early; the GPU loop runs every round masked. In the heaviest-pack
    # phase a stopped problem could never move again, so both must end bit for bit alike.
    slot_loads, slot_items, num_packs, capacity = tied_problems(300 + seed, num_problems=16)
    slot_loads = slot_loads + torch.rand(slot_loads.shape, generator=torch.Generator().manual_seed(seed))
    targets = slot_loads.sum(-1).mean(-1) * 1.02
    limits = RefineLimits(group_size=4, pair_rounds=0, heaviest_rounds=12)
    host_loads, host_items = packing.swap_refine(slot_loads, slot_items, targets, limits)
    loads, items = slot_loads.clone(), slot_items.clone()
    partners = limits.partners(num_packs, capacity)
    packing._refine_phase(loads, items, targets, 4, 12, packing._heaviest_swaps, partners)
    assert torch.equal(host_items, items) and torch.equal(host_loads, loads)


def test_partner_order_follows_loads_then_pack_index_as_loads_change():
    # The heaviest-pack phase takes its partners from a kept order (load, then index); after each swap
    # the two packs move to their new places. -0.0 and +0.0 are equal loads.
    from rebalancer.solver import host_packing

    rng = np.random.default_rng(5)
    loads = np.array([3.0, 1.0, 2.0, 1.0, 0.0, 2.0, -0.0, 2.0], dtype=np.float32)
    order = np.argsort(loads, kind="stable")
    for _ in range(200):
        pack = int(rng.integers(len(loads)))
        loads[pack] = np.float32(rng.integers(0, 4))
        at = host_packing._reorder(order, loads, pack, order.tolist().index(pack))
        assert order.tolist() == sorted(range(len(loads)), key=lambda g: (float(loads[g]), g))
        assert order[at] == pack
        heaviest = int(np.argmax(loads))  # the lowest index among the heaviest, found from the order's end
        assert order[host_packing._heaviest_at(order, loads)] == heaviest
