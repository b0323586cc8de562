"""Capacity greedy LPT as one Triton launch: one program per problem, pack loads and counts in registers.

The torch path takes one batched step per item (N launches and more); here a program streams its
problem's items in sorted order and writes each straight into its slot, so the whole batch is one launch.
Same arithmetic as the torch path: a pack's load is the float32 sum of its items in arrival order, and
an item goes to the first lightest pack (lowest index on ties) that still has a free slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _greedy_pack_kernel(
    sorted_loads_ptr,  # [B, N] float32: item loads in arrival order
    order_ptr,  # [B, N] int64: item ids in arrival order
    slot_items_ptr,  # [B, G, K] int64, written
    num_items,
    num_packs,
    capacity,
    BLOCK_G: tl.constexpr,
):
    problem = tl.program_id(0).to(tl.int64)
    row = problem * num_items
    packs = tl.arange(0, BLOCK_G)
    real = packs < num_packs
    # The first G items open the packs in order, as in the torch path (whatever their loads).
    pack_loads = tl.load(sorted_loads_ptr + row + packs, mask=real, other=0.0)
    first_items = tl.load(order_ptr + row + packs, mask=real, other=0)
    tl.store(slot_items_ptr + row + packs * capacity, first_items, mask=real)
    counts = tl.where(real, 1, capacity)  # padding lanes count as full packs
    for step in range(num_packs, num_items):
        load = tl.load(sorted_loads_ptr + row + step)
        item = tl.load(order_ptr + row + step)
        key = tl.where(counts < capacity, pack_loads, float("inf"))
        # The first lightest open pack; min + masked min is argmin with the lowest index on ties.
        pack = tl.min(tl.where(key == tl.min(key, axis=0), packs, BLOCK_G), axis=0)
        chosen = packs == pack
        slot = tl.sum(tl.where(chosen, counts, 0), axis=0)
        tl.store(slot_items_ptr + row + pack * capacity + slot, item)
        pack_loads = tl.where(chosen, pack_loads + load, pack_loads)
        counts = tl.where(chosen, counts + 1, counts)


def greedy_pack(item_loads: torch.Tensor, order: torch.Tensor, num_packs: int) -> torch.Tensor:
    """item_loads [B, N] float32, order [B, N] (heaviest first) -> slot_items [B, G, K], as `packing.greedy_pack`."""
    num_problems, num_items = item_loads.shape
    capacity = num_items // num_packs
    sorted_loads = item_loads.gather(1, order).contiguous()
    order = order.to(torch.int64).contiguous()
    slot_items = torch.empty(num_problems, num_packs, capacity, dtype=torch.int64, device=item_loads.device)
    if num_problems == 0 or capacity == 0:
        return slot_items
    block = triton.next_power_of_2(num_packs)
    _greedy_pack_kernel[(num_problems,)](
        sorted_loads,
        order,
        slot_items,
        num_items,
        num_packs,
        capacity,
        BLOCK_G=block,
        num_warps=1 if block <= 64 else 4,
    )
    return slot_items
