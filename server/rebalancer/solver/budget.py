"""Transfer budgets: cap a rebalance by its estimated rearrangement time and/or the copies any one GPU
receives, keeping the layers that gain most balance per transferred byte.

The proposed plan is all or nothing per layer: a layer either takes its new placement or keeps the one
in force (the rest follows on the next rebalance). Layers are ranked by the drop of their max GPU load
(relative to the layer's mean) per network copy; free layers (nothing crosses a link) come first and
layers that gain nothing are never chosen. Cumulative link usage along the ranking is monotone, so the
layers that fit are one prefix of it, found with a single cumsum over layers.
"""

from __future__ import annotations

import math

import torch

from .maps import gpu_loads, logcnt_from_phy2log, ratio
from .transfers import LAYER, CostModel, busiest_seconds, link_usage


def layers_within_budget(
    loads: torch.Tensor,
    prev_phy2log: torch.Tensor,
    phy2log: torch.Tensor,
    transfers: torch.Tensor,
    num_gpus: int,
    gpus_per_node: int,
    cost: CostModel,
    max_transfer_seconds: float | None,
    max_incoming_copies_per_gpu: int | None,
) -> torch.Tensor:
    """Which layers take their new placement: [L] bool.

    loads [L, E], prev_phy2log and phy2log [L, R] on the same GPUs, transfers [T, 5] from
    `transfers.plan_transfers`.
    """
    num_layers, num_experts = loads.shape
    usage = link_usage(transfers, num_layers, num_gpus, gpus_per_node)  # [L, G, 4]
    copies = usage[..., 2:4].sum((1, 2))  # [L] network copies received
    mean = loads.sum(-1) / num_gpus
    peak_old = gpu_loads(loads, prev_phy2log, logcnt_from_phy2log(prev_phy2log, num_experts), num_gpus).amax(-1)
    peak_new = gpu_loads(loads, phy2log, logcnt_from_phy2log(phy2log, num_experts), num_gpus).amax(-1)
    gain = ratio(peak_old - peak_new, mean, 0.0)
    changed = torch.zeros(num_layers, dtype=torch.bool, device=loads.device)
    changed[transfers[:, LAYER]] = True
    useful = changed & ((gain > 0) | (copies == 0))
    rank = torch.where(copies > 0, gain / copies.clamp_min(1), math.inf)
    order = torch.where(useful, rank, -math.inf).argsort(descending=True, stable=True)
    running = usage[order].cumsum(0)  # [L, G, 4] usage of the first k + 1 ranked layers
    fits = useful[order]
    if max_transfer_seconds is not None:
        fits &= busiest_seconds(running, cost) <= max_transfer_seconds * (1 + 1e-12)
    if max_incoming_copies_per_gpu is not None:
        fits &= running[..., 2:4].sum(-1).amax(-1) <= max_incoming_copies_per_gpu
    taken = int(fits.to(torch.int64).cumprod(0).sum())
    chosen = torch.zeros(num_layers, dtype=torch.bool, device=loads.device)
    chosen[order[:taken]] = True
    return chosen
