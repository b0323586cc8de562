"""Hierarchical placement: expert groups -> nodes, then the multi-candidate solver inside each node.

Keeping a group's experts on one node keeps DeepSeek-style node-limited routing on fast links. The
node problems of all layers form one batch for the planner ([L * nodes] rows).
"""

from __future__ import annotations

import torch

from .candidates import _mix32
from .packing import greedy_pack, round_pack, swap_refine
from .planner import plan


def groups_to_nodes(group_loads: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """group_loads [L, ng] -> the groups of each node [L, nodes, ng / nodes], balanced by LPT + swaps
    (two groups per node: heaviest with lightest, which is optimal and what LPT + swaps reach)."""
    if group_loads.shape[1] == 2 * num_nodes:
        return round_pack(group_loads, num_nodes)
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
    ceiling: torch.Tensor | None = None,
    scenario_loads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """loads [L, E] -> (phy2log [L, R], max GPU load [L]) with every group's copies on one node.

    Node n owns GPUs n * G / nodes ... and slots n * R / nodes ...; requires num_groups % num_nodes == 0.
    With `ceiling` [L] (the max load to beat), a layer whose node loads already exceed it (a node's
    total over its GPUs is a lower bound) is not solved: its peak is +inf and its phy2log meaningless.
    """
    num_layers, num_experts = loads.shape
    group_size = num_experts // num_groups
    experts_per_node = num_experts // num_nodes
    gpus_per_node = num_gpus // num_nodes
    node_groups = groups_to_nodes(loads.view(num_layers, num_groups, group_size).sum(-1), num_nodes)
    # node_experts[l, n, j]: the j-th expert of node n, groups kept contiguous.
    offsets = torch.arange(group_size, device=loads.device)
    node_experts = (node_groups.unsqueeze(-1) * group_size + offsets).view(num_layers, num_nodes, experts_per_node)
    node_loads = loads.gather(1, node_experts.view(num_layers, -1)).view(num_layers, num_nodes, experts_per_node)
    node_ids = torch.arange(num_nodes, device=loads.device, dtype=torch.int64)
    node_seeds = _mix32((seeds.view(-1, 1) & 0xFFFFFFFF) ^ (node_ids + 1))  # [L, nodes]
    peak = torch.full((num_layers,), float("inf"), dtype=torch.float64, device=loads.device)
    phy2log = torch.zeros(num_layers, num_replicas, dtype=torch.int64, device=loads.device)
    if ceiling is None:
        layers = torch.arange(num_layers, device=loads.device)
    else:
        node_bound = node_loads.sum(-1).max(-1).values / gpus_per_node
        viable = node_bound <= ceiling
        if loads.device.type != "cpu":  # no host sync on a GPU: solve all, mask afterwards
            layers = torch.arange(num_layers, device=loads.device)
        else:
            layers = viable.nonzero().squeeze(1)
            if layers.numel() == 0:
                return phy2log, peak
    count = layers.numel()
    node_scenarios = None
    if scenario_loads is not None:
        num_scenarios = scenario_loads.shape[1]
        picked = node_experts[layers].view(count, 1, -1).expand(-1, num_scenarios, -1)
        node_scenarios = scenario_loads[layers].gather(2, picked).view(count, num_scenarios, num_nodes, -1)
        node_scenarios = node_scenarios.transpose(1, 2).reshape(count * num_nodes, num_scenarios, -1)
    node_phy2local, node_peak = plan(
        node_loads[layers].view(count * num_nodes, experts_per_node),
        num_replicas // num_nodes,
        gpus_per_node,
        node_seeds[layers].view(-1),
        num_candidates,
        node_scenarios,
    )
    solved = node_experts[layers].view(count * num_nodes, -1).gather(1, node_phy2local)
    phy2log[layers] = solved.view(count, num_replicas)
    peak[layers] = node_peak.view(count, num_nodes).max(-1).values
    if ceiling is not None:
        peak = torch.where(viable, peak, torch.full_like(peak, float("inf")))
    return phy2log, peak
