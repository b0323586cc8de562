"""Each request's transfer plan, budget and cost on its share of a batched solve.

A batch concatenates requests along the layer axis, but a transfer budget and the rearrangement time
belong to one request (one deployment's GPUs), so both are worked out here, per request, on the slice of
the batch result: the transfers from the placement in force (or the baseline of a fresh plan), the layers
a budget holds back, and the moved bytes, intra-node share and estimated seconds under its cost model.
Runs on the solver thread.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from rebalancer_wire.topology import Topology, planning_layout

from rebalancer.solver import CostModel, maps
from rebalancer.solver.arrivals import tradeable_layers
from rebalancer.solver.rearrangement import rearrange


def layout_after(topology: Topology, gpu_ids: np.ndarray | None) -> Topology:
    """The layout a plan describes: `topology`, or for a changed GPU set its G_new GPUs with the same slots
    per GPU (on whole nodes when G_new divides into them, else counted as one node)."""
    if gpu_ids is None:
        return topology
    num_gpus = len(gpu_ids)
    per_node = topology.num_gpus // topology.num_nodes
    num_nodes = num_gpus // per_node if num_gpus % per_node == 0 else 1
    groups = topology.num_groups if num_nodes > 1 or topology.num_nodes == 1 else 1
    return replace(
        topology,
        num_replicas=topology.slots_per_gpu * num_gpus,
        num_gpus=num_gpus,
        num_nodes=num_nodes,
        num_groups=groups,
    )


@dataclass
class JobRearrangement:
    """One request's transfer plan and its cost; when its budget held layers back or its NIC receivers were
    balanced, also its placement after that (maps and per-layer figures [L] as numpy), else those are None."""

    transfers: np.ndarray  # [T, 5] int32, layers counted from the request's first
    gpu_ids: np.ndarray | None  # [G_new] when the GPU set changed
    moved_bytes: float
    intra_node_share: float
    estimated_transfer_seconds: float
    kept_layers: int = 0  # layers the budget held back on the placement in force
    phy2log: np.ndarray | None = None
    log2phy: np.ndarray | None = None
    logcnt: np.ndarray | None = None
    balancedness: np.ndarray | None = None
    moved_copies: np.ndarray | None = None


def rearrange_job(
    loads: torch.Tensor,
    in_force: torch.Tensor,
    phy2log: torch.Tensor,
    topology: Topology,
    settings,
    cost: CostModel | None,
    unavailable_gpus: tuple[int, ...],
    gpu_ids: torch.Tensor | None,
    planned_from_it: bool = True,
) -> JobRearrangement:
    """loads [L, E] float64, in_force [L, R] and phy2log [L, R'] int64 on the solver's device; `gpu_ids`
    [G_new] from the solve (None or the identity when the GPU set is unchanged). `planned_from_it`: the
    solve was given `in_force` (as `solve` balances the NIC receivers of such a plan, so does this; a plan
    only compared with a deployment's placement is left as planned)."""
    changed_set = gpu_ids is not None and (
        gpu_ids.numel() != topology.num_gpus or bool((gpu_ids.cpu() != torch.arange(topology.num_gpus)).any())
    )
    balance_layers = None
    if planned_from_it and not changed_set:
        groups, nodes = planning_layout(topology.num_groups, topology.num_nodes)
        balance_layers = tradeable_layers(phy2log, topology.num_experts, settings.policy, groups, nodes, False)
    arranged = rearrange(
        loads,
        in_force,
        phy2log,
        topology.num_gpus,
        topology.num_nodes,
        cost or CostModel(),
        gpu_ids=gpu_ids if changed_set else None,
        unavailable_gpus=list(unavailable_gpus) or None,
        max_transfer_seconds=settings.max_transfer_seconds,
        max_incoming_copies_per_gpu=settings.max_incoming_copies_per_gpu,
        balance_layers=balance_layers,
    )
    summary = arranged.summary
    outcome = JobRearrangement(
        transfers=arranged.transfers.to(torch.int32).cpu().numpy(),
        gpu_ids=arranged.gpu_ids.cpu().numpy() if changed_set else None,
        moved_bytes=summary["moved_bytes"],
        intra_node_share=summary["intra_node_share"],
        estimated_transfer_seconds=summary["estimated_transfer_seconds"],
        kept_layers=arranged.deferred_layers,
    )
    if arranged.deferred_layers or not torch.equal(arranged.phy2log, phy2log):
        final = arranged.phy2log
        logcnt = maps.logcnt_from_phy2log(final, topology.num_experts)
        outcome.phy2log = final.cpu().numpy()
        outcome.log2phy = maps.log2phy_from_phy2log(final, logcnt).cpu().numpy()
        outcome.logcnt = logcnt.cpu().numpy()
        outcome.balancedness = maps.balancedness(loads, final, logcnt, topology.num_gpus).double().cpu().numpy()
        outcome.moved_copies = maps.moved_copies(in_force, final, topology.num_experts, topology.num_gpus).cpu().numpy()
    return outcome
