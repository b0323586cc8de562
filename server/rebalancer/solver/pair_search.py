"""Two slots per GPU on small layers, on the CPU: a climb over copy counts, each count vector scored
exactly by its optimal packing.

With two slots per GPU, pairing the i-th heaviest copy with the i-th lightest is the best packing of
given copies (exact.py), so the problem is the choice of copies per expert. Where the count vectors are
too many to score all (16 experts on 32 slots: 3e8), this module climbs from several greedy count
vectors: each round scores W x W moves "donor y gives one copy to receiver x" by their pairing and
keeps the best while it lowers the max GPU load (or, on a plateau, the spread of the GPU loads). Every
row and start runs as one NumPy batch, a round being a few dozen NumPy calls on [rows, W^2, R]; the
torch search (joint.py), built for the GPU, issues ~200 small tensor ops per round (measured ~1.3 ms
a round on 2 x 16 -> 32 slots) and adds noisy LPT candidates that the pairing makes moot.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import exact

# Rows of at most this many slots take this path (a property of the shape: batches never change it).
# Measured against the torch search (4 candidates) on 2 x 16 -> 32 slots: 2-6x faster, max GPU load
# equal or lower on every load kind (mean -1.5 %); on 8 x 12..32 experts -> 24..64 slots 0.6 % lower
# on average, up to 6.6 % higher on single layers; beyond 32 slots it gains little time (20 -> 40: 15 %).
MAX_SLOTS = 32
# Greedy replication on the loads raised to these powers gives the starts (lower powers spread copies to
# mid-sized experts, which pairs better).
START_EXPONENTS = (1.0, 0.75, 0.5, 0.25)
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
    a count table too large for `exact`, and no more candidates asked for than it has starts (more ask
    for the wider torch search)."""
    if device.type != "cpu" or scenarios or num_candidates > len(START_EXPONENTS):
        return False
    if num_replicas != 2 * num_gpus or num_replicas > MAX_SLOTS:
        return False
    return not exact.applies(num_experts, num_replicas, num_gpus)


def pair_plan(loads: torch.Tensor, num_replicas: int, num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """loads [P, E] float64 on the CPU -> (phy2log [P, R] int64, max GPU load [P] float64).

    Each row climbs from every start of START_EXPONENTS until no move lowers its score; the lowest score
    wins (the earliest start among equals), placed heaviest copy with lightest. Deterministic, and a
    row's result does not depend on the other rows.
    """
    weights = loads.numpy()
    num_rows, num_experts = weights.shape
    num_starts = len(START_EXPONENTS)
    starts = exact.greedy_counts(weights, num_replicas, START_EXPONENTS)  # [P, X, E]
    counts = starts.reshape(num_rows * num_starts, num_experts)
    row_loads = np.repeat(weights, num_starts, 0)  # [P * X, E]
    counts, (scores, _) = _climb(row_loads, counts, pair_scores(row_loads, counts, num_gpus), num_gpus, MOVE_WIDTH)
    best = scores.reshape(num_rows, num_starts).argmin(1)  # first start among equal scores
    chosen = counts.reshape(num_rows, num_starts, num_experts)[np.arange(num_rows), best]  # [P, E]
    phy2log, peak = exact.pair_placement(weights, chosen, num_gpus)
    return torch.from_numpy(phy2log), torch.from_numpy(peak)


def _climb(
    loads: np.ndarray, counts: np.ndarray, scores: tuple[np.ndarray, np.ndarray], num_gpus: int, width: int
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Best-move hill climbing: loads [N, E] float64, counts [N, E], their `pair_scores` -> (local optima
    [N, E], their scores). A move is better when it lowers the max GPU load, or keeps it and lowers the
    sum of squared GPU loads (a plateau, e.g. equal loads where several copies must move before the
    peak falls). Rows leave once no move is better; a round costs O(N W^2 R)."""
    num_rows, num_experts = counts.shape
    width = min(width, num_experts)
    counts, (peak, spread) = counts.copy(), (scores[0].copy(), scores[1].copy())
    active = np.arange(num_rows)
    # (max load, spread) falls lexicographically every round and the count vectors are finite, so this
    # ends; the bound on rounds is a safeguard only.
    for _ in range(MAX_ROUNDS):
        if active.size == 0:
            break
        trial, valid = _moved(loads[active], counts[active], width)  # [A, W * W, E], [A, W * W]
        trial_peak, trial_spread = pair_scores(
            np.repeat(loads[active], trial.shape[1], 0), trial.reshape(-1, num_experts), num_gpus
        )
        trial_peak = np.where(valid, trial_peak.reshape(len(active), -1), np.inf)
        lowest = trial_peak.min(1, keepdims=True)
        # Among the moves of (almost) the lowest peak, the lowest spread; the first among equals.
        pick = np.where(trial_peak <= lowest * (1.0 + PEAK_TIE), trial_spread.reshape(len(active), -1), np.inf).argmin(
            1
        )
        rows = np.arange(len(active))
        new_peak, new_spread = trial_peak[rows, pick], trial_spread.reshape(len(active), -1)[rows, pick]
        old_peak, old_spread = peak[active], spread[active]
        better = (new_peak < old_peak * (1.0 - MIN_GAIN)) | (
            (new_peak <= old_peak) & (new_spread < old_spread * (1.0 - MIN_GAIN))
        )
        improved = active[better]
        counts[improved] = trial[better, pick[better]]
        peak[improved], spread[improved] = new_peak[better], new_spread[better]
        active = improved
    return counts, (peak, spread)


def _moved(loads: np.ndarray, counts: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The W x W moves "donor y gives one copy to receiver x" of each row: receivers have the largest
    loads per copy, donors the smallest load per copy after giving one up. loads, counts [A, E] ->
    (trial counts [A, W * W, E], valid [A, W * W]: the donor has a copy to spare; x == y moves nothing)."""
    num_experts = counts.shape[1]
    per_copy = loads / counts
    # Most receivers carry the heaviest copies; a few are the heaviest among experts already copied, so
    # a plateau (equal loads: 2, 2 -> 3, 1 copies) can be crossed.
    shared = min(SHARED_RECEIVERS, width - 1)
    heaviest = np.argpartition(-per_copy, width - shared - 1, axis=1)[:, : width - shared]
    copied = np.argpartition(-np.where(counts > 1, per_copy, -np.inf), shared - 1, axis=1)[:, :shared]
    receivers = np.concatenate([heaviest, copied], 1)  # [A, W]
    giving = np.where(counts > 1, loads / np.maximum(counts - 1, 1), np.inf)
    donors = np.argpartition(giving, width - 1, axis=1)[:, :width]
    moves = (receivers[:, :, None] * num_experts + donors[:, None, :]).reshape(len(counts), -1)  # [A, W * W]
    spare = counts[np.arange(len(counts))[:, None], donors] > 1  # [A, W], move r * W + d has donor d
    return counts[:, None, :] + _move_deltas(num_experts)[moves], np.tile(spare, (1, width))


@functools.cache
def _move_deltas(num_experts: int) -> np.ndarray:
    """Count changes of the move x * E + y, "y gives one copy to x": [E * E, E] (+1 at x, -1 at y; zero
    when x == y)."""
    identity = np.eye(num_experts, dtype=np.int64)
    return (identity[:, None, :] - identity[None, :, :]).reshape(num_experts * num_experts, num_experts)


def pair_scores(loads: np.ndarray, counts: np.ndarray, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """GPU loads of each count vector under the optimal pairing: loads [N, E] float64, counts [N, E]
    (each >= 0, summing to 2 G; an expert without copies is left out) -> (max GPU load [N], sum of
    squared GPU loads [N]), float64."""
    per_copy = loads / np.maximum(counts, 1)
    ordered = np.sort(np.repeat(per_copy.ravel(), counts.ravel()).reshape(len(counts), 2 * num_gpus), axis=1)
    # GPU-major [G, N]: reductions over the first axis run across rows at once (a short last axis is
    # reduced row by row, 4x slower on [288, 16]).
    pairs = np.ascontiguousarray((ordered[:, :num_gpus] + ordered[:, num_gpus:][:, ::-1]).T)
    return pairs.max(0), np.einsum("gn,gn->n", pairs, pairs)
