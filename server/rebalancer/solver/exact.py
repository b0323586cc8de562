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

import torch

from .replication import slots_from_counts

# Largest count-vector table scored per layer (vectors x slots): bounds memory at P x this x 16 bytes.
MAX_TABLE = 1 << 17
# Count vectors a row scores first on the CPU, lowest bound first: 1/16 of the table, at least 48
# (8 experts on 16 slots: the optimum beats the bound of all but 30-275 of the 6435 vectors, measured
# on zipf, log-normal and hot layers); and the relative margin by which the shortlist's winner must
# beat the bound of the rest (float32 rounding of the bound).
SHORTLIST_SHARE, MIN_SHORTLIST = 16, 48
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
    count vector (lowest index among equals, so a row's result does not depend on its batch).
    On the CPU, where scoring the whole table is the cost (32 x 8 -> 16: ~0.1-0.2 s), each row scores
    first the shortlist of its vectors of lowest bound (largest + smallest copy) and keeps that winner when
    it beats the bound of every vector left out: the same result; the other rows score the table.
    """
    counts = count_vectors(loads.shape[1], num_replicas, loads.device)  # [K, E]
    whole_table = torch.arange(counts.shape[0], device=loads.device).unsqueeze(0)  # [1, K]
    shortlist_size = max(MIN_SHORTLIST, counts.shape[0] // SHORTLIST_SHARE)
    if loads.device.type != "cpu" or counts.shape[0] <= 2 * shortlist_size:
        return _score(loads, counts, whole_table, num_gpus)[:2]
    # Reciprocal products may round 1 ulp away from the divisions the scoring does: the margin covers it.
    # Experts on the middle axis: reducing over it is elementwise work over K (5-10x faster than over a
    # last axis of E = 8).
    per_copy = loads.to(torch.float32).unsqueeze(2) * _reciprocals(loads.shape[1], num_replicas)  # [P, E, K]
    bound = per_copy.amax(1) + per_copy.amin(1)  # [P, K]: the pair holding the largest copy
    shortlist_bound, shortlist = bound.topk(shortlist_size + 1, dim=1, largest=False)
    phy2log, peak, best_score = _score(loads, counts, shortlist[:, :shortlist_size], num_gpus)
    proven = best_score < shortlist_bound[:, shortlist_size] * (1.0 - BOUND_MARGIN)
    if bool(proven.all()):
        return phy2log, peak
    rows = (~proven).nonzero().squeeze(1)
    phy2log[rows], peak[rows], _ = _score(loads[rows], counts, whole_table, num_gpus)
    return phy2log, peak


@functools.cache
def _reciprocals(num_experts: int, num_replicas: int) -> torch.Tensor:
    """1 / count for every count vector, experts first: [E, K] float32."""
    return (1.0 / _count_table(num_experts, num_replicas).to(torch.float32)).t().contiguous()


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
