"""Which GPU receives which new copy: trade arrivals between nodes so that they are fetched over NVLink.

A plan fixes each GPU's load, not which of two equally loaded GPUs receives which copy. Planned without
the old placement in mind, about a third of the copies a rebalance ships find a source on the receiver's
node, and the rest cross the NICs, ~9x slower than NVLink: the inter-node class sets the rearrangement
time. Trading arrivals between GPUs of different nodes (host_arrivals.py) where each finds a same-node
source keeps every layer's peak load, its moved copies and each GPU's number of arrivals, so the balance,
`max_moves_per_layer` and the per-GPU incoming budget all hold as before. A second pass, per request
(`balanced_receivers`), trades arrivals off the GPU that receives most copies over its NIC in the whole
plan, since the busiest GPU sets the estimated time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import host_arrivals
from .maps import expert_histogram, logcnt_from_phy2log
from .migration import groups_on_one_node
from .transfers import old_content

# Partners one arrival examines per pass, and passes per layer: work O(arrivals x 128) per layer. On the
# drift benchmark more of either finds no more exchanges (4 passes x 256: the same estimated time); a
# plan that moves every copy (Kimi-K2, 61 x 416 slots) costs ~30 ms here, ~2 ms on drifting windows.
MAX_PARTNERS = 128
MAX_PASSES = 2


# Trades of the receive balancing per GPU of the layout (each lowers the busiest GPU's count or ends it).
BALANCE_STEPS_PER_GPU = 4


@dataclass
class _Arrivals:
    """The compiled loops' inputs (NumPy views of CPU tensors): the plan, what each slot held before, where
    sources sit, one copy's load per expert, and the layers that may change."""

    new: torch.Tensor
    before: torch.Tensor
    on_node: torch.Tensor
    node_of_gpu: torch.Tensor
    copy_load: torch.Tensor
    active: torch.Tensor

    def arrays(self) -> tuple[np.ndarray, ...]:
        tensors = (self.new, self.before, self.on_node, self.node_of_gpu, self.copy_load, self.active)
        return tuple(tensor.numpy() for tensor in tensors)


def _arrivals(
    loads: torch.Tensor,
    prev_phy2log: torch.Tensor,
    phy2log: torch.Tensor,
    slots_per_gpu: int,
    gpus_per_node: int,
    gpu_ids: torch.Tensor | None,
    usable_sources: torch.Tensor | None,
    active: torch.Tensor | None,
) -> _Arrivals:
    num_layers, new_slots = phy2log.shape
    num_experts = loads.shape[1]
    old_num_gpus = prev_phy2log.shape[1] // slots_per_gpu
    if gpu_ids is None:
        gpu_ids = torch.arange(new_slots // slots_per_gpu)
    gpu_ids = gpu_ids.cpu().to(torch.int64)
    held = expert_histogram(prev_phy2log, num_experts, old_num_gpus, compact=True).cpu() > 0  # [L, G_old, E]
    if usable_sources is not None:
        held &= usable_sources.cpu().view(1, -1, 1)
    old_nodes = old_num_gpus // gpus_per_node
    node_of_gpu = gpu_ids // gpus_per_node
    on_node = torch.zeros(num_layers, max(old_nodes, int(node_of_gpu.max()) + 1), num_experts, dtype=torch.bool)
    on_node[:, :old_nodes] = held.view(num_layers, old_nodes, gpus_per_node, num_experts).any(2)
    new = phy2log.cpu().to(torch.int64).clone()
    copy_load = loads.cpu().to(torch.float64) / logcnt_from_phy2log(new, num_experts).clamp_min(1)
    before = old_content(prev_phy2log.cpu(), slots_per_gpu, gpu_ids).to(torch.int64).contiguous()
    active = torch.ones(num_layers, dtype=torch.bool) if active is None else active.cpu()
    return _Arrivals(new, before, on_node, node_of_gpu, copy_load, active)


def near_sources(
    loads: torch.Tensor,
    prev_phy2log: torch.Tensor,
    phy2log: torch.Tensor,
    slots_per_gpu: int,
    gpus_per_node: int,
    *,
    gpu_ids: torch.Tensor | None = None,
    usable_sources: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """`phy2log` [L, R_new] with arrivals traded so that more have a source on their node -> [L, R_new].

    loads [L, E] (any scale); prev_phy2log [L, R_old], the placement in force; GPU k of the new layout is
    GPU `gpu_ids[k]` of the old numbering (default the identity), on node `gpu_ids[k] // gpus_per_node`;
    `usable_sources` [G_old] bool marks the old GPUs that can still send; only layers where `active` [L]
    change (default all). Kept copies keep their slots. Layers trade alone (batch independent)."""
    inputs = _arrivals(loads, prev_phy2log, phy2log, slots_per_gpu, gpus_per_node, gpu_ids, usable_sources, active)
    host_arrivals.exchange(*inputs.arrays(), slots_per_gpu, MAX_PARTNERS, MAX_PASSES)
    return inputs.new.to(phy2log.device, phy2log.dtype)


def balanced_receivers(
    loads: torch.Tensor,
    prev_phy2log: torch.Tensor,
    phy2log: torch.Tensor,
    slots_per_gpu: int,
    gpus_per_node: int,
    *,
    gpu_ids: torch.Tensor | None = None,
    usable_sources: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """`phy2log` with arrivals traded so that the GPU receiving most copies over the NIC, summed over all
    its layers, receives fewer (host_arrivals.balance); arguments as for `near_sources`.

    The estimated rearrangement time is the busiest GPU's over the whole plan, so this couples the layers of
    one rearrangement: it runs per request (rearrangement.py), like the budgets, never on a batch. On the
    drift benchmark the busiest NIC receiver gets 37 -> 33 copies (DeepSeek-V3), 40 -> 35 (Kimi-K2)."""
    inputs = _arrivals(loads, prev_phy2log, phy2log, slots_per_gpu, gpus_per_node, gpu_ids, usable_sources, active)
    steps = BALANCE_STEPS_PER_GPU * (phy2log.shape[1] // slots_per_gpu)
    host_arrivals.balance(*inputs.arrays(), slots_per_gpu, steps)
    return inputs.new.to(phy2log.device, phy2log.dtype)


def tradeable_layers(
    phy2log: torch.Tensor, num_experts: int, policy: str, num_groups: int, num_nodes: int, gpu_change: bool
) -> torch.Tensor:
    """The layers whose arrivals may trade [L] bool, on phy2log's device: none under the `deepseek` policy
    (the published placement stays as it is; a changed GPU set plans elastically whatever the policy); with
    groups planned onto nodes, the layers whose groups do not sit on one node (trades ignore groups).
    `num_groups` and `num_nodes` as planned (`planning_layout`)."""
    if gpu_change:
        return torch.ones(phy2log.shape[0], dtype=torch.bool, device=phy2log.device)
    if policy == "deepseek":
        return torch.zeros(phy2log.shape[0], dtype=torch.bool, device=phy2log.device)
    if num_nodes > 1:
        return ~groups_on_one_node(phy2log, num_experts, num_groups, num_nodes)
    return torch.ones(phy2log.shape[0], dtype=torch.bool, device=phy2log.device)
