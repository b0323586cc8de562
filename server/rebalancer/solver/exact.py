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

from .replication import slots_from_counts

# Largest count-vector table scored per layer (vectors x slots): bounds memory at P x this x 16 bytes.
MAX_TABLE = 1 << 17
# Count vectors of lowest bound a row scores first on the CPU; the vectors whose bound is below the best
# of those are scored next (8 experts on 16 slots: 1-800 of the 6435, ~150 on zipf, log-normal and hot
# layers). The relative margin on that bound covers its float32 rounding.
FIRST_STAGE = 16
BOUND_MARGIN = 1e-5


def num_count_vectors(num_experts: int, num_replicas: int) -> int:
    """How many ways R slots give every one of E experts at least one copy: C(R - 1, E - 1)."""
    return math.comb(num_replicas - 1, num_experts - 1)


def applies(num_experts: int, num_replicas: int, num_gpus: int) -> bool:
    """Whether `pair_optimum` solves this shape: two slots per GPU and a small enough table."""
    if num_replicas != 2 * num_gpus:
        return False
    return num_count_vectors(num_experts, num_replicas) * num_replicas <= MAX_TABLE


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
    count vector (lowest index among equals, so a row's result does not depend on its batch). On a GPU
    every row scores the whole table at once; on the CPU `_host_optimum` scores only the vectors whose
    bound can still beat the best found, in NumPy (the same result).
    """
    if loads.device.type == "cpu":
        phy2log, peak = _host_optimum(loads.numpy(), num_replicas, num_gpus)
        return torch.from_numpy(phy2log), torch.from_numpy(peak)
    counts = count_vectors(loads.shape[1], num_replicas, loads.device)  # [K, E]
    whole_table = torch.arange(counts.shape[0], device=loads.device).unsqueeze(0)  # [1, K]
    return _score(loads, counts, whole_table, num_gpus)[:2]


@functools.cache
def _host_tables(num_experts: int, num_replicas: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The count table as NumPy arrays: counts [K, E] int64 and float32, 1 / count experts first [E, K]
    float32, and the expert of each slot [K, R] int64 (experts in order)."""
    counts = _count_table(num_experts, num_replicas).numpy()
    counts32 = counts.astype(np.float32)
    reciprocals = np.ascontiguousarray((1.0 / counts32).T)
    slot_experts = slots_from_counts(torch.from_numpy(counts), num_replicas).numpy()
    return counts, counts32, reciprocals, slot_experts


def _host_optimum(loads: np.ndarray, num_replicas: int, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """`pair_optimum` on the CPU: loads [P, E] float64 -> (phy2log [P, R] int64, max GPU load [P] float64).

    A vector's score (its max pair load) is at least its bound, largest + smallest copy, so once the
    FIRST_STAGE vectors of lowest bound give a row a score V, only the vectors of bound up to V can
    win: those are scored (the best of the first stage among them), the rest of the table never is
    (32 x 8 -> 16 slots: ~150 of 6435 vectors per row). Scores are float32, as on the GPU, the winner's
    peak recomputed exactly.
    """
    counts, counts32, reciprocals, slot_experts = _host_tables(loads.shape[1], num_replicas)
    num_rows, num_vectors = loads.shape[0], counts.shape[0]
    loads32 = loads.astype(np.float32)
    if num_vectors <= 2 * FIRST_STAGE:
        rows, picked = np.divmod(np.arange(num_rows * num_vectors), num_vectors)
    else:
        largest = loads32[:, :1] * reciprocals[0]  # [P, K]
        smallest = largest.copy()
        for expert in range(1, loads.shape[1]):  # elementwise over [P, K]: no [P, E, K] temporary
            per_copy = loads32[:, expert : expert + 1] * reciprocals[expert]
            np.maximum(largest, per_copy, out=largest)
            np.minimum(smallest, per_copy, out=smallest)
        bound = largest + smallest
        first = np.argpartition(bound, FIRST_STAGE, axis=1)[:, :FIRST_STAGE].ravel()
        first_rows = np.repeat(np.arange(num_rows), FIRST_STAGE)
        first_scores = _host_scores(loads32, counts32, slot_experts, first_rows, first, num_gpus)
        best_first = first_scores.reshape(num_rows, FIRST_STAGE).min(1)
        # Reciprocal products may round 1 ulp away from the divisions the scoring does: the margin covers it.
        rows, picked = np.nonzero(bound <= best_first[:, None] * (1.0 + BOUND_MARGIN))
    scores = _host_scores(loads32, counts32, slot_experts, rows, picked, num_gpus)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # rows come grouped, each at least once
    best = np.minimum.reduceat(scores, starts)
    winner = np.minimum.reduceat(np.where(scores == best[rows], picked, num_vectors), starts)  # lowest index
    return _host_placement(loads, counts, slot_experts, winner, num_gpus)


def _host_scores(
    loads32: np.ndarray,
    counts32: np.ndarray,
    slot_experts: np.ndarray,
    rows: np.ndarray,
    picked: np.ndarray,
    num_gpus: int,
) -> np.ndarray:
    """Max pair load (heaviest with lightest copy, float32) of count vector picked[n] on row rows[n]: [N]."""
    per_copy = loads32[rows] / counts32[picked]  # [N, E]
    copy_loads = np.sort(np.take_along_axis(per_copy, slot_experts[picked], 1), axis=1)  # [N, R] ascending
    return (copy_loads[:, :num_gpus] + copy_loads[:, num_gpus:][:, ::-1]).max(1)


def _host_placement(
    loads: np.ndarray, counts: np.ndarray, slot_experts: np.ndarray, winner: np.ndarray, num_gpus: int
) -> tuple[np.ndarray, np.ndarray]:
    """The placement of count vector winner[p] on row p, GPU g holding the g-th heaviest and the g-th
    lightest copy (slot order among equal copies) -> (phy2log [P, R], exact max GPU load [P])."""
    num_rows = winner.shape[0]
    experts = slot_experts[winner]  # [P, R]
    copy32 = np.take_along_axis(loads.astype(np.float32) / counts[winner].astype(np.float32), experts, 1)
    order = np.argsort(-copy32, axis=1, kind="stable")  # heaviest first, slot order among equals
    by_gpu = np.stack([order[:, :num_gpus], order[:, num_gpus:][:, ::-1]], 2).reshape(num_rows, -1)
    phy2log = np.take_along_axis(experts, by_gpu, 1)
    per_copy = loads / counts[winner]  # [P, E] float64
    peak = np.take_along_axis(per_copy, phy2log, 1).reshape(num_rows, num_gpus, 2).sum(-1).max(-1)
    return phy2log, peak


def _score(
    loads: torch.Tensor, counts: torch.Tensor, picked: torch.Tensor, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best of the `picked` count vectors ([P, J] or [1, J] for every row: indices into counts
    [K, E]) per row, scored by the max pair load of heaviest-with-lightest in float32 -> (phy2log [P, R],
    exact max GPU load [P] float64, winning float32 score [P]). Among equal scores the lowest index wins."""
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
    # Lowest table index among the equal best (a shortlist is in bound order, not index order).
    tie_key = torch.where(pair_peaks == best_score, picked, counts.shape[0])
    best = tie_key.argmin(1, keepdim=True)  # [P, 1]
    chosen = order.gather(1, best.unsqueeze(2).expand(-1, 1, num_replicas)).squeeze(1)  # [P, R] slot ids
    by_gpu = torch.stack([chosen[:, :num_gpus], chosen[:, num_gpus:].flip(1)], 2).view(num_rows, num_replicas)
    phy2log = experts.gather(1, best.unsqueeze(2).expand(-1, 1, num_replicas)).squeeze(1).gather(1, by_gpu)
    best_counts = counts[picked.expand(num_rows, -1).gather(1, best).squeeze(1)]  # [P, E]
    exact = (loads / best_counts.to(loads.dtype)).gather(1, phy2log)
    peak = exact.view(num_rows, num_gpus, 2).sum(-1).max(-1).values
    return phy2log, peak, best_score.squeeze(1)
