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
    """
    num_rows, num_experts = loads.shape
    counts = count_vectors(num_experts, num_replicas, loads.device)  # [K, E]
    experts = slots_from_counts(counts, num_replicas)  # [K, R]
    # Scored in float32 (the sort is the cost; rows are scaled to a max load of 1 by the API), the
    # winner's peak then recomputed exactly.
    per_copy = loads.to(torch.float32).unsqueeze(1) / counts.to(torch.float32)  # [P, K, E]
    copy_loads = per_copy.gather(2, experts.expand(num_rows, -1, -1))  # [P, K, R]
    ordered, order = copy_loads.sort(dim=2, descending=True, stable=True)
    pair_loads = ordered[..., :num_gpus] + ordered[..., num_gpus:].flip(2)  # [P, K, G]
    best = pair_loads.max(2).values.argmin(1)
    chosen = order.gather(1, best.view(-1, 1, 1).expand(-1, 1, num_replicas)).squeeze(1)  # [P, R] slot ids
    by_gpu = torch.stack([chosen[:, :num_gpus], chosen[:, num_gpus:].flip(1)], 2).view(num_rows, num_replicas)
    phy2log = experts[best].gather(1, by_gpu)
    exact = (loads / counts[best].to(loads.dtype)).gather(1, phy2log)
    return phy2log, exact.view(num_rows, num_gpus, 2).sum(-1).max(-1).values
