"""How many copies each expert gets.

Greedy replication (each extra slot to the expert with the highest load per copy) picks, one by one,
the largest of the marginal shares w_e / k; since each expert's shares fall with k, the result is the
top R - E values of the table {w_e / k : k >= 1}. One `topk` replaces the R - E sequential steps.
Two tables bound it. The harmonic table: the expert of rank r (heaviest first, from 1) takes at most
(R - E) / r extra copies, since the r - 1 heavier ones take at least as many, so the table holds
(R - E) / r shares of it, about (R - E) ln(R - E) in all (DeepSeek-V3 on 64 GPUs: 280 shares a row
instead of the 4,096 of the square table, 4x faster). The pruned table: the smallest share taken is at
least total / R, so expert e takes at most floor(w_e R / total) extra copies, fewer than R + 2E shares a
row whatever the loads; it is used where the harmonic one would cost more (many copies of few experts).
"""

from __future__ import annotations

import functools

import torch

# The harmonic table is used while it has at most this many times the pruned table's shares: a pruned
# share costs about two harmonic ones (scatter, cumsum and gathers against a gather and the top-k of the
# takers; measured on the CPU on 4096 experts -> 8192 slots, 64 -> 1024 and 256 -> 512).
PRUNED_COST_RATIO = 2
# Harmonic tables up to this many shares (1 MiB of indices) are cached, 64 of them at most: the cache
# stays bounded whatever shapes clients send.
CACHED_TABLE_SHARES = 2**16


def replica_counts(loads: torch.Tensor, num_replicas: int) -> torch.Tensor:
    """loads [..., E] -> copies per expert [..., E] (int64, each >= 1, summing to num_replicas).

    Minimises the largest load per copy (the replication lower bound of the max GPU load).
    """
    num_experts = loads.shape[-1]
    extra = num_replicas - num_experts
    if extra == 0:
        return torch.ones(loads.shape, dtype=torch.int64, device=loads.device)
    if _harmonic_shares(num_experts, num_replicas) <= table_cost(num_experts, num_replicas):
        return _harmonic_counts(loads, num_replicas)
    return _pruned_counts(loads, num_replicas)


def table_cost(num_experts: int, num_replicas: int) -> int:
    """The cost of one row's replication table, in harmonic-table shares: the cheaper of the two tables
    (the admission model of the service charges it)."""
    harmonic = _harmonic_shares(num_experts, num_replicas)
    return min(harmonic, PRUNED_COST_RATIO * (num_replicas + 2 * num_experts))


def _harmonic_shares(num_experts: int, num_replicas: int) -> int:
    """sum over ranks r = 1 .. min(E, R - E) of floor((R - E) / r), in O(sqrt(R - E)) steps (equal
    quotients in runs), since the admission model asks it on the event loop."""
    extra, total, rank = num_replicas - num_experts, 0, 1
    last_rank = min(num_experts, extra)
    while rank <= last_rank:
        quotient = extra // rank
        run_end = min(last_rank, extra // quotient)
        total += quotient * (run_end - rank + 1)
        rank = run_end + 1
    return total


def _harmonic_table(takers: int, extra: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(rank [H], k [H] in `dtype`) of the harmonic table's shares: rank r (from 0) holds k = 1 .. extra // (r + 1).
    Small tables are kept (`_cached_table`): building one costs as much as the rest of a small layer's replication
    (8 experts -> 16 slots, 128 rows: 73 us built, 46 us cached)."""
    if _harmonic_shares(takers, takers + extra) <= CACHED_TABLE_SHARES:
        return _cached_table(takers, extra, device, dtype)
    return _built_table(takers, extra, device, dtype)


def _built_table(takers: int, extra: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    per_rank = extra // torch.arange(1, takers + 1, device=device)
    rank = torch.repeat_interleave(torch.arange(takers, device=device), per_rank)
    starts = per_rank.cumsum(0) - per_rank
    return rank, (torch.arange(rank.numel(), device=device) - starts[rank] + 1).to(dtype)


_cached_table = functools.lru_cache(maxsize=64)(_built_table)


def _harmonic_counts(loads: torch.Tensor, num_replicas: int) -> torch.Tensor:
    """The harmonic table of the heaviest experts' shares (ties as topk leaves them)."""
    num_experts = loads.shape[-1]
    extra = num_replicas - num_experts
    heaviest, takers = loads.topk(min(extra, num_experts), dim=-1)  # [..., T], heaviest first
    rank, k = _harmonic_table(takers.shape[-1], extra, loads.device, loads.dtype)
    shares = heaviest[..., rank] / k  # [..., H]
    chosen = takers.gather(-1, rank[shares.topk(extra, dim=-1, sorted=False).indices])
    counts = torch.ones(loads.shape, dtype=torch.int64, device=loads.device)
    return counts.scatter_add_(-1, chosen, torch.ones_like(chosen))


def _pruned_counts(loads: torch.Tensor, num_replicas: int) -> torch.Tensor:
    """The table of each expert's possible shares only; ties go to the lowest experts."""
    num_experts = loads.shape[-1]
    extra = num_replicas - num_experts
    flat = loads.reshape(-1, num_experts)
    total = flat.sum(-1, keepdim=True)
    # Shares per expert: the floor plus one keeps every share at the bound despite rounding; a row of
    # zero loads takes equal shares.
    scaled = torch.where(total > 0, flat * num_replicas / total.clamp_min(1e-300), num_replicas / num_experts)
    takes = (scaled.floor().to(torch.int64) + 1).clamp(max=extra)
    ends = takes.cumsum(-1)
    # At most R + E shares, and one more per expert where rounding lifts a floor.
    width = num_replicas + 2 * num_experts
    # The expert of each share: how many experts' shares end at or before it (E past the last share).
    ended = torch.zeros(flat.shape[0], width + 1, dtype=torch.int64, device=loads.device)
    expert = ended.scatter_add_(1, ends.clamp(max=width), torch.ones_like(ends)).cumsum(-1)[:, :width]
    held = expert < num_experts
    expert = expert.clamp(max=num_experts - 1)
    k = torch.arange(width, device=loads.device) - (ends - takes).gather(1, expert) + 1
    shares = torch.where(held, flat.gather(1, expert) / k.to(flat.dtype), -torch.inf)
    # Shares equal to the smallest one taken go to the lowest experts (the table is in expert order),
    # the same on every device, as topk leaves ties to the backend.
    smallest = shares.topk(extra, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = shares > smallest
    tied = shares == smallest
    taken = above | (tied & (tied.cumsum(-1) <= extra - above.sum(-1, keepdim=True)))
    added = torch.zeros_like(flat, dtype=torch.int64).scatter_add_(-1, expert, taken.to(torch.int64))
    return (added + 1).view(loads.shape)


def slots_from_counts(counts: torch.Tensor, num_replicas: int) -> torch.Tensor:
    """copies per expert [..., E] (each row summing to R) -> the expert of each physical item [..., R],
    experts in order. One repeat over all rows, its size given, so a GPU never syncs (4-7x faster on the
    CPU than a search of every slot in the cumulative counts)."""
    flat = counts.reshape(-1, counts.shape[-1])
    experts = torch.arange(flat.shape[1], device=counts.device).expand_as(flat).reshape(-1)
    repeated = torch.repeat_interleave(experts, flat.reshape(-1), output_size=flat.shape[0] * num_replicas)
    return repeated.view(*counts.shape[:-1], num_replicas)
