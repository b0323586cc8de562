"""Hierarchical placement on the CPU in NumPy, for layers whose node problems the exact two-slot search
solves (two slots per GPU, a small count table per node: 2 x 12 -> 16 slots on 2 nodes of 4 GPUs).

There the planning itself is a few NumPy calls (exact.py), and the torch code around it (groups to
nodes, gathers, scatters: some 40 tiny ops at 5-10 us each) cost more than the solve. This module does
the same steps in NumPy: the same placement as `hierarchical.plan_hierarchical` (groups to nodes by
rounds of LPT, node n on GPUs n * G / nodes ..., each node solved by `exact`), without them.
"""

from __future__ import annotations

import numpy as np
import torch

from . import exact
from .hierarchical import groups_to_nodes


def applies(
    device: torch.device, num_experts: int, num_replicas: int, num_nodes: int, num_gpus: int, scenarios: bool
) -> bool:
    """Whether `plan_hierarchical` serves this problem: on the CPU, without scenarios, node problems that
    `exact` solves."""
    if device.type != "cpu" or scenarios:
        return False
    return exact.applies(num_experts // num_nodes, num_replicas // num_nodes, num_gpus // num_nodes)


def plan_hierarchical(
    loads: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    ceiling: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """loads [L, E] float64 on the CPU -> (phy2log [L, R] int64, max GPU load [L] float64), every group's
    copies on one node; with `ceiling` [L], a layer whose node loads already exceed it is not solved
    (peak +inf, phy2log zeros), as in `hierarchical.plan_hierarchical`. Requires `applies`."""
    weights = loads.numpy()
    num_layers, num_experts = weights.shape
    group_size = num_experts // num_groups
    group_loads = weights.reshape(num_layers, num_groups, group_size).sum(-1)
    if num_groups == 2 * num_nodes:
        node_groups = _pair_groups(group_loads, num_nodes)  # [L, nodes, 2]
    else:
        node_groups = groups_to_nodes(torch.from_numpy(group_loads), num_nodes).numpy()
    node_experts = (node_groups[..., None] * group_size + np.arange(group_size)).reshape(num_layers * num_nodes, -1)
    node_loads = weights[np.arange(num_layers).repeat(num_nodes)[:, None], node_experts]  # [L * nodes, E / nodes]
    peak = np.full(num_layers, np.inf)
    phy2log = np.zeros((num_layers, num_replicas), dtype=np.int64)
    if ceiling is None:
        layers = np.arange(num_layers)
    else:
        node_bound = node_loads.sum(1).reshape(num_layers, num_nodes).max(1) / (num_gpus // num_nodes)
        layers = np.flatnonzero(node_bound <= ceiling.numpy())
    if layers.size:
        rows = (layers[:, None] * num_nodes + np.arange(num_nodes)).ravel()
        node_phy2local, node_peak = exact.host_optimum(
            node_loads[rows], num_replicas // num_nodes, num_gpus // num_nodes
        )
        solved = node_experts[rows[:, None], node_phy2local]
        phy2log[layers] = solved.reshape(layers.size, num_replicas)
        peak[layers] = node_peak.reshape(layers.size, num_nodes).max(1)
    return torch.from_numpy(phy2log), torch.from_numpy(peak)


def _pair_groups(group_loads: np.ndarray, num_nodes: int) -> np.ndarray:
    """group_loads [L, 2 nodes] -> the two groups of each node [L, nodes, 2] as `packing.round_pack`
    places them: the `nodes` heaviest one per node, then the next ones heaviest to the lightest node
    (ties by index)."""
    num_layers = group_loads.shape[0]
    order = np.argsort(-group_loads, axis=1, kind="stable")
    heavy, light = order[:, :num_nodes], order[:, num_nodes:]
    lightest_first = np.argsort(group_loads[np.arange(num_layers)[:, None], heavy], axis=1, kind="stable")
    node_groups = np.empty((num_layers, num_nodes, 2), dtype=np.int64)
    node_groups[:, :, 0] = heavy
    node_groups[np.arange(num_layers)[:, None], lightest_first, 1] = light
    return node_groups
