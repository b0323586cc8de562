"""Swap refinement as one Triton launch: one program per problem runs both phases of `packing.swap_refine`.

The torch path runs each swap round as a dozen batched tensor ops and, on the CPU, asks the host which
problems are still active; here a problem's [G, K] slot loads and items live in registers and each program
leaves its loops as soon as its own heaviest pack cannot improve or meets its target.

Semantics are those of the torch path with groups of one (each problem stops on its own; larger groups
are refused). Where pack loads tie, the torch `topk` order is unspecified; here the lowest pack index
comes first among equal loads (heaviest first for the heavy packs, lightest first for the partners; when
the partners are all packs, both paths take them in index order). Pack loads are float32 sums of the K
slots in a tree order, which may differ from torch's summation order by an ulp on non-integral loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..refinement import DEFAULT_LIMITS, IMPROVEMENT, RefineLimits

_NO_RANK = tl.constexpr(2**31 - 1)  # larger than any flat rank


@triton.jit
def _closest_swap(heavy_load, heavy_row, light_load, light_row, slot_ids, capacity, rank_offset, rank_stride):
    """Best swap of one heavy item with one light item: (max(H - d, P + d), flat rank of the pair).

    Same float32 operations as `packing._closest_swaps`; the rank of heavy slot i and light slot j is
    i * rank_stride + rank_offset + j, and the lowest rank wins ties, as torch `min` does.
    """
    half_gap = (heavy_load - light_load) * 0.5
    middle = (heavy_load + light_load) * 0.5
    miss = tl.abs(heavy_row[:, None] - light_row[None, :] - half_gap) + middle
    valid = (slot_ids[:, None] < capacity) & (slot_ids[None, :] < capacity)
    miss = tl.where(valid, miss, float("inf"))
    best = tl.min(tl.min(miss, axis=1), axis=0)
    ranks = slot_ids[:, None] * rank_stride + rank_offset + slot_ids[None, :]
    rank = tl.min(tl.min(tl.where(valid & (miss == best), ranks, _NO_RANK), axis=1), axis=0)
    return best, rank


@triton.jit
def _first_max(values, ids, NO_ID: tl.constexpr):
    """(max, lowest id holding it): argmax with torch's tie order, as two plain reductions."""
    best = tl.max(values, axis=0)
    return best, tl.min(tl.where(values == best, ids, NO_ID), axis=0)


@triton.jit
def _first_min(values, ids, NO_ID: tl.constexpr):
    """(min, lowest id holding it)."""
    best = tl.min(values, axis=0)
    return best, tl.min(tl.where(values == best, ids, NO_ID), axis=0)


@triton.jit
def _swap_slots(loads, items, read_loads, read_items, at_heavy, at_light):
    """(loads, items) [G, K] with the slot `at_heavy` marks and the one `at_light` marks exchanged.

    Each mask [G, K] marks one slot, or none when the swap is off (then nothing changes); the two values
    are read from `read_loads` / `read_items`, the round's start state in phase 1, the current one in 2.
    """
    heavy_value = tl.sum(tl.sum(tl.where(at_heavy, read_loads, 0.0), axis=1), axis=0)
    light_value = tl.sum(tl.sum(tl.where(at_light, read_loads, 0.0), axis=1), axis=0)
    heavy_item = tl.sum(tl.sum(tl.where(at_heavy, read_items, 0), axis=1), axis=0)
    light_item = tl.sum(tl.sum(tl.where(at_light, read_items, 0), axis=1), axis=0)
    loads = tl.where(at_heavy, light_value, tl.where(at_light, heavy_value, loads))
    items = tl.where(at_heavy, light_item, tl.where(at_light, heavy_item, items))
    return loads, items


# Round counts of 1 would otherwise be specialised to constants, changing the type of the loop flags.
@triton.jit(do_not_specialize=["pair_rounds", "heaviest_rounds", "num_partners"])
def _swap_refine_kernel(
    slot_loads_ptr,  # [B, G, K] float32
    slot_items_ptr,  # [B, G, K] int64
    targets_ptr,  # [B] float32
    out_loads_ptr,  # [B, G, K] float32, written
    out_items_ptr,  # [B, G, K] int64, written
    num_packs,
    capacity,
    pair_rounds,
    heaviest_rounds,
    num_partners,
    improve_factor,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_PAIRS: tl.constexpr,
    ALL_PARTNERS: tl.constexpr,
):
    problem = tl.program_id(0).to(tl.int64)
    pack_ids = tl.arange(0, BLOCK_G)
    slot_ids = tl.arange(0, BLOCK_K)
    rows = pack_ids[:, None]
    cols = slot_ids[None, :]
    real_pack = pack_ids < num_packs
    valid = (rows < num_packs) & (cols < capacity)
    offsets = problem * num_packs * capacity + rows * capacity + cols
    loads = tl.load(slot_loads_ptr + offsets, mask=valid, other=0.0)
    items = tl.load(slot_items_ptr + offsets, mask=valid, other=0).to(tl.int32)  # item ids < N: half the registers
    target = tl.load(targets_ptr + problem)

    # Phase 1: the q heaviest packs against the q lightest, every pair decided on the round's start state.
    done_rounds = 0
    running = pair_rounds > 0
    while running:
        pack_loads = tl.sum(loads, axis=1)
        heavy_left = tl.where(real_pack, pack_loads, -float("inf"))
        light_left = tl.where(real_pack, pack_loads, float("inf"))
        start_loads = loads
        start_items = items
        proceed = running
        for pair in tl.static_range(NUM_PAIRS):
            heavy_load, heavy = _first_max(heavy_left, pack_ids, BLOCK_G)
            light_load, light = _first_min(light_left, pack_ids, BLOCK_G)
            heavy_left = tl.where(pack_ids == heavy, -float("inf"), heavy_left)
            light_left = tl.where(pack_ids == light, float("inf"), light_left)
            heavy_row = tl.sum(tl.where(rows == heavy, start_loads, 0.0), axis=0)
            light_row = tl.sum(tl.where(rows == light, start_loads, 0.0), axis=0)
            best, rank = _closest_swap(heavy_load, heavy_row, light_load, light_row, slot_ids, capacity, 0, capacity)
            improves = (best < heavy_load * improve_factor) & (heavy != light)
            if pair == 0:
                # The heaviest pair decides whether the problem goes on; if not, this round changes nothing.
                proceed = improves & (heavy_load > target)
            # A pack index of -1 matches no row: the swap does not happen.
            swap = proceed & improves
            at_heavy = (rows == tl.where(swap, heavy, -1)) & (cols == rank // capacity)
            at_light = (rows == tl.where(swap, light, -1)) & (cols == rank % capacity)
            loads, items = _swap_slots(loads, items, start_loads, start_items, at_heavy, at_light)
        done_rounds += 1
        running = proceed & (done_rounds < pair_rounds)

    # Phase 2: the heaviest pack against each of its M partners, the best single swap per round.
    done_rounds = 0
    running = heaviest_rounds > 0
    while running:
        pack_loads = tl.sum(loads, axis=1)
        heavy_left = tl.where(real_pack, pack_loads, -float("inf"))
        heavy_load, heavy = _first_max(heavy_left, pack_ids, BLOCK_G)
        heavy_row = tl.sum(tl.where(rows == heavy, loads, 0.0), axis=0)
        light_left = tl.where(real_pack, pack_loads, float("inf"))
        best = float("inf")
        best_rank = _NO_RANK
        best_partner = heavy
        for partner in range(num_partners):
            if ALL_PARTNERS:  # every pack in index order, as the torch path does
                light = partner
                light_load = tl.sum(tl.where(pack_ids == partner, pack_loads, 0.0), axis=0)
            else:
                light_load, light = _first_min(light_left, pack_ids, BLOCK_G)
                light_left = tl.where(pack_ids == light, float("inf"), light_left)
            light_row = tl.sum(tl.where(rows == light, loads, 0.0), axis=0)
            value, rank = _closest_swap(
                heavy_load,
                heavy_row,
                light_load,
                light_row,
                slot_ids,
                capacity,
                partner * capacity,
                num_partners * capacity,
            )
            better = (value < best) | ((value == best) & (rank < best_rank))
            best = tl.where(better, value, best)
            best_rank = tl.where(better, rank, best_rank)
            best_partner = tl.where(better, light, best_partner)
        running = (best < heavy_load * improve_factor) & (heavy_load > target)
        at_heavy = (rows == tl.where(running, heavy, -1)) & (cols == best_rank // (num_partners * capacity))
        at_light = (rows == tl.where(running, best_partner, -1)) & (cols == best_rank % capacity)
        loads, items = _swap_slots(loads, items, loads, items, at_heavy, at_light)
        done_rounds += 1
        running = running & (done_rounds < heaviest_rounds)

    tl.store(out_loads_ptr + offsets, loads, mask=valid)
    tl.store(out_items_ptr + offsets, items.to(tl.int64), mask=valid)


def default_num_warps(num_packs: int, capacity: int) -> int:
    """Warps per program: one warp keeps the many small reductions cheap until the [G, K] tile crowds its
    registers (compiled for sm_90: 255 registers at 1 warp for a 32 x 16 tile, 128 at 2)."""
    tile = triton.next_power_of_2(num_packs) * triton.next_power_of_2(capacity)
    return 1 if tile <= 256 else 2 if tile <= 512 else 4


def swap_refine(
    slot_loads: torch.Tensor,
    slot_items: torch.Tensor,
    targets: torch.Tensor,
    limits: RefineLimits = DEFAULT_LIMITS,
    *,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """slot_loads [B, G, K] float32, slot_items [B, G, K] int64, targets [B] -> refined (slot_loads, slot_items).

    As `packing.swap_refine` with `limits.group_size == 1` (anything else raises ValueError); returns new
    tensors. `num_warps` overrides the launch width (for tuning on a GPU).
    """
    if limits.group_size != 1:
        raise ValueError(
            f"the Triton swap_refine stops each problem on its own: group_size must be 1, got {limits.group_size}"
        )
    num_problems, num_packs, capacity = slot_loads.shape
    if num_packs < 2 or num_problems == 0:
        return slot_loads.clone(), slot_items.clone()
    slot_loads = slot_loads.contiguous()
    slot_items = slot_items.to(torch.int64).contiguous()
    targets = targets.to(slot_loads.device, torch.float32).contiguous()
    out_loads, out_items = torch.empty_like(slot_loads), torch.empty_like(slot_items)
    _swap_refine_kernel[(num_problems,)](
        slot_loads,
        slot_items,
        targets,
        out_loads,
        out_items,
        num_packs,
        capacity,
        limits.pair_rounds,
        limits.heaviest_rounds,
        limits.partners(num_packs, capacity),
        1.0 - IMPROVEMENT,
        BLOCK_G=triton.next_power_of_2(num_packs),
        BLOCK_K=triton.next_power_of_2(capacity),
        NUM_PAIRS=limits.pairs(num_packs),
        ALL_PARTNERS=limits.partners(num_packs, capacity) == num_packs,
        num_warps=num_warps or default_num_warps(num_packs, capacity),
        enable_fp_fusion=False,  # separate float32 roundings, as torch does them
    )
    return out_loads, out_items
