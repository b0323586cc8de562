"""From the placement in force to a new plan: the transfers, their cost and, under a budget, which
layers move now (the rest keep their placement until the next rebalance)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .arrivals import balanced_receivers
from .budget import layers_within_budget
from .transfers import SRC_GPU, CostModel, plan_transfers, transfer_stats

if TYPE_CHECKING:
    from .api import SolveResult


@dataclass
class Rearrangement:
    """A plan with its transfers, after any budget: phy2log [L, R'], transfers [T, 5], figures."""

    phy2log: torch.Tensor
    transfers: torch.Tensor
    gpu_ids: torch.Tensor
    chosen: list[bool]
    deferred_layers: int
    summary: dict

    def fill(self, result: SolveResult) -> None:
        result.transfers = self.transfers
        result.gpu_ids = self.gpu_ids
        result.deferred_layers = self.deferred_layers
        result.moved_bytes = self.summary["moved_bytes"]
        result.intra_node_share = self.summary["intra_node_share"]
        result.estimated_transfer_seconds = self.summary["estimated_transfer_seconds"]
        result.stats.update(self.summary)


def usable_gpus(num_gpus: int, unavailable_gpus: Sequence[int] | None, device: torch.device) -> torch.Tensor:
    """Which GPUs of the placement in force can still send copies: [G] bool, False on the failed ones."""
    usable = torch.ones(num_gpus, dtype=torch.bool, device=device)
    if unavailable_gpus:
        usable[list(unavailable_gpus)] = False
    return usable


def rearrange(
    loads: torch.Tensor,
    prev_phy2log: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    num_nodes: int,
    cost: CostModel,
    *,
    gpu_ids: torch.Tensor | None = None,
    unavailable_gpus: Sequence[int] | None = None,
    max_transfer_seconds: float | None = None,
    max_incoming_copies_per_gpu: int | None = None,
    balance_layers: torch.Tensor | None = None,
) -> Rearrangement:
    """The transfers from `prev_phy2log` [L, R] to `phy2log` [L, R'] and their cost; with a budget, the
    layers that do not fit keep the placement in force. `balance_layers` [L] bool: the layers whose
    arrivals may trade so that the busiest NIC receiver of the whole plan receives fewer
    (arrivals.balanced_receivers; None: no trades). Used by `solve`, and by the service on each request's
    share of a batched solve (budgets and this balancing are per request)."""
    num_layers, num_experts = loads.shape
    device = phy2log.device
    slots_per_gpu = prev_phy2log.shape[1] // num_gpus
    gpus_per_node = num_gpus // num_nodes
    if gpu_ids is None:
        gpu_ids = torch.arange(phy2log.shape[1] // slots_per_gpu, device=device)
    gpu_ids = gpu_ids.to(device)
    usable = usable_gpus(num_gpus, unavailable_gpus, device)
    if balance_layers is not None and bool(balance_layers.any()):
        phy2log = balanced_receivers(
            loads,
            prev_phy2log,
            phy2log,
            slots_per_gpu,
            gpus_per_node,
            gpu_ids=gpu_ids,
            usable_sources=usable,
            active=balance_layers,
        )
    transfers = plan_transfers(
        prev_phy2log, phy2log, num_experts, slots_per_gpu, gpus_per_node, gpu_ids=gpu_ids, usable_sources=usable
    )
    chosen = torch.ones(num_layers, dtype=torch.bool, device=device)
    deferred = 0
    if (
        max_transfer_seconds is not None or max_incoming_copies_per_gpu is not None
    ) and phy2log.shape == prev_phy2log.shape:
        chosen = layers_within_budget(
            loads,
            prev_phy2log,
            phy2log,
            transfers,
            num_gpus,
            gpus_per_node,
            cost,
            max_transfer_seconds,
            max_incoming_copies_per_gpu,
        )
        deferred = int((~chosen & (phy2log != prev_phy2log).any(1)).sum())
        phy2log = torch.where(chosen.unsqueeze(1), phy2log, prev_phy2log)
        transfers = transfers[chosen[transfers[:, 0]]]
    id_space = max(num_gpus, int(gpu_ids.max()) + 1)
    summary = transfer_stats(transfers, num_layers, id_space, gpus_per_node, cost)
    summary["from_host_copies"] = float((transfers[:, SRC_GPU] < 0).sum())
    return Rearrangement(phy2log, transfers, gpu_ids, chosen.tolist(), deferred, summary)
