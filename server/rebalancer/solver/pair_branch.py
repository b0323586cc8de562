"""Branch and bound over copy counts for two slots per GPU, cut by Hall's matching condition.

The climb of pair_search.py stops at local optima: on 105 layers of 10-16 experts on 16-32 slots (five
load kinds, three seeds) its max GPU load was 2.3 % above the exact optimum on average and up to 13.9 %
above it (equal-ish loads, where the optimum splits experts the climb cannot reach one copy at a time).
This search starts from the climb's plan and looks for a strictly lower peak T, depth first over the
experts heaviest first, each count in increasing order (most copies first did worse on those layers:
1.3 % against 0.45 % at 300 steps after four starts).

A count vector pairs within T (heaviest copy with lightest, exact.py) exactly when every copy s > T / 2
("big", two cannot share a GPU) finds its own partner <= T - s: for each big size s, the copies >= s
number at most the small copies <= T - s (Hall's condition on nested neighbourhoods). A partial vector
is cut when that already fails for its decided experts even if the undecided ones gave the most small
copies they could: the r slots left, less one for each undecided expert not split down to size <= T - s
(lightest first: each split takes ceil(w / (T - s)) slots). The cut never removes a vector within T,
so without a node budget the search is exact (tests check it against exact.py's enumeration). With the
budget it is anytime: every node is one loop step, so a row's result depends on its loads only.
Measured on those 105 layers, after the climb from two starts: 900 steps (~0.04 ms a layer) bring the
mean gap to 0.28 % (worst 3.5 %; 0.35 % / 3.4 % on 140 held-out layers), and on the optimality
benchmark's 27 two-slot layers to 0.19 % (worst 1.7 %); more steps gain little until thousands, and the
README-sized two-slot shape (2 x 16 -> 32 slots) already spends about vLLM's planner time. Unbounded it
proves every optimum, in ~0.9 ms a layer on average. Each step costs O(decided experts): the matching
margins of a decided prefix are kept per depth and updated by one expert.
"""

from __future__ import annotations

import numpy as np

from .jit import compiled

# Loop steps a row may take: the climb's plan is kept where the search finds nothing better within them
# (600 steps: worst gap 2.3 % on the benchmark's two-slot layers; 900: 1.7 %; 1,500: the same).
NODE_BUDGET = 900
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
    # margin[d, j]: for big copy j, the decided small copies within its reach less the decided copies at
    # least as big, over experts 0..d-1 (row d + 1 derives from row d: one expert more).
    margin = np.zeros((num_experts + 1, num_experts), dtype=np.int64)
    vector[0], depth, steps = least[0], 0, 0
    while depth >= 0 and steps < budget:
        steps += 1
        if depth == num_experts - 1:  # the last expert takes every slot left: one count only
            vector[depth] = num_replicas - used[depth]
            sizes[depth] = ranked[depth] / vector[depth]
            score = sizes_peak(sizes, vector, order)
            if score <= limit:
                best, limit = score, score * (1.0 - MIN_GAIN)
                counts[:] = vector
                _recount(vector, sizes, depth, limit, margin)
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
        spare = num_replicas - used[depth] - count
        if sizes[depth] <= limit and _matchable(ranked, vector, sizes, depth, spare, limit, margin):
            used[depth + 1] = used[depth] + count
            depth += 1
            vector[depth] = least[depth]
        else:
            vector[depth] += 1
    return best


@compiled()
def _matchable(ranked, vector, sizes, depth, spare, limit, margin):
    """Hall's condition at `limit` for the big copies of experts 0..depth, the small copies <= T - s
    being the decided ones plus the most the later experts can give on `spare` slots. Fills row
    depth + 1 of `margin` from row depth and expert `depth`."""
    half, size, count = limit * 0.5, sizes[depth], vector[depth]
    for big in range(depth):
        change = 0
        if sizes[big] > half:
            if size > half and size >= sizes[big]:
                change = -count
            elif size <= limit - sizes[big]:
                change = count
        margin[depth + 1, big] = margin[depth, big] + change
    margin[depth + 1, depth] = _margin(vector, sizes, depth, depth, half, limit)
    for big in range(depth + 1):
        deficit = -margin[depth + 1, big] if sizes[big] > half else 0
        if deficit > 0 and not _coverable(ranked, depth + 1, spare, limit - sizes[big], deficit):
            return False
    return True


@compiled()
def _margin(vector, sizes, big, depth, half, limit):
    """Small copies within reach of big copy `big` less the copies at least as big, over experts
    0..depth (0 for a copy that is not big)."""
    if not sizes[big] > half:
        return 0
    value = 0
    for expert in range(depth + 1):
        if sizes[expert] > half and sizes[expert] >= sizes[big]:
            value -= vector[expert]
        elif sizes[expert] <= limit - sizes[big]:
            value += vector[expert]
    return value


@compiled()
def _recount(vector, sizes, depth, limit, margin):
    """The margins of the path's experts 0..depth-1 under a new (lower) limit: a copy that was small may
    now be big, and every reach shrinks (rare: once per better plan found)."""
    half = limit * 0.5
    for level in range(depth):
        for big in range(level + 1):
            margin[level + 1, big] = _margin(vector, sizes, big, level, half, limit)


@compiled()
def _coverable(ranked, first, spare, reach, deficit):
    """Whether experts first.. (ranked heaviest first) can hold `deficit` more copies of size <= reach
    than they hold slots elsewhere, on `spare` slots, each expert keeping at least one: the most such
    copies split the lightest first, each to ceil(w / reach) copies, every slot left to a split one, so
    k split experts give spare - (undecided - k), and the k lightest fit whenever any k do. An optimistic
    answer (experts that need more than one copy are charged one), so a False cuts safely."""
    undecided = ranked.shape[0] - first
    if undecided <= 0:
        return deficit <= 0
    if not reach > 0.0:
        return deficit <= spare
    wanted = max(1, undecided + deficit - spare)  # split experts needed
    if wanted > undecided:
        return False
    inverse, need = 1.0 / reach, 0
    for lightest in range(wanted):
        need += max(int(np.ceil(ranked[ranked.shape[0] - 1 - lightest] * inverse)), 1)
    return need + (undecided - wanted) <= spare


@compiled()
def sizes_peak(sizes, vector, order):
    """Max pair load of experts with per-copy loads sizes [E] and counts vector [E], heaviest copy with
    lightest: the experts sorted by per-copy load (order [E] is scratch), then their runs of copies
    paired from both ends."""
    num_experts = sizes.shape[0]
    for position in range(num_experts):  # insertion sort of the experts by per-copy load, ascending
        at = position
        while at > 0 and sizes[order[at - 1]] > sizes[position]:
            order[at] = order[at - 1]
            at -= 1
        order[at] = position
    low, high = 0, num_experts - 1
    left_low, left_high = vector[order[low]], vector[order[high]]
    peak = 0.0
    while low < high:
        peak = max(peak, sizes[order[low]] + sizes[order[high]])
        taken = min(left_low, left_high)
        left_low, left_high = left_low - taken, left_high - taken
        if left_low == 0:
            low += 1
            left_low = left_high if low == high else vector[order[low]]
        if left_high == 0:
            high -= 1
            left_high = left_low if low == high else vector[order[high]]
    if low == high and left_low >= 2:  # copies of one expert pair with each other
        peak = max(peak, 2.0 * sizes[order[low]])
    return peak
