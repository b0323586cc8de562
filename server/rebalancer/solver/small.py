"""Small two-slot layers on the CPU, planned host-side end to end: the `auto` policy's flat plan, its
hierarchical plan and the choice between them, in NumPy and compiled loops.

Where the node problems are ones the exact two-slot search solves (two slots per GPU, a small count
table per node: 2 x 12 -> 16 slots on 2 nodes of 4 GPUs) the planning itself takes microseconds, and the
torch code around it (groups to nodes, gathers, scatters, the choice: some 40 tiny ops at 5-10 us each)
cost more than the solve; the engines' planners take 0.2-0.3 ms on such shapes. This module does the same
steps host-side: the same placements as `hierarchical.plan_hierarchical` and `planner.plan` (groups to
nodes by rounds of LPT, node n on GPUs n * G / nodes ..., each node solved by `exact`; the flat plan by
`exact` or `pair_search`).
"""

from __future__ import annotations

import numpy as np
import torch

from . import exact, pair_search
from .hierarchical import groups_to_nodes
from .jit import compiled


def applies(
    device: torch.device, num_experts: int, num_replicas: int, num_nodes: int, num_gpus: int, scenarios: bool
) -> bool:
    """Whether `plan_hierarchical` serves this problem: on the CPU, without scenarios, node problems that
    `exact` solves."""
    if device.type != "cpu" or scenarios:
        return False
    return exact.applies(num_experts // num_nodes, num_replicas // num_nodes, num_gpus // num_nodes)


def serves_auto(
    device: torch.device,
    num_experts: int,
    num_replicas: int,
    num_nodes: int,
    num_gpus: int,
    num_candidates: int,
    scenarios: bool,
) -> bool:
    """Whether `plan_auto` serves this problem: `applies`, and a flat plan that runs host-side."""
    if not applies(device, num_experts, num_replicas, num_nodes, num_gpus, scenarios):
        return False
    return exact.applies(num_experts, num_replicas, num_gpus) or pair_search.applies(
        device, num_experts, num_replicas, num_gpus, num_candidates, scenarios
    )


def plan_auto(
    loads: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    locality_tolerance: float,
) -> tuple[torch.Tensor, list[str]]:
    """The `auto` policy where `serves_auto`: loads [L, E] float64 on the CPU -> (phy2log [L, R], each
    layer's policy name). A layer keeps its hierarchical plan when its max GPU load is within
    `locality_tolerance` of the flat plan's."""
    weights = loads.numpy()
    num_experts = weights.shape[1]
    if exact.applies(num_experts, num_replicas, num_gpus):
        flat, flat_peak = exact.host_optimum(weights, num_replicas, num_gpus)
    else:
        flat, flat_peak = pair_search.host_plan(weights, num_replicas, num_gpus)
    ceiling = flat_peak * (1.0 + locality_tolerance)
    local, local_peak = host_hierarchical(weights, num_replicas, num_groups, num_nodes, num_gpus, ceiling)
    keep_local = local_peak <= ceiling
    phy2log = np.where(keep_local[:, None], local, flat)
    return torch.from_numpy(phy2log), ["hierarchical" if local else "global" for local in keep_local.tolist()]


def plan_hierarchical(
    loads: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    ceiling: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """loads [L, E] float64 on the CPU -> (phy2log [L, R] int64, max GPU load [L] float64): `host_hierarchical`."""
    phy2log, peak = host_hierarchical(
        loads.numpy(), num_replicas, num_groups, num_nodes, num_gpus, None if ceiling is None else ceiling.numpy()
    )
    return torch.from_numpy(phy2log), torch.from_numpy(peak)


def host_hierarchical(
    weights: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    ceiling: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """weights [L, E] float64 -> (phy2log [L, R] int64, max GPU load [L] float64), every group's copies
    on one node; with `ceiling` [L], a layer whose node loads already exceed it is not solved (peak +inf,
    phy2log zeros), as in `hierarchical.plan_hierarchical`, and the node searches cut by it (a layer
    whose plan cannot stay within it gets peak +inf, its phy2log unspecified). Requires `applies`."""
    num_layers, num_experts = weights.shape
    group_size = num_experts // num_groups
    group_loads = weights.reshape(num_layers, num_groups, group_size).sum(-1)
    if num_groups == 2 * num_nodes:
        node_groups = np.empty((num_layers, num_nodes, 2), dtype=np.int64)
        _pair_groups(group_loads, node_groups)
    else:
        node_groups = groups_to_nodes(torch.from_numpy(group_loads), num_nodes).numpy()
    node_rows = num_layers * num_nodes
    node_loads = np.empty((node_rows, num_experts // num_nodes))
    node_experts = np.empty((node_rows, num_experts // num_nodes), dtype=np.int64)
    solve = np.empty(num_layers, dtype=np.bool_)
    limits = np.full(num_layers, np.inf) if ceiling is None else np.ascontiguousarray(ceiling, dtype=np.float64)
    _split_nodes(weights, node_groups, group_size, num_gpus // num_nodes, limits, node_loads, node_experts, solve)
    peak = np.full(num_layers, np.inf)
    phy2log = np.zeros((num_layers, num_replicas), dtype=np.int64)
    layers = np.flatnonzero(solve)
    if layers.size:
        rows = (layers[:, None] * num_nodes + np.arange(num_nodes)).ravel()
        node_phy2local, node_peak = exact.host_optimum(
            node_loads[rows], num_replicas // num_nodes, num_gpus // num_nodes, limits[rows // num_nodes]
        )
        _join_nodes(rows, num_nodes, node_experts, node_phy2local, node_peak, phy2log, peak)
    return phy2log, peak


@compiled()
def _pair_groups(group_loads, node_groups):
    """group_loads [L, 2 nodes] -> the two groups of each node, node_groups [L, nodes, 2], as
    `packing.round_pack` places them: the `nodes` heaviest one per node, then the next ones heaviest to
    the lightest node (ties by index)."""
    num_nodes = node_groups.shape[1]
    for layer in range(group_loads.shape[0]):
        order = np.argsort(-group_loads[layer], kind="mergesort")
        heavy = order[:num_nodes]
        lightest_first = np.argsort(group_loads[layer][heavy], kind="mergesort")
        for node in range(num_nodes):
            node_groups[layer, node, 0] = heavy[node]
            node_groups[layer, lightest_first[node], 1] = order[num_nodes + node]


@compiled()
def _split_nodes(weights, node_groups, group_size, node_gpus, ceiling, node_loads, node_experts, solve):
    """Each node's experts (its groups' experts in a run, groups in node order) and their loads, into
    node_experts / node_loads [L * nodes, E / nodes]; solve [L]: whether the layer's heaviest node, its
    total over its GPUs (a bound on its max GPU load), is within `ceiling` [L]."""
    num_layers, num_nodes, groups_per_node = node_groups.shape
    for layer in range(num_layers):
        bound = 0.0
        for node in range(num_nodes):
            row, total = layer * num_nodes + node, 0.0
            for member in range(groups_per_node):
                for offset in range(group_size):
                    expert = node_groups[layer, node, member] * group_size + offset
                    node_experts[row, member * group_size + offset] = expert
                    node_loads[row, member * group_size + offset] = weights[layer, expert]
                    total += weights[layer, expert]
            bound = max(bound, total / node_gpus)
        solve[layer] = bound <= ceiling[layer]


@compiled()
def _join_nodes(rows, num_nodes, node_experts, node_phy2local, node_peak, phy2log, peak):
    """Node solutions (node_phy2local [N, R / nodes] local expert indices, node_peak [N] of node rows
    `rows` [N]) into the layers' phy2log [L, R] (node n on slots n * R / nodes ...) and peak [L]."""
    slots = node_phy2local.shape[1]
    for index in range(rows.shape[0]):
        layer, node = rows[index] // num_nodes, rows[index] % num_nodes
        for slot in range(slots):
            phy2log[layer, node * slots + slot] = node_experts[rows[index], node_phy2local[index, slot]]
        peak[layer] = node_peak[index] if node == 0 else max(peak[layer], node_peak[index])
