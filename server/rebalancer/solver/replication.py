"""How many copies each expert gets.

Greedy replication (each extra slot to the expert with the highest load per copy) picks, one by one,
the largest of the marginal shares w_e / k; since each expert's shares fall with k, the result is the
top R - E values of the table {w_e / k : k = 1 .. R - E}. One `topk` replaces the R - E sequential steps.
Only the R - E heaviest experts can take an extra copy (the R - E heavier ones' first shares come
before any lighter expert's), so the table is built for them alone when E > R - E: 8x smaller on
256 experts with 32 extra slots.
"""

from __future__ import annotations

import torch


def replica_counts(loads: torch.Tensor, num_replicas: int) -> torch.Tensor:
    """loads [..., E] -> copies per expert [..., E] (int64, each >= 1, summing to num_replicas).

    Minimises the largest load per copy (the replication lower bound of the max GPU load).
    """
    num_experts = loads.shape[-1]
    extra = num_replicas - num_experts
    counts = torch.ones(loads.shape, dtype=torch.int64, device=loads.device)
    if extra == 0:
        return counts
    k = torch.arange(1, extra + 1, device=loads.device, dtype=loads.dtype)
    takers = None
    if extra < num_experts:
        heaviest, takers = loads.topk(extra, dim=-1)  # [..., extra]
        loads = heaviest
    shares = (loads.unsqueeze(-1) / k).flatten(-2)  # [..., T * extra], T takers
    chosen = shares.topk(extra, dim=-1, sorted=False).indices // extra
    if takers is not None:
        chosen = takers.gather(-1, chosen)
    return counts.scatter_add_(-1, chosen, torch.ones_like(chosen))


def slots_from_counts(counts: torch.Tensor, num_replicas: int) -> torch.Tensor:
    """copies per expert [..., E] -> the expert of each physical item [..., R], experts in order."""
    flat = counts.reshape(-1, counts.shape[-1])
    ends = flat.cumsum(-1)
    positions = torch.arange(num_replicas, device=counts.device).expand(flat.shape[0], -1).contiguous()
    experts = torch.searchsorted(ends, positions, right=True)
    return experts.view(*counts.shape[:-1], num_replicas)
