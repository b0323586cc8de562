"""The pairing phase of swap refinement on the CPU, in NumPy: the q heaviest packs against the q lightest.

It stays vectorised (16 rounds at most, all problems at once) for one reason: which of several packs of
equal load it pairs is torch.topk's order here, and the drifting benchmark's next-window balancedness
measured better with that order than with pack-index order (+0.0001 against -0.0011 vs the reference
over 3 shapes x 2 seeds; token counts tie often). The heaviest-pack phase after it runs compiled
(host_packing.py). Same float32 steps as `packing`; pack sums in torch's order.
"""

from __future__ import annotations

import numpy as np
import torch

from .cancel import checkpoint
from .refinement import IMPROVEMENT

# Compacting copies the active set: done only once an eighth of it has finished (the finished ones
# meanwhile compute swaps they never apply).
COMPACT_SHARE = 8


def row_sums(slot_loads: np.ndarray) -> np.ndarray:
    """Sums over the last axis in torch's order, which differs from NumPy's in the last bit from 5 slots
    on: the host path then takes the decisions of the torch loop, bit for bit."""
    return torch.from_numpy(np.ascontiguousarray(slot_loads)).sum(-1).numpy()


def extremes(pack_loads: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The `count` heaviest and the `count` lightest packs per row [B, count], in torch.topk's order (see
    the module's docstring for why this order). Two small topk calls a round."""
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


def refine_pairs(
    slot_loads: np.ndarray, slot_items: np.ndarray, targets: np.ndarray, group_size: int, max_rounds: int, width: int
) -> None:
    """Rounds of `pair_swaps` until no problem's heaviest pack improves or every group met its target;
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
        heavy_load, improves, slot_a, slot_b = pair_swaps(loads, width, pack_loads)
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
