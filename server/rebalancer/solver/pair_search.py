"""Two slots per GPU on small layers, on the CPU: a climb over copy counts, each count vector scored
exactly by its optimal packing.

With two slots per GPU, pairing the i-th heaviest copy with the i-th lightest is the best packing of
given copies (exact.py), so the problem is the choice of copies per expert. Where the count vectors are
too many to score all (16 experts on 32 slots: 3e8), this module climbs from several greedy count
vectors: each round scores W x W moves "donor y gives one copy to receiver x" by their pairing and
keeps the best while it lowers the max GPU load (or, on a plateau, the spread of the GPU loads). The
climb runs compiled, starts, climbs and pairing of a row in one call, each move scored off the row's
sorted copies with only its two experts re-inserted, unless its lightest + heaviest copy already exceeds
the best move's peak; a start reaching a vector an earlier climb passed through takes its result (2 x 16
-> 32 slots: 0.02-0.18 ms against ~0.8 ms as NumPy batches); the torch search (joint.py), built for
the GPU, issues ~200 small tensor ops per round (measured ~1.3 ms a round there) and adds noisy LPT
candidates that the pairing makes moot. The climb's local optima are often not the optimum (2.3 % above
it on average on 10-16 experts), so a bounded branch and bound (pair_branch.py) then looks for a lower
peak from the winner's counts, and the better plan is placed.
"""

from __future__ import annotations

import numpy as np
import torch

from . import exact
from .jit import compiled
from .pair_branch import NODE_BUDGET, lower_counts

# Rows of at most this many slots take this path (a property of the shape: batches never change it).
# Measured against the torch search (4 candidates) on 2 x 16 -> 32 slots: 2-6x faster, max GPU load
# equal or lower on every load kind (mean -1.5 %); on 8 x 12..32 experts -> 24..64 slots 0.6 % lower
# on average, up to 6.6 % higher on single layers; beyond 32 slots it gains little time (20 -> 40: 15 %).
MAX_SLOTS = 32
# Greedy replication on the loads raised to these powers gives the starts (lower powers spread copies to
# mid-sized experts, which pairs better). Two starts and the branch and bound's steps they leave room for
# beat four starts at the same time (mean gap to the optimum 0.40 % against 0.53 %, 140 held-out layers).
START_EXPONENTS = (1.0, 0.5)
# Candidates the path stands in for (its starts, then the branch and bound); more ask for the torch search.
MAX_CANDIDATES = 4
# Receivers and donors tried per round (W x W moves) and the most rounds a row climbs.
MOVE_WIDTH = 6
MAX_ROUNDS = 32
SHARED_RECEIVERS = 2
# A move must lower the max GPU load by this relative amount (float noise never cycles).
MIN_GAIN = 1e-9
# Moves whose peaks differ by less than this relative amount count as equal when picking by spread.
PEAK_TIE = 1e-12


def applies(
    device: torch.device, num_experts: int, num_replicas: int, num_gpus: int, num_candidates: int, scenarios: bool
) -> bool:
    """Whether `pair_plan` serves these rows: on the CPU, without scenarios, two slots per GPU, few slots,
    a count table too large for `exact`, and at most MAX_CANDIDATES candidates asked for (more ask for
    the wider torch search)."""
    if device.type != "cpu" or scenarios or num_candidates > MAX_CANDIDATES:
        return False
    if num_replicas != 2 * num_gpus or num_replicas > MAX_SLOTS:
        return False
    return not exact.applies(num_experts, num_replicas, num_gpus)


def pair_plan(loads: torch.Tensor, num_replicas: int, num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """loads [P, E] float64 on the CPU -> (phy2log [P, R] int64, max GPU load [P] float64): `host_plan`."""
    phy2log, peak = host_plan(loads.numpy(), num_replicas, num_gpus)
    return torch.from_numpy(phy2log), torch.from_numpy(peak)


def host_plan(loads: np.ndarray, num_replicas: int, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """loads [P, E] float64 -> (phy2log [P, R] int64, max GPU load [P] float64).

    Each row climbs from every start of START_EXPONENTS until no move lowers its score; the lowest score
    wins (the earliest start among equals), placed heaviest copy with lightest. Deterministic, and a
    row's result does not depend on the other rows. The whole row runs compiled (`_plan_rows`).
    """
    rows = np.ascontiguousarray(loads, dtype=np.float64)
    width = min(MOVE_WIDTH, rows.shape[1])
    limits = np.array([width, min(SHARED_RECEIVERS, width - 1), MAX_ROUNDS, num_replicas], dtype=np.int64)
    phy2log = np.empty((rows.shape[0], num_replicas), dtype=np.int64)
    peak = np.empty(rows.shape[0], dtype=np.float64)
    exponents = np.array(START_EXPONENTS, dtype=np.float64)
    _plan_rows(rows, exponents, np.array([MIN_GAIN, PEAK_TIE]), limits, NODE_BUDGET, phy2log, peak)
    return phy2log, peak


@compiled()
def _plan_rows(loads, exponents, gains, limits, budget, phy2log, peak):
    """`host_plan` row by row: the greedy starts, their climbs, the winner, the branch and bound from it
    (pair_branch.py, `budget` steps) and the pairing of the better of the two."""
    num_rows, num_experts = loads.shape
    num_starts, num_replicas = exponents.shape[0], limits[3]
    counts = np.empty((num_starts, num_experts), dtype=np.int64)
    scores, copies = np.empty(num_starts), np.empty(num_replicas)
    identity = np.arange(num_experts)
    ranked_counts, lowered = np.empty(num_experts, dtype=np.int64), np.empty(num_experts, dtype=np.int64)
    placed = np.empty(num_replicas, dtype=np.int64)
    for row in range(num_rows):
        for start in range(num_starts):
            greedy_start(loads[row], exponents[start], num_replicas, counts[start])
        _climb(loads[row], counts, scores, gains, limits, copies)
        best = 0
        for start in range(1, num_starts):  # the first start among equal scores
            if scores[start] < scores[best]:
                best = start
        peak[row] = exact.place_pairs(loads[row], identity, counts[best], num_replicas // 2, phy2log[row])
        order = np.argsort(-loads[row], kind="mergesort")  # heaviest first, index order among equals
        ranked = loads[row][order]
        ranked_counts[:] = counts[best][order]
        if lower_counts(ranked, num_replicas, ranked_counts, peak[row], budget) < peak[row]:
            lowered[order] = ranked_counts
            # Placed by float32 copy loads, like the climb's plan: kept only if its exact peak is lower.
            lowered_peak = exact.place_pairs(loads[row], identity, lowered, num_replicas // 2, placed)
            if lowered_peak < peak[row]:
                peak[row], phy2log[row] = lowered_peak, placed


@compiled()
def greedy_start(load, exponent, num_replicas, counts):
    """Greedy replication on load ** exponent: one copy each, every extra copy to the largest load per
    copy (lowest index among equals), into counts [E]."""
    powered = load**exponent
    counts[:] = 1
    for _ in range(num_replicas - load.shape[0]):
        target = 0
        for expert in range(1, load.shape[0]):
            if powered[expert] / counts[expert] > powered[target] / counts[target]:
                target = expert
        counts[target] += 1


@compiled()
def _score(values, runs, skip_a, skip_b, value_a, run_a, value_b, run_b, copies):
    """(max GPU load, sum of squared GPU loads) of the pairing of the copies of `values` [E] (per-copy
    loads ascending, `runs` [E] copies each) with entries skip_a and skip_b replaced by (value_a, run_a)
    and (value_b, run_b): the lists merged in order, then the i-th lightest copy with the i-th heaviest.
    `copies` [R] is scratch."""
    slot, a_done, b_done = 0, run_a == 0, run_b == 0
    for entry in range(values.shape[0] + 1):
        value = values[entry] if entry < values.shape[0] else np.inf
        while (
            not (a_done and b_done)
            and min(value_a if not a_done else np.inf, value_b if not b_done else np.inf) <= value
        ):
            if not a_done and (b_done or value_a <= value_b):
                copies[slot : slot + run_a] = value_a
                slot, a_done = slot + run_a, True
            else:
                copies[slot : slot + run_b] = value_b
                slot, b_done = slot + run_b, True
        if entry < values.shape[0] and entry != skip_a and entry != skip_b:
            copies[slot : slot + runs[entry]] = value
            slot += runs[entry]
    num_replicas = copies.shape[0]
    peak, spread = -np.inf, 0.0
    for pair in range(num_replicas // 2):
        total = copies[pair] + copies[num_replicas - 1 - pair]
        peak, spread = max(peak, total), spread + total * total
    return peak, spread


@compiled()
def _sorted_copies(loads, counts, values, runs, experts):
    """Each expert's per-copy load, ascending (ties by expert), into values / runs / experts [E]: an
    insertion sort from the order `experts` holds (after one move, two entries out of place)."""
    for position in range(experts.shape[0]):
        expert = experts[position]
        value, at = loads[expert] / max(counts[expert], 1), position
        while at > 0 and (values[at - 1] > value or (values[at - 1] == value and experts[at - 1] > expert)):
            values[at], runs[at], experts[at] = values[at - 1], runs[at - 1], experts[at - 1]
            at -= 1
        values[at], runs[at], experts[at] = value, counts[expert], expert


@compiled()
def _top(keys, count, chosen):
    """The `count` largest keys' indices, largest first, lowest index among equals, into chosen[:count]."""
    for rank in range(count):
        best = -1
        for expert in range(keys.shape[0]):
            taken = False
            for earlier in range(rank):
                taken |= chosen[earlier] == expert
            if not taken and (best < 0 or keys[expert] > keys[best]):
                best = expert
        chosen[rank] = best


@compiled()
def _climb(load, counts, scores, gains, limits, copies):
    """Best-move hill climbing of one row from each start: load [E] float64, counts [X, E] (climbed in
    place) -> scores [X], the local optima's max GPU loads. Each round tries the W x W moves "donor y
    gives one copy to receiver x": receivers carry the heaviest copies (W - shared of them) or the
    heaviest among experts already copied (`shared`: a plateau, 2, 2 -> 3, 1 copies, can be crossed);
    donors lose the least load per copy giving one up. A move is better when it lowers the max GPU load,
    or keeps it and lowers the sum of squared GPU loads; a climb stops when none is. Moves are scored off
    the row's sorted copies with only the two changed experts re-inserted.

    A climb's path depends on its count vector only, so a start that reaches a vector an earlier start's
    finished climb passed through ends where that one did: it takes that result without climbing on
    (starts from equal greedy vectors, common on even loads, climb once)."""
    num_starts, num_experts = counts.shape
    width, shared, max_rounds = limits[0], limits[1], limits[2]
    min_gain, peak_tie = gains[0], gains[1]
    values, runs = np.empty(num_experts), np.empty(num_experts, dtype=np.int64)
    experts, where = np.empty(num_experts, dtype=np.int64), np.empty(num_experts, dtype=np.int64)
    receivers, donors = np.empty(width, dtype=np.int64), np.empty(width, dtype=np.int64)
    move_peak, move_spread = np.empty(width * width), np.empty(width * width)
    per_copy, keys = np.empty(num_experts), np.empty(num_experts)
    # Every vector a finished climb passed through, and the start that climbed it.
    path = np.empty((num_starts * (max_rounds + 1), num_experts), dtype=np.int64)
    path_start, path_length = np.empty(num_starts * (max_rounds + 1), dtype=np.int64), 0
    for start in range(num_starts):
        count, begin, merged = counts[start], path_length, -1
        experts[:] = np.arange(num_experts)
        _sorted_copies(load, count, values, runs, experts)
        peak, spread = _score(values, runs, -1, -1, 0.0, 0, 0.0, 0, copies)
        finished = False
        for _ in range(max_rounds):
            merged = _seen(path, begin, count)
            if merged >= 0:
                break
            path[path_length], path_start[path_length] = count, start
            path_length += 1
            for expert in range(num_experts):
                per_copy[expert] = load[expert] / count[expert]
                keys[expert] = per_copy[expert] if count[expert] > 1 else -np.inf
            _top(per_copy, width - shared, receivers)
            _top(keys, shared, receivers[width - shared :])
            for expert in range(num_experts):  # donors: the least load per copy lost giving one up
                keys[expert] = -load[expert] / (count[expert] - 1) if count[expert] > 1 else -np.inf
            _top(keys, width, donors)
            for position in range(num_experts):
                where[experts[position]] = position
            lowest = np.inf
            for move in range(width * width):
                x, y = receivers[move // width], donors[move % width]
                move_peak[move], move_spread[move] = np.inf, np.inf
                if count[y] > 1 and x != y:
                    value_x, value_y = load[x] / (count[x] + 1), load[y] / (count[y] - 1)
                    # The pairing's peak is at least lightest + heaviest copy: a move whose bound is
                    # above the lowest peak so far cannot be picked.
                    if _ends(values, where[x], where[y], value_x, value_y) > lowest * (1.0 + peak_tie):
                        continue
                    move_peak[move], move_spread[move] = _score(
                        values, runs, where[x], where[y], value_x, count[x] + 1, value_y, count[y] - 1, copies
                    )
                elif count[y] > 1:
                    move_peak[move], move_spread[move] = peak, spread
                lowest = min(lowest, move_peak[move])
            pick = -1
            for move in range(width * width):  # among (almost) the lowest peaks the lowest spread, first
                if move_peak[move] <= lowest * (1.0 + peak_tie) and (pick < 0 or move_spread[move] < move_spread[pick]):
                    pick = move
            new_peak, new_spread = move_peak[pick], move_spread[pick]
            if not (
                new_peak < peak * (1.0 - min_gain) or (new_peak <= peak and new_spread < spread * (1.0 - min_gain))
            ):
                finished = True
                break
            count[receivers[pick // width]] += 1
            count[donors[pick % width]] -= 1
            peak, spread = new_peak, new_spread
            _sorted_copies(load, count, values, runs, experts)
        if merged >= 0:
            counts[start], peak = counts[path_start[merged]], scores[path_start[merged]]
        if merged < 0 and not finished:  # stopped by the round limit: a later climb may not end here
            path_length = begin
        scores[start] = peak


@compiled()
def _ends(values, skip_a, skip_b, value_a, value_b):
    """Lightest + heaviest copy once entries skip_a and skip_b of `values` [E] (ascending) take value_a
    and value_b: the first pair `_score` adds, so never above its peak."""
    low, high = min(value_a, value_b), max(value_a, value_b)
    for entry in range(values.shape[0]):
        if entry != skip_a and entry != skip_b:
            low = min(low, values[entry])
            break
    for entry in range(values.shape[0] - 1, -1, -1):
        if entry != skip_a and entry != skip_b:
            high = max(high, values[entry])
            break
    return low + high


@compiled()
def _seen(path, end, count):
    """The entry of path[:end] equal to count [E], else -1."""
    for entry in range(end):
        equal = True
        for expert in range(count.shape[0]):
            if path[entry, expert] != count[expert]:
                equal = False
                break
        if equal:
            return entry
    return -1


def pair_scores(loads: np.ndarray, counts: np.ndarray, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """GPU loads of each count vector under the optimal pairing: loads [N, E] float64, counts [N, E]
    (each >= 1, summing to 2 G) -> (max GPU load [N], sum of squared GPU loads [N]), float64."""
    peak, spread = np.empty(len(counts)), np.empty(len(counts))
    _pair_scores(np.ascontiguousarray(loads, dtype=np.float64), np.ascontiguousarray(counts), peak, spread, num_gpus)
    return peak, spread


@compiled()
def _pair_scores(loads, counts, peak, spread, num_gpus):
    num_experts = loads.shape[1]
    values, runs = np.empty(num_experts), np.empty(num_experts, dtype=np.int64)
    experts, copies = np.empty(num_experts, dtype=np.int64), np.empty(2 * num_gpus)
    for row in range(loads.shape[0]):
        experts[:] = np.arange(num_experts)
        _sorted_copies(loads[row], counts[row], values, runs, experts)
        peak[row], spread[row] = _score(values, runs, -1, -1, 0.0, 0, 0.0, 0, copies)
