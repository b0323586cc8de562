"""Greedy LPT and swap refinement's heaviest-pack phase on the CPU, compiled with Numba (the pairing phase
before it runs in NumPy, pair_phase.py, for its tie order): the host paths of `packing`.

Both are sequential loops (one step per item, one swap per round) over small arrays. Vectorised over the
problems of a batch, every round paid NumPy's or torch's fixed cost per operation (1-5 us) on a shrinking
set of problems; compiled, each problem runs its rounds to the end in a tight loop (refinement per solve,
DeepSeek-V3 on 72 GPUs, lognormal: 16 ms against 46 ms all in NumPy; Kimi-K2 on 72, uniformish: 54 ms
against 102). The rules are those of `packing`: the same float32 operations in the same order and the
same stops (the candidates of a group stop together, at the round one of them meets its target). Two
things differ from the torch loop, and so can its placements: pack loads are summed slot by slot (torch
sums 5 or more slots in another order, a last-bit difference), and partners of equal load are ordered by
index, where torch.topk leaves the order open. With up to four slots per pack and distinct loads the
placements are the torch loop's bit for bit.
"""

from __future__ import annotations

import numpy as np

from . import pair_phase
from .cancel import checkpoint
from .jit import compiled
from .refinement import IMPROVEMENT, RefineLimits

# Work per compiled call between cancellation checkpoints: about this many item visits (~10-50 ms).
CHUNK_WORK = 1 << 22
# From this many packs the greedy LPT finds the lightest open pack in a tournament tree (log G per item)
# instead of a scan (G per item); the same pack, ties included. Measured per call on 464 problems:
# 72 packs x 4 slots 7.1 -> 4.7 ms, 144 x 2 7.2 -> 3.5 ms, 32 x 9 5.1 -> 3.9 ms; but 16 x 2 (16 problems)
# 8 -> 11 us, where the scan stays.
TREE_MIN_PACKS = 32


@compiled()
def _greedy_steps(item_loads, order, begin, end, key, filled, slot_items):
    """Steps [begin, end) of greedy LPT for every row: key [B, G] (pack load, +inf once full) and
    filled [B, G] carry the state from one call to the next."""
    num_problems, num_packs = key.shape
    capacity = slot_items.shape[2]
    for problem in range(num_problems):
        for step in range(begin, end):
            item = order[problem, step]
            if step < num_packs:  # the first G items open the packs in order
                pack = step
                key[problem, pack] = item_loads[problem, item] + 0.0  # -0.0 -> +0.0
            else:
                pack = 0
                for candidate in range(1, num_packs):  # the first lightest open pack
                    if key[problem, candidate] < key[problem, pack]:
                        pack = candidate
                key[problem, pack] += item_loads[problem, item]
            slot_items[problem, pack, filled[problem, pack]] = item
            filled[problem, pack] += 1
            if filled[problem, pack] == capacity:
                key[problem, pack] = np.inf


@compiled()
def _greedy_steps_tree(item_loads, order, begin, end, key, filled, slot_items):
    """`_greedy_steps` with the lightest open pack kept in a tournament tree over the packs (leaves padded
    to a power of two with +inf; a node holds the lighter child, the lower index on a tie: the scan's
    "first lightest"), rebuilt at the start of each call from `key`."""
    num_problems, num_packs = key.shape
    capacity = slot_items.shape[2]
    size = 1
    while size < num_packs:
        size *= 2
    tree = np.empty(2 * size, dtype=np.int64)
    padded = np.empty(size, dtype=key.dtype)
    for problem in range(num_problems):
        pack_keys = key[problem]
        built = False
        for step in range(begin, end):
            item = order[problem, step]
            if step < num_packs:  # the first G items open the packs in order
                pack = step
                pack_keys[pack] = item_loads[problem, item] + 0.0  # -0.0 -> +0.0
            else:
                if not built:
                    for leaf in range(size):
                        padded[leaf] = pack_keys[leaf] if leaf < num_packs else np.inf
                        tree[size + leaf] = leaf
                    for node in range(size - 1, 0, -1):
                        a, b = tree[2 * node], tree[2 * node + 1]
                        tree[node] = a if padded[a] < padded[b] or (padded[a] == padded[b] and a < b) else b
                    built = True
                pack = tree[1]
                padded[pack] += item_loads[problem, item]
                pack_keys[pack] = padded[pack]
            slot_items[problem, pack, filled[problem, pack]] = item
            filled[problem, pack] += 1
            if filled[problem, pack] == capacity:
                pack_keys[pack] = np.inf
                if built:
                    padded[pack] = np.inf
            if built:
                node = (size + pack) // 2
                while node >= 1:
                    a, b = tree[2 * node], tree[2 * node + 1]
                    tree[node] = a if padded[a] < padded[b] or (padded[a] == padded[b] and a < b) else b
                    node //= 2


def greedy_pack(item_loads: np.ndarray, order: np.ndarray, num_packs: int) -> np.ndarray:
    """`packing.greedy_pack`: items in `order` each go to the first lightest pack with a free slot.

    item_loads [B, N], order [B, N] -> slot_items [B, G, K], slots filled in the order items arrived.
    Compiled calls of about CHUNK_WORK pack visits each, with a cancellation checkpoint between them.
    """
    num_problems, num_items = item_loads.shape
    item_loads = np.ascontiguousarray(item_loads)
    order = np.ascontiguousarray(order, dtype=np.int64)
    slot_items = np.empty((num_problems, num_packs, num_items // num_packs), dtype=np.int64)
    key = np.empty((num_problems, num_packs), dtype=item_loads.dtype)
    filled = np.zeros((num_problems, num_packs), dtype=np.int64)
    rows = max(1, CHUNK_WORK // max(1, num_items * num_packs))
    steps = max(1, CHUNK_WORK // num_packs)
    greedy_steps = _greedy_steps_tree if num_packs >= TREE_MIN_PACKS else _greedy_steps
    for start in range(0, num_problems, rows):
        chunk = slice(start, start + rows)
        for begin in range(0, num_items, steps):
            checkpoint()
            end = min(num_items, begin + steps)
            greedy_steps(item_loads[chunk], order[chunk], begin, end, key[chunk], filled[chunk], slot_items[chunk])
    return slot_items


@compiled(inline="always")
def _pack_sum(loads, problem, pack):
    total = loads[problem, pack, 0]
    for slot in range(1, loads.shape[2]):
        total += loads[problem, pack, slot]
    return total


@compiled(inline="always")
def _least_gap(loads, problem, heavy, partner, half_gap):
    """min over slots a, b of |partner's b - heavy's a + half_gap|, each term as `_best_swap` rounds it:
    a partner whose swaps all miss by more than the best found is skipped without the tie-aware scan
    (on DeepSeek EP72 about 2 of the 32 partners a round compares need it: the phase 1.35x faster)."""
    least = abs(loads[problem, partner, 0] - loads[problem, heavy, 0] + half_gap)
    for a in range(loads.shape[2]):
        item_a = loads[problem, heavy, a]
        for b in range(loads.shape[2]):
            least = min(least, abs(loads[problem, partner, b] - item_a + half_gap))
    return least


@compiled()
def _best_swap(loads, problem, heavy, partners, by_index, pack_loads, consts):
    """The improving swap of heavy pack H with one of `partners` (packs lightest first) that lowers
    max(H - d, P + d) = (H + P) / 2 + |d - (H - P) / 2| the most: (found, heavy slot, partner, its
    position in the list, partner slot). Ties go as in `packing._closest_swaps`: the lowest heavy slot,
    then the first partner (in index order when `by_index`, else in the given order), then the lowest
    slot. A partner's middle (H + P) / 2 is the least any of its swaps leaves and grows along the list,
    so the scan stops at the first partner whose middle exceeds the best found (or reaches the
    improvement threshold)."""
    two, heavy_load = consts[0], pack_loads[heavy]
    best_value = heavy_load * consts[1]  # an improving swap leaves both packs under this
    best_a, best_rank, best_partner, best_b, best_at = -1, 0, 0, 0, 0
    capacity = loads.shape[2]
    for rank in range(partners.shape[0]):
        partner = partners[rank]
        middle = (heavy_load + pack_loads[partner]) / two
        if middle > best_value or (best_a < 0 and middle >= best_value):
            break
        half_gap = (heavy_load - pack_loads[partner]) / two
        if _least_gap(loads, problem, heavy, partner, half_gap) + middle > best_value:
            continue  # rounding is monotonic: no swap of this partner reaches best_value
        position = partner if by_index else rank
        for a in range(capacity):
            item_a = loads[problem, heavy, a]
            for b in range(capacity):
                miss = abs(loads[problem, partner, b] - item_a + half_gap) + middle
                if miss < best_value or (
                    miss == best_value and best_a >= 0 and (a, position, b) < (best_a, best_rank, best_b)
                ):
                    best_value, best_a, best_rank, best_partner, best_b = miss, a, position, partner, b
                    best_at = rank
    return best_a >= 0, best_a, best_partner, best_at, best_b


@compiled()
def _reorder(order, pack_loads, pack, at):
    """Move `pack`, at position `at` of `order` [G] (packs by load, then index), to its place after its
    load changed; returns its new position."""
    num_packs = order.shape[0]
    load = pack_loads[pack]
    while at > 0:  # lighter now: shift heavier ones up
        other = order[at - 1]
        if pack_loads[other] < load or (pack_loads[other] == load and other < pack):
            break
        order[at] = other
        at -= 1
    while at < num_packs - 1:  # heavier now: shift lighter ones down
        other = order[at + 1]
        if load < pack_loads[other] or (load == pack_loads[other] and pack < other):
            break
        order[at] = other
        at += 1
    order[at] = pack
    return at


@compiled(inline="always")
def _heaviest_at(order, pack_loads):
    """The position in `order` of the heaviest pack, the lowest index among equals (np.argmax's): the first
    of the heaviest run at the end of the order, found from the end (one step unless loads tie)."""
    at = order.shape[0] - 1
    while at > 0 and pack_loads[order[at - 1]] == pack_loads[order[at]]:
        at -= 1
    return at


@compiled()
def _exchange(loads, items, pack_loads, order, problem, heavy_at, a, light_at, b):
    """Swap slot a of the pack at position heavy_at of `order` with slot b of the one at light_at; re-sum
    both packs and keep `order`, heavy first (positions known: no search)."""
    heavy, light = order[heavy_at], order[light_at]
    loads[problem, heavy, a], loads[problem, light, b] = loads[problem, light, b], loads[problem, heavy, a]
    items[problem, heavy, a], items[problem, light, b] = items[problem, light, b], items[problem, heavy, a]
    pack_loads[heavy] = _pack_sum(loads, problem, heavy)
    moved_to = _reorder(order, pack_loads, heavy, heavy_at)
    if moved_to <= light_at < heavy_at:  # the heavy pack moved down past it: it shifted up one
        light_at += 1
    pack_loads[light] = _pack_sum(loads, problem, light)
    _reorder(order, pack_loads, light, light_at)


@compiled()
def _heaviest_round(loads, items, pack_loads, order, problem, num_partners, consts):
    """One round of the heaviest-pack phase: its best swap with any of its M lightest partners (every
    pack in index order when M = G), applied when it improves; returns whether it did."""
    heavy_at = _heaviest_at(order, pack_loads)
    every = num_partners >= pack_loads.shape[0]
    partners = order[:num_partners]
    found, a, _, light_at, b = _best_swap(loads, problem, order[heavy_at], partners, every, pack_loads, consts)
    if found:
        _exchange(loads, items, pack_loads, order, problem, heavy_at, a, light_at, b)
    return found


@compiled()
def _refine_groups(loads, items, targets, group_size, max_rounds, num_partners, consts):
    """The heaviest-pack phase for each group of consecutive problems, in lockstep rounds within a group:
    a problem stops when its heaviest pack stops improving, the group when one of its problems meets its
    target (that round's swaps are not applied)."""
    num_problems, num_packs, _ = loads.shape
    pack_loads = np.empty((group_size, num_packs), dtype=loads.dtype)
    orders = np.empty((group_size, num_packs), dtype=np.int64)
    running = np.ones(group_size, dtype=np.bool_)
    for start in range(0, num_problems, group_size):
        for member in range(group_size):
            for pack in range(num_packs):
                pack_loads[member, pack] = _pack_sum(loads, start + member, pack)
            orders[member] = np.argsort(pack_loads[member], kind="mergesort")
        running[:] = True
        for _ in range(max_rounds):
            reached = False
            for member in range(group_size):
                if running[member] and pack_loads[member, orders[member, -1]] <= targets[start + member]:
                    reached = True
            if reached:
                break
            left = 0
            for member in range(group_size):
                if running[member]:
                    state = (pack_loads[member], orders[member], start + member, num_partners, consts)
                    running[member] = _heaviest_round(loads, items, *state)
                    left += running[member]
            if left == 0:
                break


def swap_refine(slot_loads: np.ndarray, slot_items: np.ndarray, targets: np.ndarray, limits: RefineLimits) -> None:
    """Both phases of `packing.swap_refine` on NumPy arrays [B, G, K], in place: the pairing phase in
    NumPy (pair_phase.py, torch.topk's order among equal loads), then the heaviest-pack phase compiled."""
    num_problems, num_packs, capacity = slot_loads.shape
    group, partners = limits.group_size, limits.partners(num_packs, capacity)
    targets = np.ascontiguousarray(targets, dtype=slot_loads.dtype)
    pair_phase.refine_pairs(slot_loads, slot_items, targets, group, limits.pair_rounds, limits.pairs(num_packs))
    work = max(1, min(num_packs, partners) * capacity * capacity * limits.heaviest_rounds * group)
    step = group * max(1, CHUNK_WORK // work)
    # Halving and the improvement factor in the loads' own precision, as the vectorised paths compute them.
    consts = np.array([2.0, 1.0 - IMPROVEMENT], dtype=slot_loads.dtype)
    for start in range(0, num_problems, step):
        checkpoint()
        rows = slice(start, start + step)
        rounds = limits.heaviest_rounds
        _refine_groups(slot_loads[rows], slot_items[rows], targets[rows], group, rounds, partners, consts)


def warm_up() -> None:
    """Compile (or load from the disk cache) both loops for float32 and float64 loads, so that no
    request pays the first compilation (about 10 s without a cache)."""
    for dtype in (np.float32, np.float64):
        loads = np.arange(8, 0, -1, dtype=dtype).reshape(1, 8)
        wide = np.arange(2 * TREE_MIN_PACKS, 0, -1, dtype=dtype).reshape(1, -1)
        greedy_pack(wide, np.arange(wide.shape[1]).reshape(1, -1), TREE_MIN_PACKS)
        items = greedy_pack(loads, np.arange(8).reshape(1, 8), 2)
        slot_loads = np.take_along_axis(loads, items.reshape(1, 8), 1).reshape(1, 2, 4)
        swap_refine(slot_loads, items, np.zeros(1, dtype=dtype), RefineLimits())
