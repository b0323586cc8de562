"""Hierarchical placement: expert groups -> nodes, then the multi-candidate solver inside each node.

Keeping a group's experts on one node keeps DeepSeek-style node-limited routing on fast links. The
node problems of all layers form one batch for the planner ([L * nodes] rows).
"""

from __future__ import annotations

import torch

from .candidates import _mix32
from .packing import greedy_pack, swap_refine
from .planner import plan


def groups_to_nodes(group_loads: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """group_loads [L, ng] -> the groups of each node [L, nodes, ng / nodes], balanced by LPT + swaps."""
    order = group_loads.sort(dim=-1, descending=True, stable=True).indices
    node_groups = greedy_pack(group_loads, order, num_nodes)
    node_group_loads = group_loads.gather(1, node_groups.flatten(1)).view_as(node_groups)
    targets = group_loads.sum(-1) / num_nodes
    return swap_refine(node_group_loads, node_groups, targets)[1]


def plan_hierarchical(
    loads: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    seeds: torch.Tensor,
    num_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """loads [L, E] -> (phy2log [L, R], max GPU load [L]) with every group's copies on one node.

    Node n owns GPUs n * G / nodes ... and slots n * R / nodes ...; requires num_groups % num_nodes == 0.
    """
    num_layers, num_experts = loads.shape
    group_size = num_experts // num_groups
    experts_per_node = num_experts // num_nodes
    node_groups = groups_to_nodes(loads.view(num_layers, num_groups, group_size).sum(-1), num_nodes)
    # node_experts[l, n, j]: the j-th expert of node n, groups kept contiguous.
    offsets = torch.arange(group_size, device=loads.device)
    node_experts = (node_groups.unsqueeze(-1) * group_size + offsets).view(num_layers, num_nodes, experts_per_node)
    node_loads = loads.gather(1, node_experts.view(num_layers, -1)).view(num_layers * num_nodes, experts_per_node)
    node_ids = torch.arange(num_nodes, device=loads.device, dtype=torch.int64)
    node_seeds = _mix32((seeds.view(-1, 1) & 0xFFFFFFFF) ^ (node_ids + 1)).view(-1)
    node_phy2local, node_peak = plan(
        node_loads, num_replicas // num_nodes, num_gpus // num_nodes, node_seeds, num_candidates
    )
    phy2log = node_experts.view(num_layers * num_nodes, -1).gather(1, node_phy2local)
    return phy2log.view(num_layers, num_replicas), node_peak.view(num_layers, num_nodes).max(-1).values
