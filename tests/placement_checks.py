"""Checks of placement maps and the reference policies the solver tests compare against.

Loads and scores (balancedness, max GPU load, lower bound) come from `rebalancer_testkit.workloads`, which
the benchmarks share; what stays here is test-only: the published algorithm's hierarchical and global policies
as references, and the invariants every DeepSeek-compatible placement triple must satisfy.
"""

from __future__ import annotations

import torch
from rebalancer.solver import deepseek
from rebalancer_testkit.workloads import balancedness


def reference_policies(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> dict[str, torch.Tensor]:
    """The published algorithm's hierarchical and global policies: name -> phy2log [L, R].

    Hierarchical only when groups divide over nodes (as the published entry point requires)."""
    w = weight.float().cpu()
    out = {"global": deepseek.rebalance_hierarchical(w, num_replicas, 1, 1, num_gpus)[0]}
    if num_groups % num_nodes == 0:
        out["hierarchical"] = deepseek.rebalance_hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)[0]
    return out


def best_reference_balancedness(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> float:
    """Mean balancedness of the better of the reference's hierarchical and global policies."""
    plans = reference_policies(weight, num_replicas, num_groups, num_nodes, num_gpus)
    return max(float(balancedness(weight, p, num_gpus).mean()) for p in plans.values())


# --- map checks ---------------------------------------------------------------------------------------


def assert_valid_maps(
    phy2log: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    num_layers: int,
    num_experts: int,
    num_replicas: int,
    num_gpus: int,
    device: torch.device | str | None = None,
) -> None:
    """Everything a DeepSeek-compatible placement triple must satisfy."""
    for name, t in (("phy2log", phy2log), ("log2phy", log2phy), ("logcnt", logcnt)):
        assert t.dtype == torch.int64, f"{name} dtype {t.dtype}"
        if device is not None:
            assert t.device.type == torch.device(device).type, f"{name} on {t.device}, expected {device}"
    phy2log, log2phy, logcnt = phy2log.cpu(), log2phy.cpu(), logcnt.cpu()
    assert phy2log.shape == (num_layers, num_replicas)
    assert logcnt.shape == (num_layers, num_experts)
    assert log2phy.dim() == 3 and log2phy.shape[:2] == (num_layers, num_experts)
    # Ranges, every expert hosted, copies add up to the slots (and R / G slots on each GPU by layout).
    assert num_replicas % num_gpus == 0
    assert bool(((phy2log >= 0) & (phy2log < num_experts)).all()), "phy2log holds a non-expert id"
    assert bool((logcnt >= 1).all()), "an expert has no copy"
    assert torch.equal(logcnt.sum(-1), torch.full((num_layers,), num_replicas, dtype=torch.int64))
    counted = torch.stack([torch.bincount(row, minlength=num_experts) for row in phy2log])
    assert torch.equal(counted, logcnt), "logcnt disagrees with phy2log"
    # log2phy: the first logcnt[e] entries are distinct slots hosting e, the rest is -1 padding.
    width = log2phy.shape[2]
    assert width >= int(logcnt.max())
    listed = torch.arange(width).view(1, 1, -1) < logcnt.unsqueeze(-1)
    assert bool((log2phy[~listed] == -1).all()), "log2phy padding is not -1"
    slots = log2phy[listed]
    assert bool(((slots >= 0) & (slots < num_replicas)).all()), "log2phy lists a slot out of range"
    expert_of = torch.arange(num_experts).view(1, -1, 1).expand_as(log2phy)
    hosted = phy2log.gather(1, log2phy.clamp_min(0).flatten(1)).view_as(log2phy)
    assert torch.equal(hosted[listed], expert_of[listed]), "log2phy slot does not map back to its expert"
    for layer in range(num_layers):
        listed_slots = log2phy[layer][listed[layer]]
        assert sorted(listed_slots.tolist()) == list(range(num_replicas)), "log2phy does not list every slot once"


def assert_groups_on_one_node(
    phy2log: torch.Tensor, num_experts: int, num_groups: int, num_nodes: int, layers: list[int] | None = None
) -> None:
    """Every copy of every expert of a group lives on the same node (slot p on node p // (R / nodes))."""
    phy2log = phy2log.cpu()
    num_layers, num_replicas = phy2log.shape
    node_of_slot = torch.arange(num_replicas) // (num_replicas // num_nodes)
    group_of_slot = phy2log // (num_experts // num_groups)
    for layer in range(num_layers) if layers is None else layers:
        for group in range(num_groups):
            nodes = set(node_of_slot[group_of_slot[layer] == group].tolist())
            assert len(nodes) == 1, f"layer {layer}: group {group} spans nodes {sorted(nodes)}"
