"""Branch and bound over copy counts for two slots per GPU, cut by Hall's matching condition.

The climb of pair_search.py stops at local optima: on 105 layers of 10-16 experts on 16-32 slots (five
load kinds, three seeds) its max GPU load was 2.3 % above the exact optimum on average and up to 13.9 %
above it (equal-ish loads, where the optimum splits experts the climb cannot reach one copy at a time).
This search starts from the climb's plan and looks for a strictly lower peak T, depth first over the
experts heaviest first, each count in increasing order (most copies first did worse on those layers:
1.3 % against 0.45 % at 300 steps).

A count vector pairs within T (heaviest copy with lightest, exact.py) exactly when every copy s > T / 2
("big", two cannot share a GPU) finds its own partner <= T - s: for each big size s, the copies >= s
number at most the small copies <= T - s (Hall's condition on nested neighbourhoods). A partial vector
is cut when that already fails for its decided experts even if the undecided ones gave the most small
copies they could: the r slots left, less one for each undecided expert not split down to size <= T - s
(lightest first: each split takes ceil(w / (T - s)) slots). The cut never removes a vector within T,
so without a node budget the search is exact (tests check it against exact.py's enumeration). With the
budget it is anytime: every node is one loop step, so a row's result depends on its loads only.
Measured on those 105 layers, after the climb: 300 steps bring the mean gap to 0.45 % (worst 5.6 %),
for ~0.05 ms a layer; 2,000 steps to 0.17 % (worst 2.3 %), but then the README-sized two-slot shape
(2 x 16 -> 32 slots) takes 1.6x vLLM's planner time instead of 0.9x; unbounded it proves every
optimum, in 5 ms a layer on average.
"""

from __future__ import annotations

import numpy as np

from .jit import compiled

# Loop steps a row may take: the climb's plan is kept where the search finds nothing better within them.
NODE_BUDGET = 300
# A plan must lower the peak by this relative amount to replace the best so far (float noise never counts).
MIN_GAIN = 1e-7
# Counts start at the least that keeps a copy within the limit, less this relative slack on the division.
LEAST_SLACK = 1e-9


@compiled()
def lower_counts(ranked, num_replicas, counts, peak, budget):
    """Search counts (each >= 1, summing to R) of ranked [E] (float64 loads, heaviest first) whose
    pairing peaks below `peak` (the incumbent's, float64) by MIN_GAIN, within `budget` loop steps.
    Writes the best found into counts [E] (left as is when none) and returns its peak."""
    num_experts = ranked.shape[0]
    best = peak
    limit = best * (1.0 - MIN_GAIN)
    if not limit > 0.0:
        return best
    least = np.empty(num_experts, dtype=np.int64)
    for expert in range(num_experts):
        least[expert] = max(int(np.ceil(ranked[expert] / limit * (1.0 - LEAST_SLACK))), 1)
    later = np.zeros(num_experts, dtype=np.int64)  # the least counts of the experts after d, summed
    for expert in range(num_experts - 2, -1, -1):
        later[expert] = later[expert + 1] + least[expert + 1]
    vector = np.empty(num_experts, dtype=np.int64)
    sizes = np.empty(num_experts)  # per-copy load of each decided expert
    used = np.zeros(num_experts + 1, dtype=np.int64)
    order = np.empty(num_experts, dtype=np.int64)
    vector[0], depth, steps = least[0], 0, 0
    while depth >= 0 and steps < budget:
        steps += 1
        if depth == num_experts - 1:  # the last expert takes every slot left: one count only
            vector[depth] = num_replicas - used[depth]
            score = pairing_peak(ranked, vector, order)
            if score <= limit:
                best, limit = score, score * (1.0 - MIN_GAIN)
                counts[:] = vector
            depth -= 1
            if depth >= 0:
                vector[depth] += 1
            continue
        count = vector[depth]
        if count > num_replicas - used[depth] - later[depth]:  # this depth's counts are exhausted
            depth -= 1
            if depth >= 0:
                vector[depth] += 1
            continue
        sizes[depth] = ranked[depth] / count
        if sizes[depth] <= limit and _matchable(
            ranked, vector, sizes, depth, num_replicas - used[depth] - count, limit
        ):
            used[depth + 1] = used[depth] + count
            depth += 1
            vector[depth] = least[depth]
        else:
            vector[depth] += 1
    return best


@compiled()
def _matchable(ranked, vector, sizes, depth, spare, limit):
    """Hall's condition at `limit` for the big copies of experts 0..depth, the small copies <= T - s
    being the decided ones plus the most the later experts can give on `spare` slots."""
    half = limit * 0.5
    for big in range(depth + 1):
        size = sizes[big]
        if size <= half:
            continue
        reach = limit - size  # a partner of this copy weighs at most this
        demand, supply = 0, 0
        for expert in range(depth + 1):
            if sizes[expert] > half and sizes[expert] >= size:
                demand += vector[expert]
            elif sizes[expert] <= reach:
                supply += vector[expert]
        if demand > supply and demand > supply + _most_small_copies(ranked, depth + 1, spare, reach):
            return False
    return True


@compiled()
def _most_small_copies(ranked, first, spare, reach):
    """The most copies of size <= reach experts first.. (ranked heaviest first) can hold on `spare`
    slots, each keeping at least one: split the lightest first, each to ceil(w / reach) copies, every
    slot left to a split one. At least the true most (experts that need more than one copy are
    charged one)."""
    num_experts = ranked.shape[0]
    undecided = num_experts - first
    if undecided <= 0:
        return 0
    if not reach > 0.0:
        return spare
    inverse, taken, need = 1.0 / reach, 0, 0
    for expert in range(num_experts - 1, first - 1, -1):
        split = max(int(np.ceil(ranked[expert] * inverse)), 1)
        if need + split + (undecided - taken - 1) > spare:
            break
        need, taken = need + split, taken + 1
    return spare - (undecided - taken) if taken else 0


@compiled()
def pairing_peak(ranked, vector, order):
    """Max pair load of counts vector [E] on ranked [E], heaviest copy with lightest, in float64: the
    experts sorted by per-copy load (order [E] is scratch), then their runs of copies paired from both
    ends."""
    num_experts = ranked.shape[0]
    for position in range(num_experts):  # insertion sort of the experts by per-copy load, ascending
        expert, at = position, position
        value = ranked[expert] / vector[expert]
        while at > 0 and ranked[order[at - 1]] / vector[order[at - 1]] > value:
            order[at] = order[at - 1]
            at -= 1
        order[at] = expert
    low, high = 0, num_experts - 1
    left_low, left_high = vector[order[low]], vector[order[high]]
    peak = 0.0
    while low < high:
        pair = ranked[order[low]] / vector[order[low]] + ranked[order[high]] / vector[order[high]]
        peak = max(peak, pair)
        taken = min(left_low, left_high)
        left_low, left_high = left_low - taken, left_high - taken
        if left_low == 0:
            low += 1
            left_low = left_high if low == high else vector[order[low]]
        if left_high == 0:
            high -= 1
            left_high = left_low if low == high else vector[order[high]]
    if low == high and left_low >= 2:  # copies of one expert pair with each other
        peak = max(peak, 2.0 * ranked[order[low]] / vector[order[low]])
    return peak
