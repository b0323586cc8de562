"""Greedy LPT and swap refinement on the CPU, in NumPy: the host paths of `packing`.

Both are loops of small array operations (one step per item, one round per swap), and late refinement
rounds see only a handful of problems: there torch's ~5 us per operation was most of the time (0.15 ms
per round against NumPy's 0.03 ms on 4 problems of 72 packs x 4 slots; 0.95 ms against 0.5 ms on 232).
The rules are those of `packing`: the same float32 operations in the same order and the same stops;
the heaviest-pack phase takes its partners among equal loads lowest index first (torch.topk leaves
that order open), the pairing phase in torch.topk's order. On the benchmark shapes the placements
equal those of the torch loop but for such exact ties.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .cancel import checkpoint
from .refinement import IMPROVEMENT, RefineLimits

# Compacting copies the active set: done only once an eighth of it has finished (the finished ones
# meanwhile compute swaps they never apply).
COMPACT_SHARE = 8
# Integer views whose order is that of non-negative floats of the same width.
BIT_VIEWS = {np.float32: np.int32, np.float64: np.int64}


def greedy_pack(item_loads: np.ndarray, order: np.ndarray, num_packs: int) -> np.ndarray:
    """`packing.greedy_pack`: items in `order` each go to the first lightest pack with a free slot.

    item_loads [B, N], order [B, N] -> slot_items [B, G, K], slots filled in the order items arrived.
    """
    num_problems, num_items = item_loads.shape
    capacity = num_items // num_packs
    sorted_loads = np.take_along_axis(item_loads, order, 1)
    key_type = sorted_loads.dtype.type
    pack_of_step = np.empty((num_items, num_problems), dtype=np.int64)  # step-major
    first = min(num_packs, num_items)  # the first G items open the packs in order
    pack_of_step[:first] = np.arange(first)[:, None]
    key = sorted_loads[:, :num_packs] + key_type(0)  # pack load, +inf once the pack is full; -0.0 -> +0.0
    counts = np.ones(key.shape, dtype=np.int64)
    if capacity == 1:
        key.fill(np.inf)
    # Flat indices and step-major loads: each step is a handful of 1-D operations on B values.
    flat_key, flat_counts, base = key.reshape(-1), counts.reshape(-1), np.arange(num_problems) * num_packs
    step_loads, full = np.ascontiguousarray(sorted_loads.T), key_type(np.inf)
    # Non-negative floats (and +inf) order like their bits as integers, and an integer argmin is ~1.5x
    # faster: the same first lightest pack.
    key_bits = key.view(BIT_VIEWS[key.dtype.type]) if key.dtype.type in BIT_VIEWS else key
    for step in range(first, num_items):
        checkpoint()
        pack = key_bits.argmin(1)
        pack_of_step[step] = pack
        index = base + pack
        filled = flat_counts[index] + 1
        flat_counts[index] = filled
        flat_key[index] += np.where(filled == capacity, full, step_loads[step])
    by_pack = (pack_of_step.T * num_items + np.arange(num_items)).argsort(1)
    return np.take_along_axis(order, by_pack, 1).reshape(num_problems, num_packs, capacity)


def row_sums(slot_loads: np.ndarray) -> np.ndarray:
    """Sums over the last axis in torch's order, which differs from NumPy's in the last bit from 5 slots
    on: the host path then takes the decisions of the torch loop, bit for bit."""
    return torch.from_numpy(np.ascontiguousarray(slot_loads)).sum(-1).numpy()


def smallest(pack_loads: np.ndarray, count: int, largest: bool = False) -> np.ndarray:
    """Indices [B, count] of the `count` lightest (or heaviest) packs per row, in load order, the lowest
    index first among equal loads. Float32 loads sort as int64 keys (the bits of a non-negative float
    order like its value; the pack index below them breaks ties): 3-4x faster than torch.topk here."""
    if pack_loads.dtype != np.float32:
        order = np.argsort(-pack_loads if largest else pack_loads, axis=1, kind="stable")
        return order[:, :count]
    bits = (pack_loads + np.float32(0.0)).view(np.int32).astype(np.int64)  # -0.0 -> +0.0
    if largest:
        bits = np.iinfo(np.int32).max - bits
    shift = max(1, (pack_loads.shape[1] - 1).bit_length())
    keys = np.sort((bits << shift) | np.arange(pack_loads.shape[1]), axis=1)[:, :count]
    return keys & ((1 << shift) - 1)


def extremes(pack_loads: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The `count` heaviest and the `count` lightest packs per row [B, count], in torch.topk's order. The
    pairing of the first phase is sensitive to how equal loads are ordered (token counts tie often): in
    this order the drifting benchmark's next-window balancedness measured 0.0004-0.0007 higher than with
    the pack-index order of `smallest`, on seeds 21-22 and 23-25 alike. Two small topk calls a round."""
    loads = torch.from_numpy(pack_loads)
    heavy, light = loads.topk(count, dim=1).indices, loads.topk(count, dim=1, largest=False).indices
    return heavy.numpy(), light.numpy()


def closest_swaps(
    heavy_loads: np.ndarray, heavy_items: np.ndarray, light_loads: np.ndarray, light_items: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best single swap per heavy pack H against its M partner packs P (see `packing._closest_swaps`).

    heavy_loads [B, q], heavy_items [B, q, K], light_loads [B, q, M], light_items [B, q, M, J] ->
    (improves [B, q], rank in heavy [B, q], flat rank m * J + j among the partners' items [B, q]); the
    lowest heavy rank, then the lowest flat rank, wins ties.
    """
    num_problems, num_pairs, capacity = heavy_items.shape
    width = light_items.shape[3]
    heavy = heavy_loads[:, :, None]
    half_gap = np.repeat((heavy - light_loads) / 2, width, axis=2)[:, :, None, :]  # [B, q, 1, M * J]
    middle = np.repeat((heavy + light_loads) / 2, width, axis=2)[:, :, None, :]
    # |(b - a) + gap| is |(a - b) - gap| bit for bit (rounding is symmetric), and NumPy subtracts a
    # broadcast column from contiguous rows ~1.5x faster than the other way round.
    miss = light_items.reshape(num_problems, num_pairs, 1, -1) - heavy_items[:, :, :, None]
    miss += half_gap
    np.abs(miss, out=miss)
    miss += middle
    flat = miss.reshape(num_problems, num_pairs, -1)
    best = flat.argmin(2)
    best_value = flat[np.arange(num_problems)[:, None], np.arange(num_pairs), best]
    improves = best_value < heavy_loads * np.float32(1.0 - IMPROVEMENT)
    row_width = miss.shape[3]
    return improves, best // row_width, best % row_width


def pick(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """values [B, G, ...] at index [B, m] -> [B, m, ...]: `np.take` on flat rows, ~3x faster than
    indexing with broadcast row numbers."""
    num_problems, num_packs = values.shape[:2]
    flat = index + (np.arange(num_problems) * num_packs)[:, None]
    return np.take(values.reshape(num_problems * num_packs, *values.shape[2:]), flat, axis=0)


def pair_swaps(slot_loads: np.ndarray, num_pairs: int, pack_loads: np.ndarray) -> tuple[np.ndarray, ...]:
    """The q heaviest packs paired with the q lightest, the best swap per pair (`packing._pair_swaps`):
    -> (heaviest load [B], improves [B, q], flat slots in the heavy packs [B, q], in the light ones)."""
    capacity = slot_loads.shape[2]
    heavy, light = extremes(pack_loads, num_pairs)
    heavy_loads, light_loads = pick(pack_loads, heavy), pick(pack_loads, light)
    heavy_items, light_items = pick(slot_loads, heavy), pick(slot_loads, light)  # [B, q, K]
    improves, heavy_rank, light_rank = closest_swaps(
        heavy_loads, heavy_items, light_loads[:, :, None], light_items[:, :, None]
    )
    improves &= heavy != light
    return heavy_loads[:, 0], improves, heavy * capacity + heavy_rank, light * capacity + light_rank


def heaviest_swaps(slot_loads: np.ndarray, num_partners: int, pack_loads: np.ndarray) -> tuple[np.ndarray, ...]:
    """The best swap of the heaviest pack with any of its M lightest partners (`packing._heaviest_swaps`);
    M = G means every pack in index order. Same outputs as `pair_swaps`, with q = 1."""
    num_packs, capacity = slot_loads.shape[1:]
    heavy = pack_loads.argmax(1)[:, None]  # the first heaviest, as torch's max
    heavy_load, heavy_items = pick(pack_loads, heavy), pick(slot_loads, heavy)  # [B, 1], [B, 1, K]
    if num_partners == num_packs:
        light_loads, light_items = pack_loads, slot_loads
    else:
        light = smallest(pack_loads, num_partners)
        light_loads, light_items = pick(pack_loads, light), pick(slot_loads, light)  # [B, M], [B, M, K]
    improves, heavy_rank, flat_rank = closest_swaps(heavy_load, heavy_items, light_loads[:, None], light_items[:, None])
    slot_a = heavy * capacity + heavy_rank
    if num_partners == num_packs:
        return heavy_load[:, 0], improves, slot_a, flat_rank
    partner = pick(light[:, :, None], flat_rank // capacity)[:, :, 0]
    return heavy_load[:, 0], improves, slot_a, partner * capacity + flat_rank % capacity


def exchange(
    loads: np.ndarray,
    items: np.ndarray,
    pack_loads: np.ndarray,
    improves: np.ndarray,
    slot_a: np.ndarray,
    slot_b: np.ndarray,
) -> None:
    """Exchange flat slots a and b [B, q] of `loads` and `items` where `improves` (improving pairs touch
    distinct packs), and recompute the loads [B, G] of the packs they touched. In place, on flat indices
    (1-D fancy indexing is several times cheaper than 2-D)."""
    num_problems, num_packs, capacity = loads.shape
    problem, pair = np.nonzero(improves)
    a = slot_a[problem, pair] + problem * (num_packs * capacity)
    b = slot_b[problem, pair] + problem * (num_packs * capacity)
    for array in (loads, items):  # np.take / np.put index the flat array in place, contiguous or not
        at_a, at_b = np.take(array, a), np.take(array, b)
        np.put(array, a, at_b)
        np.put(array, b, at_a)
    packs = np.concatenate([a, b]) // capacity  # flat pack indices, problem * G + pack
    np.put(pack_loads, packs, row_sums(np.take(loads.reshape(-1, capacity), packs, axis=0)))


def refine_phase(
    slot_loads: np.ndarray,
    slot_items: np.ndarray,
    targets: np.ndarray,
    group_size: int,
    max_rounds: int,
    find_swaps: Callable[..., tuple[np.ndarray, ...]],
    width: int,
) -> None:
    """Rounds of `find_swaps` until no problem's heaviest pack improves or every group met its target;
    finished problems leave the active set. Works in place on the NumPy arrays."""
    num_problems = slot_loads.shape[0]
    if max_rounds == 0 or num_problems == 0:
        return
    num_groups = num_problems // group_size
    active = np.arange(num_problems)
    loads, items, goal, pack_loads = slot_loads, slot_items, targets, row_sums(slot_loads)
    running = np.ones(num_problems, dtype=bool)  # of the active set; finished ones stay put
    group = active // group_size
    for _ in range(max_rounds):
        checkpoint()
        heavy_load, improves, slot_a, slot_b = find_swaps(loads, width, pack_loads)
        group_reached = np.zeros(num_groups, dtype=bool)
        group_reached[group[heavy_load <= goal]] = True
        running &= improves[:, 0] & ~group_reached[group]
        improves &= running[:, None]
        exchange(loads, items, pack_loads, improves, slot_a, slot_b)
        left = int(running.sum())
        if left == 0:
            break
        if left <= active.size - max(1, active.size // COMPACT_SHARE):
            done = ~running
            slot_loads[active[done]] = loads[done]
            slot_items[active[done]] = items[done]
            active, loads, items, goal = active[running], loads[running], items[running], goal[running]
            group, pack_loads = active // group_size, pack_loads[running]
            running = running[running]
    if loads is not slot_loads:  # the active set shrank at least once: write the survivors back
        slot_loads[active] = loads
        slot_items[active] = items


def swap_refine(slot_loads: np.ndarray, slot_items: np.ndarray, targets: np.ndarray, limits: RefineLimits) -> None:
    """Both phases of `packing.swap_refine` on NumPy arrays [B, G, K], in place."""
    num_packs, capacity = slot_loads.shape[1:]
    group, pairs = limits.group_size, limits.pairs(num_packs)
    refine_phase(slot_loads, slot_items, targets, group, limits.pair_rounds, pair_swaps, pairs)
    partners = limits.partners(num_packs, capacity)
    refine_phase(slot_loads, slot_items, targets, group, limits.heaviest_rounds, heaviest_swaps, partners)
