"""Exact placement for two slots per GPU when the copy counts can be enumerated.

With two slots per GPU, pairing the i-th heaviest copy with the i-th lightest minimises the max GPU
load for given copies (exchange argument), so the whole problem is the choice of copies per expert.
When the vectors of counts (c_e >= 1, sum R) are few, as on small layers (8 experts on 16 slots: 6435),
all of them are scored at once: the optimum, for a few batched ops, where hill-climbing over copy moves
stays stuck up to several % above it.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

from .jit import compiled
from .replication import slots_from_counts

# Largest count-vector table scored per layer (vectors x slots): bounds memory at P x this x 16 bytes.
MAX_TABLE = 1 << 17
# Exponents on the loads of the greedy count vectors whose best score the CPU search starts from (lower
# ones spread copies to mid-sized experts, which pairs better), and the relative margin on the bounds
# that covers their float32 rounding.
GREEDY_EXPONENTS = (1.0, 0.75, 0.5)
BOUND_MARGIN = 1e-5
# Float32 scores this close (relative, a few ulps) are ties: the same max GPU load summed in another order.
TIE_MARGIN = 1e-6


def num_count_vectors(num_experts: int, num_replicas: int) -> int:
    """How many ways R slots give every one of E experts at least one copy: C(R - 1, E - 1)."""
    return math.comb(num_replicas - 1, num_experts - 1)


def few_count_vectors(num_experts: int, num_replicas: int, limit: int) -> bool:
    """Whether C(R - 1, E - 1) <= `limit`, without the whole number: it grows term by term up to the middle,
    so the product stops once past the limit (the exact value for 65,536 experts on 2**19 slots, a
    shape the service must cost without blocking, takes 0.2 s)."""
    n = num_replicas - 1
    k = min(num_experts - 1, n - (num_experts - 1))
    value = 1
    for i in range(1, k + 1):
        value = value * (n - k + i) // i  # C(n - k + i, i), exact at every step
        if value > limit:
            return False
    return value <= limit


def applies(num_experts: int, num_replicas: int, num_gpus: int) -> bool:
    """Whether `pair_optimum` solves this shape: two slots per GPU, two experts or more (one expert has
    a single count vector, which the search does not handle) and a small enough table."""
    if num_replicas != 2 * num_gpus or num_experts < 2:
        return False
    return few_count_vectors(num_experts, num_replicas, MAX_TABLE // num_replicas)


@functools.cache
def _count_table(num_experts: int, num_replicas: int) -> torch.Tensor:
    # Stars and bars: E - 1 cuts among the R - 1 gaps between slots. Built once per shape (K rows).
    combos = list(itertools.combinations(range(1, num_replicas), num_experts - 1))
    cuts = torch.tensor(combos, dtype=torch.int64).view(len(combos), num_experts - 1)
    first, last = torch.zeros(len(combos), 1, dtype=torch.int64), torch.full((len(combos), 1), num_replicas)
    edges = torch.cat([first, cuts, last], 1)
    return edges.diff(dim=1)


def count_vectors(num_experts: int, num_replicas: int, device: torch.device) -> torch.Tensor:
    """Every count vector [K, E] (int64, each >= 1, rows summing to R), in lexicographic order of cuts."""
    return _count_table(num_experts, num_replicas).to(device)


def pair_optimum(loads: torch.Tensor, num_replicas: int, num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """loads [P, E] float64 -> (phy2log [P, R], max GPU load [P]), optimal for two slots per GPU.

    Requires `applies(E, R, G)`. GPU g hosts the g-th heaviest and the g-th lightest copy of the best
    count vector (among equals the one with the lightest heaviest copy, then the lowest index, so a row's
    result does not depend on its batch). On a GPU every row scores the whole table at once; on the CPU
    `host_optimum` searches the counts depth first, compiled, cutting what cannot reach a greedy score
    (the same optimum and tie rule, in the table's order over the experts sorted by load).
    """
    if loads.device.type == "cpu":
        phy2log, peak = host_optimum(loads.numpy(), num_replicas, num_gpus)
        return torch.from_numpy(phy2log), torch.from_numpy(peak)
    counts = count_vectors(loads.shape[1], num_replicas, loads.device)  # [K, E]
    whole_table = torch.arange(counts.shape[0], device=loads.device).unsqueeze(0)  # [1, K]
    return _score(loads, counts, whole_table, num_gpus)[:2]


def host_optimum(
    loads: np.ndarray,
    num_replicas: int,
    num_gpus: int,
    ceiling: np.ndarray | None = None,
    max_ties: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`pair_optimum` on the CPU: loads [P, E] float64 -> (phy2log [P, R] int64, max GPU load [P] float64).
    With `ceiling` [P], a row whose optimum exceeds its ceiling gets peak +inf (phy2log zeros): a caller
    that only wants plans within a bound lets the search cut by it from the start. `max_ties` bounds the
    vectors a row keeps for the tie rule (default: all C(R - 1, E - 1), as every vector may tie): with
    fewer, the optimum is the same and only a tie beyond that many may pick another winner; it lets a
    benchmark prove optima of shapes whose count table is far too large to keep (16 experts on 32 slots).

    Per row, experts sorted heaviest first, a few greedy count vectors give a score V (an upper bound on
    the optimum), and a depth-first search over the counts, heaviest expert first and each count in
    increasing order (the table's order), visits only what can still reach V: a count vector's score
    (max pair load) is at least its largest + smallest copy, and above the limit once more than G copies
    exceed half of it (two of them share a GPU). Both bounds hold for partial vectors (the smallest copy
    to come is at least each later expert's load over the most copies it can get), so whole subtrees are
    skipped (8 experts on 16 slots: a few dozen of the 6,435 vectors scored per row). Scores are float32,
    as on the GPU, the winner's peak exact; among ties the same winner as the table's rule. The search
    runs compiled, row by row (`_row_optima`).
    """
    num_rows, num_experts = loads.shape
    phy2log = np.empty((num_rows, num_replicas), dtype=np.int64)
    peak = np.empty(num_rows, dtype=np.float64)
    rows = np.ascontiguousarray(loads, dtype=np.float64)
    capacity = num_count_vectors(num_experts, num_replicas)  # every vector may tie (all-zero rows)
    capacity = capacity if max_ties is None else max(1, min(capacity, max_ties))
    ceilings = np.full(num_rows, np.inf) if ceiling is None else np.ascontiguousarray(ceiling, dtype=np.float64)
    _row_optima(rows, ceilings, _HOST_EXPONENTS, _HOST_SCALARS, capacity, phy2log, peak)
    return phy2log, peak


# Float32 constants of the CPU search: the margins on its bounds and ties, and the least ceiling (on an
# all-zero row every vector ties at 0).
_HOST_SCALARS = np.array(
    [1.0 + BOUND_MARGIN, 1.0 - BOUND_MARGIN, 1.0 + TIE_MARGIN, np.finfo(np.float32).tiny], dtype=np.float32
)
_HOST_EXPONENTS = np.array(GREEDY_EXPONENTS, dtype=np.float32)


@compiled()
def _vector_score(ranked32, counts, counts32, vector, values, runs, copies):
    """(max pair load, heaviest copy) of count vector `vector` on ranked32 [E]: the copies sorted (values,
    runs [E] and copies [R] are scratch), the i-th lightest with the i-th heaviest, in float32."""
    num_experts = ranked32.shape[0]
    # Per-copy loads, lightest first: an insertion sort of E, lightest expert first (single copies then
    # arrive in order; only the experts with copies to split move far).
    for placed, expert in enumerate(range(num_experts - 1, -1, -1)):
        value, at = ranked32[expert] / counts32[vector, expert], placed
        while at > 0 and values[at - 1] > value:
            values[at], runs[at] = values[at - 1], runs[at - 1]
            at -= 1
        values[at], runs[at] = value, counts[vector, expert]
    slot = 0
    for expert in range(num_experts):  # each expert's copies in a run
        for _ in range(runs[expert]):
            copies[slot] = values[expert]
            slot += 1
    num_replicas = copies.shape[0]
    peak = copies[0] + copies[num_replicas - 1]
    for pair in range(1, num_replicas // 2):
        peak = max(peak, copies[pair] + copies[num_replicas - 1 - pair])
    return peak, values[num_experts - 1]


@compiled()
def _greedy_ceiling(ranked32, exponents, greedy, values, runs, copies):
    """The best score of greedy replication (each extra copy to the largest load per copy) on the loads
    raised to each exponent: an upper bound on the optimum. `greedy` [1, E] is scratch."""
    num_experts, num_replicas = ranked32.shape[0], copies.shape[0]
    counts32 = np.empty((1, num_experts), dtype=np.float32)
    best = np.float32(np.inf)
    for exponent in exponents:
        powered = ranked32**exponent
        greedy[0, :] = 1
        for _ in range(num_replicas - num_experts):
            target = 0
            for expert in range(1, num_experts):
                if powered[expert] / greedy[0, expert] > powered[target] / greedy[0, target]:
                    target = expert
            greedy[0, target] += 1
        counts32[0, :] = greedy[0, :]
        best = min(best, _vector_score(ranked32, greedy, counts32, 0, values, runs, copies)[0])
    return best


@compiled()
def _row_optima(loads, ceilings, exponents, scalars, capacity, phy2log, peak):
    """`host_optimum` for every row, into phy2log [P, R] and peak [P]: the greedy ceiling (or the row's
    own, if lower), the search (`_branch`), the winner and its placement. `capacity`: the most vectors a
    row may keep."""
    num_rows, num_experts = loads.shape
    num_replicas = phy2log.shape[1]
    values, runs = np.empty(num_experts, dtype=np.float32), np.empty(num_experts, dtype=np.int64)
    copies, greedy = np.empty(num_replicas, dtype=np.float32), np.empty((1, num_experts), dtype=np.int64)
    kept = np.empty((capacity, num_experts), dtype=np.int64)
    scores, heaviest = np.empty(capacity, dtype=np.float32), np.empty(capacity, dtype=np.float32)
    for row in range(num_rows):
        order = np.argsort(-loads[row], kind="mergesort")  # heaviest first, index order among equals
        ranked = loads[row][order]
        ranked32 = ranked.astype(np.float32)
        ceiling = min(_greedy_ceiling(ranked32, exponents, greedy, values, runs, copies), ceilings[row])
        ceiling = max(np.float32(ceiling) * scalars[0], scalars[3])
        found = _branch(ranked32, ceiling, scalars, kept, scores, heaviest, values, runs, copies)
        if found == 0:  # nothing within the row's ceiling
            peak[row], phy2log[row] = np.inf, 0
            continue
        # Among scores within the tie margin of the best, the lightest heaviest copy, then the first found
        # (the lowest table index: the search visits vectors in the table's order).
        limit = scores[:found].min() * scalars[2]
        lightest = np.inf
        for n in range(found):
            if scores[n] <= limit:
                lightest = min(lightest, heaviest[n])
        winner = 0
        while scores[winner] > limit or heaviest[winner] != lightest:
            winner += 1
        peak[row] = place_pairs(ranked, order, kept[winner], num_replicas // 2, phy2log[row])


@compiled()
def _branch(ranked32, ceiling, scalars, kept, scores, heaviest, values, runs, copies):
    """Depth-first search over count vectors of ranked32 [E] (heaviest first) with a score within
    `ceiling` that could still tie the best so far; keeps, in visit order, those within the tie margin of
    the running best into kept [K, E], scores and heaviest [K] -> how many were kept.

    Depth d holds expert d's count, from the least that keeps its copies within the ceiling up to what the
    later experts' least counts leave. A partial vector is cut when more than G copies already exceed half
    the limit, or when its largest copy plus the least its smallest copy can become (this expert's copy, or
    a later expert's load over the most copies it can get) exceeds the limit. The limit is the ceiling or
    the best score so far (with the bound margin): a vector's score is at least either bound."""
    num_experts, num_replicas = ranked32.shape[0], copies.shape[0]
    num_gpus = num_replicas // 2
    least = np.empty(num_experts, dtype=np.int64)  # every copy within the ceiling
    for expert in range(num_experts):
        least[expert] = min(max(int(np.ceil(ranked32[expert] / ceiling * scalars[1])), 1), num_replicas)
    later = np.zeros(num_experts, dtype=np.int64)  # the least counts of the experts after d, summed
    for expert in range(num_experts - 2, -1, -1):
        later[expert] = later[expert + 1] + least[expert + 1]
    vector, vector32 = np.empty((1, num_experts), dtype=np.int64), np.empty((1, num_experts), dtype=np.float32)
    used = np.zeros(num_experts, dtype=np.int64)
    above = np.zeros(num_experts, dtype=np.int64)
    high = np.zeros(num_experts, dtype=np.float32)
    low = np.full(num_experts, np.inf, dtype=np.float32)
    best, found, depth = np.float32(np.inf), 0, 0
    vector[0, 0] = least[0]
    while depth >= 0:
        last = depth == num_experts - 1
        count = vector[0, depth]
        if count > num_replicas - used[depth] - later[depth]:  # this depth's counts are exhausted
            depth -= 1
            if depth >= 0:
                vector[0, depth] += 1
            continue
        value = ranked32[depth] / np.float32(count)
        limit = min(ceiling, best * scalars[2] * scalars[0])
        top, bottom = max(high[depth], value), min(low[depth], value)
        half = limit * np.float32(0.5)
        exceeding = above[depth] + count * (value > half)
        floor = bottom
        spare = num_replicas - used[depth] - count - later[depth]  # slots beyond the later least counts
        forced, rate = 0, 0.0
        for expert in range(depth + 1, num_experts):
            floor = min(floor, ranked32[expert] / np.float32(least[expert] + spare))
            # At its least count a later expert's copies may all exceed half; taking it under half costs
            # `below - least` more slots for `least` fewer such copies (`below` rounded down: a weaker cut).
            below = int(np.ceil(ranked32[expert] / half * scalars[1])) if half > 0 else num_replicas + 1
            if below > least[expert] and ranked32[expert] / np.float32(least[expert]) > half:
                forced += least[expert]
                rate = max(rate, least[expert] / (below - least[expert]))
        exceeding_at_least = exceeding + max(0.0, forced - spare * rate)
        if exceeding_at_least <= num_gpus and top + floor <= limit:
            if last:
                vector32[0, :] = vector[0, :]
                score, heaviest_copy = _vector_score(ranked32, vector, vector32, 0, values, runs, copies)
                if score <= best * scalars[2]:
                    best = min(best, score)
                    if found == kept.shape[0]:  # full: keep only the ties of the best so far
                        found = _ties_only(kept, scores, heaviest, found, best * scalars[2])
                    if found < kept.shape[0]:
                        kept[found, :], scores[found], heaviest[found] = vector[0, :], score, heaviest_copy
                        found += 1
            else:
                used[depth + 1], above[depth + 1] = used[depth] + count, exceeding
                high[depth + 1], low[depth + 1] = top, bottom
                depth += 1
                last = depth == num_experts - 1
                vector[0, depth] = num_replicas - used[depth] if last else least[depth]
                continue
        if last:  # the last expert takes every slot left: one count only
            depth -= 1
            if depth >= 0:
                vector[0, depth] += 1
        else:
            vector[0, depth] += 1
    return found


@compiled()
def _ties_only(kept, scores, heaviest, found, limit):
    """Drop the kept vectors scoring above `limit`, the rest in visit order -> how many remain."""
    remaining = 0
    for n in range(found):
        if scores[n] <= limit:
            kept[remaining, :], scores[remaining], heaviest[remaining] = kept[n, :], scores[n], heaviest[n]
            remaining += 1
    return remaining


@compiled()
def place_pairs(ranked, order, counts, num_gpus, phy2log):
    """GPU g holds the g-th heaviest and the g-th lightest copy of counts [E] (float32 per-copy loads,
    slot order among equals; each expert's copies in a run) of experts `ranked` [E] (loads, in any
    order; `order` [E] their ids) into phy2log [R]; returns the exact max GPU load."""
    num_replicas = phy2log.shape[0]
    experts = np.empty(num_replicas, dtype=np.int64)
    slot = 0
    for expert in range(ranked.shape[0]):
        for _ in range(counts[expert]):
            experts[slot] = expert
            slot += 1
    copy32 = np.empty(num_replicas, dtype=np.float32)
    for slot in range(num_replicas):
        copy32[slot] = np.float32(ranked[experts[slot]]) / np.float32(counts[experts[slot]])
    by_load = np.argsort(-copy32, kind="mergesort")  # heaviest first, slot order among equals
    peak = 0.0
    for gpu in range(num_gpus):
        first, second = experts[by_load[gpu]], experts[by_load[num_replicas - 1 - gpu]]
        phy2log[2 * gpu], phy2log[2 * gpu + 1] = order[first], order[second]
        peak = max(peak, ranked[first] / counts[first] + ranked[second] / counts[second])
    return peak


def tie_winner(scores: torch.Tensor, heaviest: torch.Tensor, keys: torch.Tensor, margin: float) -> torch.Tensor:
    """The position [P] of each row's winner among J candidates: the lowest score; among scores within
    `margin` (relative) of it, the lightest heaviest copy, then the lowest key. scores, heaviest [P, J],
    keys [P or 1, J] int64 (table indices, or positions)."""
    tied = scores <= scores.min(-1, keepdim=True).values * (1.0 + margin)
    tied &= heaviest <= torch.where(tied, heaviest, torch.inf).min(-1, keepdim=True).values
    return torch.where(tied, keys, torch.iinfo(torch.int64).max).argmin(-1)


def _score(
    loads: torch.Tensor, counts: torch.Tensor, picked: torch.Tensor, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best of the `picked` count vectors ([P, J] or [1, J] for every row: indices into counts
    [K, E]) per row, scored by the max pair load of heaviest-with-lightest in float32 -> (phy2log [P, R],
    exact max GPU load [P] float64, winning float32 score [P]). Among equal scores the lightest heaviest
    copy wins, then the lowest index."""
    num_rows, num_experts = loads.shape
    num_replicas = 2 * num_gpus
    picked_counts = counts[picked]  # [P or 1, J, E]
    experts = slots_from_counts(picked_counts, num_replicas).expand(num_rows, -1, -1)  # [P, J, R]
    # Scored in float32 (the sort is the cost; rows are scaled to a max load of 1 by the API), the
    # winner's peak then recomputed exactly.
    per_copy = loads.to(torch.float32).unsqueeze(1) / picked_counts.to(torch.float32)  # [P, J, E]
    copy_loads = per_copy.gather(2, experts)  # [P, J, R]
    ordered, order = copy_loads.sort(dim=2, descending=True, stable=True)
    pair_peaks = (ordered[..., :num_gpus] + ordered[..., num_gpus:].flip(2)).max(2).values  # [P, J]
    best_score = pair_peaks.min(1, keepdim=True).values
    # Among the equal best, the lowest table index (a shortlist is in bound order, not index order).
    best = tie_winner(pair_peaks, per_copy.amax(2), picked, TIE_MARGIN).unsqueeze(1)  # [P, 1]
    chosen = order.gather(1, best.unsqueeze(2).expand(-1, 1, num_replicas)).squeeze(1)  # [P, R] slot ids
    by_gpu = torch.stack([chosen[:, :num_gpus], chosen[:, num_gpus:].flip(1)], 2).view(num_rows, num_replicas)
    phy2log = experts.gather(1, best.unsqueeze(2).expand(-1, 1, num_replicas)).squeeze(1).gather(1, by_gpu)
    best_counts = counts[picked.expand(num_rows, -1).gather(1, best).squeeze(1)]  # [P, E]
    exact = (loads / best_counts.to(loads.dtype)).gather(1, phy2log)
    peak = exact.view(num_rows, num_gpus, 2).sum(-1).max(-1).values
    return phy2log, peak, best_score.squeeze(1)
