"""Capacity-respecting greedy LPT and swap refinement, batched over B independent problems.

A problem puts N items (expert copies) into G packs (GPUs) of exactly K = N / G slots. Both steps run
for every problem of the batch at once (B = layers x candidates); they never build an N x N matrix:
refinement compares the K items of the heaviest pack with the K items of a few partner packs. On the
CPU, LPT and the heaviest-pack phase run compiled, one problem at a time (host_packing.py), and the
pairing phase in NumPy (pair_phase.py), with the same arithmetic and stops.
"""

from __future__ import annotations

import torch

from . import host_packing, kernels
from .cancel import checkpoint
from .refinement import DEFAULT_LIMITS, IMPROVEMENT, RefineLimits


def greedy_pack(item_loads: torch.Tensor, order: torch.Tensor, num_packs: int) -> torch.Tensor:
    """Items in `order` each go to the lightest pack that still has a free slot.

    item_loads [B, N], order [B, N] (item indices, heaviest first) -> slot_items [B, G, K]: the item in
    slot k of pack g, slots filled in the order items arrived.
    """
    if kernels.use_triton(item_loads):
        return kernels.greedy_pack(item_loads, order, num_packs)
    if item_loads.device.type == "cpu":
        return torch.from_numpy(host_packing.greedy_pack(item_loads.numpy(), order.numpy(), num_packs))
    num_problems, num_items = item_loads.shape
    capacity = num_items // num_packs
    device = item_loads.device
    sorted_loads = item_loads.gather(1, order)
    pack_of_step = torch.empty(num_problems, num_items, dtype=torch.int64, device=device)
    # With positive loads the first G items land one per empty pack, in order; with zero loads any
    # assignment is as good, so the loop starts after them.
    first = min(num_packs, num_items)
    pack_of_step[:, :first] = torch.arange(first, device=device)
    key = sorted_loads[:, :num_packs].clone()  # pack load, +inf once the pack is full
    counts = torch.ones_like(key)
    if capacity == 1:
        key.fill_(float("inf"))
    ones = torch.ones(num_problems, 1, dtype=key.dtype, device=device)
    full = torch.tensor(float("inf"), dtype=key.dtype, device=device)
    packs = []
    for step in range(first, num_items):
        checkpoint()
        pack = key.min(1, keepdim=True).indices  # first lightest open pack (faster than argmin on CPU)
        packs.append(pack)
        counts.scatter_add_(1, pack, ones)
        # A pack that just filled up gets +inf instead of the load: it is never chosen again.
        added = torch.where(counts.gather(1, pack) == capacity, full, sorted_loads[:, step : step + 1])
        key.scatter_add_(1, pack, added)
    if packs:
        pack_of_step[:, first:] = torch.cat(packs, 1)
    steps = torch.arange(num_items, device=device)
    by_pack = (pack_of_step * num_items + steps).argsort(1)
    return order.gather(1, by_pack).view(num_problems, num_packs, capacity)


def round_pack(item_loads: torch.Tensor, num_packs: int) -> torch.Tensor:
    """LPT by rounds: the items, heaviest first, go G at a time to the packs, the heaviest of a round
    to the lightest pack so far. K rounds of one sort each instead of N sequential steps.

    With two slots per pack this pairs the i-th heaviest item with the i-th lightest, which is optimal
    for the max pack load. item_loads [B, N] -> slot_items [B, G, K] (slot k filled in round k).
    """
    num_problems, num_items = item_loads.shape
    capacity = num_items // num_packs
    order = item_loads.sort(dim=-1, descending=True, stable=True).indices.view(num_problems, capacity, num_packs)
    round_loads = item_loads.gather(1, order.view(num_problems, -1)).view_as(order)
    slot_items = torch.empty(num_problems, num_packs, capacity, dtype=torch.int64, device=item_loads.device)
    slot_items[:, :, 0] = order[:, 0]
    pack_loads = round_loads[:, 0].clone()
    for step in range(1, capacity):
        checkpoint()
        lightest_first = pack_loads.sort(dim=-1, stable=True).indices  # [B, G]
        slot_items[:, :, step].scatter_(1, lightest_first, order[:, step])
        pack_loads.scatter_add_(1, lightest_first, round_loads[:, step])
    return slot_items


def _pair_swaps(slot_loads: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor, ...]:
    """Pair the q heaviest packs with the q lightest (heaviest with lightest, and so on) and find, per
    pair, the item swap that lowers the larger of the two the most. The improving pairs are disjoint
    (see `_apply_swaps`), so all their swaps apply at once: a fast first phase that levels many packs
    per round.

    slot_loads [B, G, K] -> (heaviest load [B],
    improves [B, q], flat slots in the heavy packs [B, q], flat slots in the light packs [B, q]); pair 0
    holds the heaviest pack.
    """
    capacity = slot_loads.shape[2]
    pack_loads = slot_loads.sum(-1)
    heavy_loads, heavy = pack_loads.topk(num_pairs, dim=1)
    light_loads, light = pack_loads.topk(num_pairs, dim=1, largest=False)
    heavy_items = slot_loads.gather(1, heavy.unsqueeze(-1).expand(-1, -1, capacity))  # [B, q, K]
    light_items = slot_loads.gather(1, light.unsqueeze(-1).expand(-1, -1, capacity))
    improves, heavy_rank, light_rank = _closest_swaps(
        heavy_loads, heavy_items, light_loads.unsqueeze(2), light_items.unsqueeze(2)
    )
    improves &= heavy != light
    return heavy_loads[:, 0], improves, heavy * capacity + heavy_rank, light * capacity + light_rank


def _heaviest_swaps(slot_loads: torch.Tensor, num_partners: int) -> tuple[torch.Tensor, ...]:
    """The swap between the heaviest pack and any of its M lightest partners that lowers the larger
    of the two the most: the thorough second phase. Same outputs as `_pair_swaps`, with q = 1.

    M = G means every pack in index order (no selection needed; the heaviest pack paired with itself
    never improves).
    """
    num_problems, num_packs, capacity = slot_loads.shape
    pack_loads = slot_loads.sum(-1)
    heavy_load, heavy = pack_loads.max(1, keepdim=True)
    heavy_items = slot_loads.gather(1, heavy.unsqueeze(-1).expand(-1, -1, capacity))  # [B, 1, K]
    if num_partners == num_packs:
        light_loads, light_items = pack_loads, slot_loads  # every pack, in index order: no gather
    else:
        light_loads, light = pack_loads.topk(num_partners, dim=1, largest=False)
        light_items = slot_loads.gather(1, light.unsqueeze(-1).expand(-1, -1, capacity))  # [B, M, K]
    improves, heavy_rank, flat_rank = _closest_swaps(
        heavy_load, heavy_items, light_loads.unsqueeze(1), light_items.unsqueeze(1)
    )
    slot_a = heavy * capacity + heavy_rank
    if num_partners == num_packs:  # partner m, item j: flat rank m * K + j is already the flat slot
        return heavy_load[:, 0], improves, slot_a, flat_rank
    partner = light.gather(1, flat_rank // capacity)
    return heavy_load[:, 0], improves, slot_a, partner * capacity + flat_rank % capacity


def _closest_swaps(
    heavy_loads: torch.Tensor, heavy_items: torch.Tensor, light_loads: torch.Tensor, light_items: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best single swap per heavy pack H against its M partner packs P.

    Moving d = a - b from H to P leaves max(H - d, P + d) = (H + P) / 2 + |d - (H - P) / 2|, so the best
    swap is the one whose d is closest to half the gap. heavy_loads [B, q], heavy_items [B, q, K],
    light_loads [B, q, M], light_items [B, q, M, J] -> (improves [B, q], rank in heavy [B, q], flat rank
    m * J + j among the partners' items [B, q]). The lowest flat rank (heavy slot first) wins ties.
    The minimum is found in two steps, the best heavy item by a plain `amin` over its row, then the
    best partner item in that row: `min` with indices over the whole [K, M * J] block is ~10x slower
    on the CPU than `amin`.
    """
    num_problems, num_pairs, capacity = heavy_items.shape
    num_partners, width = light_items.shape[2], light_items.shape[3]
    flat = (num_problems, num_pairs, 1, num_partners * width)  # the partners' items in one row
    # Half gap and middle per partner, then spread over its J items, contiguous: broadcasting [B, q, M]
    # over J inside the big operations instead runs 5-6x slower on the CPU.
    heavy = heavy_loads.unsqueeze(2)  # [B, q, 1]
    half_gap = ((heavy - light_loads) / 2).unsqueeze(3).expand(-1, -1, -1, width).reshape(flat)
    middle = ((heavy + light_loads) / 2).unsqueeze(3).expand(-1, -1, -1, width).reshape(flat)
    miss = heavy_items.unsqueeze(3) - light_items.reshape(flat)  # [B, q, K, M * J]
    miss = miss.sub_(half_gap).abs_().add_(middle)
    best_value, heavy_rank = miss.amin(3).min(2)  # the best of each heavy item, then the best item
    # That item's row, picked as whole rows (a gather along the last axis is ~8x slower here).
    rows = torch.arange(0, num_problems * num_pairs * capacity, capacity, device=miss.device) + heavy_rank.view(-1)
    flat_rank = miss.view(-1, flat[3]).index_select(0, rows).view(num_problems, num_pairs, -1).min(2).indices
    improves = best_value < heavy_loads * (1.0 - IMPROVEMENT)
    return improves, heavy_rank, flat_rank


def _apply_swaps(tensors: list[torch.Tensor], improves: torch.Tensor, slot_a: torch.Tensor, slot_b: torch.Tensor):
    """Exchange the contents of flat slots a and b [B, q], per problem and pair, where `improves`. In place.

    The improving pairs touch distinct packs (pair i of `_pair_swaps` improves only when the i-th
    lightest pack is strictly lighter than the i-th heaviest, so no pack can be the improving heavy
    pack of one pair and the improving light pack of another), so one gather of every value read and
    one scatter of them is the exchange. A pair that does not improve must write nothing: with tied
    pack loads a pack can be among both the q heaviest and the q lightest, and a write of its old value
    could land on a slot an improving pair fills (one item copied, another lost). Such a pair repeats
    the first improving pair's exchange (the same values to the same slots) or, where none improves,
    writes slot a of pair 0 its own value.
    """
    if improves.shape[1] > 1:
        first = improves.to(torch.uint8).argmax(1, keepdim=True)  # the first improving pair, else 0
        swaps = improves.gather(1, first).expand_as(improves)
        first_a, first_b = slot_a.gather(1, first).expand_as(slot_a), slot_b.gather(1, first).expand_as(slot_b)
        slot_a = torch.where(improves, slot_a, first_a)
        slot_b = torch.where(improves, slot_b, first_b)
        improves = improves | swaps
    slot_b = torch.where(improves, slot_b, slot_a)
    written, read = torch.cat([slot_a, slot_b], 1), torch.cat([slot_b, slot_a], 1)
    for tensor in tensors:
        flat = tensor.view(tensor.shape[0], -1)
        flat.scatter_(1, written, flat.gather(1, read))


def _refine_phase(slot_loads, slot_items, targets, group_size, max_rounds, find_swaps, width):
    """Rounds of `find_swaps` on a GPU: a fixed number of masked rounds (a problem stops applying swaps once
    its group met its target), so the loop never waits for the host. Works in place."""
    num_groups = slot_loads.shape[0] // group_size
    for _ in range(max_rounds):
        checkpoint()
        heavy_load, improves, slot_a, slot_b = find_swaps(slot_loads, width)
        going = (heavy_load > targets).view(num_groups, group_size).all(1).repeat_interleave(group_size)
        _apply_swaps([slot_loads, slot_items], improves & going.unsqueeze(1), slot_a, slot_b)


def grouped_limits(slot_loads: torch.Tensor, group_size: int) -> RefineLimits:
    """Limits for refining consecutive groups of `group_size` candidates of one problem: they stop
    together on the torch path (work saved); where the Triton kernel runs, each stops on its own
    (groups of one), as the kernel cannot see the other programs of a group."""
    return RefineLimits(group_size=1 if kernels.use_triton(slot_loads) else group_size)


def swap_refine(
    slot_loads: torch.Tensor,
    slot_items: torch.Tensor,
    targets: torch.Tensor,
    limits: RefineLimits = DEFAULT_LIMITS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap items between heavy and light packs while that lowers the heavy pack.

    slot_loads [B, G, K] (float), slot_items [B, G, K], targets [B]. Phase one levels the q heaviest
    packs against the q lightest in parallel; phase two swaps the heaviest pack with the best of its
    partners until nothing lowers it. A problem whose heaviest pack is at or below its target (a lower
    bound plus a hair) is finished, and so are the other problems of its group (`limits.group_size`
    consecutive problems, the candidates of one layer): one candidate at the bound is enough.
    Float32 CUDA inputs with groups of one run the Triton kernel when it is active.
    Returns the refined (slot_loads, slot_items) as new tensors.
    """
    num_problems, num_packs, capacity = slot_loads.shape
    if num_problems % limits.group_size:
        raise ValueError(f"group_size ({limits.group_size}) must divide the number of problems ({num_problems})")
    if limits.group_size == 1 and kernels.use_triton(slot_loads):
        return kernels.swap_refine(slot_loads, slot_items, targets, limits)
    if slot_loads.device.type == "cpu":
        loads, items = slot_loads.numpy().copy(), slot_items.numpy().copy()
        if num_packs >= 2:
            host_packing.swap_refine(loads, items, targets.numpy(), limits)
        return torch.from_numpy(loads), torch.from_numpy(items)
    slot_loads, slot_items = slot_loads.clone(), slot_items.clone()
    if num_packs < 2 or num_problems == 0:
        return slot_loads, slot_items
    group = limits.group_size
    _refine_phase(slot_loads, slot_items, targets, group, limits.pair_rounds, _pair_swaps, limits.pairs(num_packs))
    partners = limits.partners(num_packs, capacity)
    _refine_phase(slot_loads, slot_items, targets, group, limits.heaviest_rounds, _heaviest_swaps, partners)
    return slot_loads, slot_items
