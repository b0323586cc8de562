"""The published DeepSeek EPLB algorithm, bit for bit, vectorised across layers.

It is the baseline every benchmark compares against and a fallback candidate of `policy="auto"`:
greedy LPT packing with a capacity per pack, replication of the expert with the highest load per copy,
and the hierarchical scheme (groups -> nodes, replicate within a node, copies -> GPUs). The loops over
items and replicas remain (the algorithm is sequential), but every step runs for all layers at once;
loads accumulate in float32 like the published code (its pack sums are 0-d float32 tensors), and ties go
to the lowest-indexed pack, as the published `min` over its pack list does.
"""

from __future__ import annotations

import torch

from .cancel import checkpoint


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy LPT: items in descending load go to the lightest pack that still has room.

    weight [L, N] -> (pack_index [L, N], rank_in_pack [L, N]), N divisible by num_packs.
    """
    num_layers, num_items = weight.shape
    capacity = num_items // num_packs
    device = weight.device
    if capacity == 1:
        index = torch.arange(num_items, dtype=torch.int64, device=device).expand(num_layers, num_items)
        return index.clone(), torch.zeros_like(index)
    order = weight.float().cpu().sort(-1, descending=True).indices.to(device)
    loads_by_item = weight.float()
    pack_index = torch.full((num_layers, num_items), -1, dtype=torch.int64, device=device)
    rank_in_pack = torch.full_like(pack_index, -1)
    pack_loads = torch.zeros(num_layers, num_packs, dtype=torch.float32, device=device)
    pack_counts = torch.zeros(num_layers, num_packs, dtype=torch.int64, device=device)
    rows = torch.arange(num_layers, device=device)
    full = torch.tensor(float("inf"), dtype=torch.float32, device=device)
    for step in range(num_items):
        checkpoint()
        item = order[:, step]
        pack = torch.where(pack_counts < capacity, pack_loads, full).argmin(-1)
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_counts[rows, pack]
        pack_loads[rows, pack] += loads_by_item[rows, item]
        pack_counts[rows, pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_physical: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each extra slot goes to the expert with the highest load per copy (first index on ties).

    weight [L, E] -> (phy2log [L, R], rank [L, R], logcnt [L, E]).
    """
    num_layers, num_logical = weight.shape
    device = weight.device
    phy2log = torch.arange(num_physical, dtype=torch.int64, device=device).repeat(num_layers, 1)
    rank = torch.zeros(num_layers, num_physical, dtype=torch.int64, device=device)
    logcnt = torch.ones(num_layers, num_logical, dtype=torch.int64, device=device)
    rows = torch.arange(num_layers, device=device)
    for slot in range(num_logical, num_physical):
        checkpoint()
        best = (weight / logcnt).max(dim=-1).indices
        phy2log[:, slot] = best
        rank[:, slot] = logcnt[rows, best]
        logcnt[rows, best] += 1
    return phy2log, rank, logcnt


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """[L, N] permutation -> its inverse."""
    inverse = torch.empty_like(perm)
    positions = torch.arange(perm.size(1), dtype=torch.int64, device=perm.device)
    inverse.scatter_(1, perm, positions.expand(perm.shape))
    return inverse


def rebalance_hierarchical(
    weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups -> nodes, replication within each node, copies -> GPUs of the node.

    weight [L, E] float32 -> (phy2log [L, R], phy_rank [L, R], logcnt [L, E]).
    """
    num_layers, num_logical = weight.shape
    device = weight.device
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_physical // num_gpus

    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
        + torch.arange(group_size, dtype=torch.int64, device=device)
    ).flatten(-2)
    mlog2log = inverse_permutation(log2mlog)

    mlog_load = weight.gather(-1, mlog2log).view(-1, num_logical // num_nodes)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, num_physical // num_nodes)

    phy_load = (mlog_load / mlogcnt).gather(-1, phy2mlog)
    pack, rank = balanced_packing(phy_load, num_gpus // num_nodes)
    phy2pphy = pack * slots_per_gpu + rank
    pphy2phy = inverse_permutation(phy2pphy)

    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    node_offset = torch.arange(0, num_logical, num_logical // num_nodes, device=device).view(1, -1, 1)
    pphy2mlog = (pphy2mlog.view(num_layers, num_nodes, -1) + node_offset).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphy_rank = phy_rank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return pphy2log, pphy_rank, logcnt


def rebalance_deepseek(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The published entry point's choice: hierarchical when groups divide over nodes, else global.

    weight [L, E] -> (phy2log [L, R], replica rank of each slot [L, R]; log2phy lists copies by rank).
    """
    weight = weight.float()
    if num_groups % num_nodes == 0:
        phy2log, phy_rank, _ = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phy_rank, _ = rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    return phy2log, phy_rank
