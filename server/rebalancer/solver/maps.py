"""Placement maps and their scoring: logcnt and log2phy from phy2log, GPU loads, balancedness, moves.

Every function works on a batch of layers and stays on the tensors' device.
"""

from __future__ import annotations

import numpy as np
import torch


def logcnt_from_phy2log(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """phy2log [L, R] (any integer dtype) -> copies per expert [L, E] int64."""
    phy2log = phy2log.long()
    counts = torch.zeros(phy2log.shape[0], num_experts, dtype=torch.int64, device=phy2log.device)
    return counts.scatter_add_(1, phy2log, torch.ones_like(phy2log))


def log2phy_from_phy2log(
    phy2log: torch.Tensor,
    logcnt: torch.Tensor,
    phy_rank: torch.Tensor | None = None,
    dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """phy2log [L, R] -> log2phy [L, E, X] (X = max copies) padded with -1, of `dtype` (R - 1 must fit).

    Copies are listed in slot order, or by `phy_rank` [L, R] (each slot's replica index) when given.
    A narrow `dtype` (int16 for the wire) writes a quarter of the int64 bytes: X is the hottest expert's
    copies, so most of the map is padding (58 x 256 x 19 on DeepSeek-V3 with 288 slots).
    """
    num_layers, num_slots = phy2log.shape
    num_experts = logcnt.shape[1]
    max_copies = int(logcnt.max()) if logcnt.numel() else 1
    slots = torch.arange(num_slots, dtype=torch.int64, device=phy2log.device)
    log2phy = torch.full((num_layers, num_experts * max_copies), -1, dtype=dtype, device=phy2log.device)
    if phy_rank is None:
        # Sorting by (expert, slot) lists each expert's slots in order: the j-th of the sorted slots is
        # copy j - (its expert's first position) of that expert.
        order = _by_expert_then_slot(phy2log, num_experts)
        sorted_experts = phy2log.gather(1, order)
        first_of_expert = torch.cumsum(logcnt, -1) - logcnt
        entry = sorted_experts * max_copies + slots - first_of_expert.gather(1, sorted_experts)
        log2phy.scatter_(1, entry, order.to(dtype))
    else:
        log2phy.scatter_(1, phy2log * max_copies + phy_rank, slots.to(dtype).expand(num_layers, -1))
    return log2phy.view(num_layers, num_experts, max_copies)


def _by_expert_then_slot(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The slot order [L, R] int64 that sorts each layer by expert id, ties in slot order.

    On the CPU, NumPy's stable sort of 16-bit keys (a radix sort) takes ~0.1 ms on 58 x 288 slots where
    torch's row sort takes ~0.8 ms, which a service answer pays after every solve.
    """
    if phy2log.device.type == "cpu" and num_experts <= np.iinfo(np.int16).max:
        keys = phy2log.numpy().astype(np.int16)
        return torch.from_numpy(np.argsort(keys, axis=-1, kind="stable").astype(np.int64, copy=False))
    num_slots = phy2log.shape[1]
    return (phy2log * num_slots + torch.arange(num_slots, device=phy2log.device)).argsort(-1)


def slot_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """Load each slot serves when an expert's tokens split evenly over its copies: [L, R] float64."""
    per_copy = weight.double() / logcnt.clamp_min(1).double()
    return per_copy.gather(1, phy2log)


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[L, E] loads and a placement -> [L, G] GPU loads (float64)."""
    loads = slot_loads(weight, phy2log, logcnt)
    return loads.view(loads.shape[0], num_gpus, -1).sum(-1)


def ratio(numerator: torch.Tensor, denominator: torch.Tensor, where_zero: float | torch.Tensor) -> torch.Tensor:
    """numerator / denominator, `where_zero` where the denominator is 0. Exact at any magnitude: a clamp
    of the denominator (to 1e-300, say) would turn loads of 1e-301 into wrong figures."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), where_zero)


def balancedness(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Mean GPU load / max GPU load per layer [L]; 1.0 for an all-zero layer."""
    loads = gpu_loads(weight, phy2log, logcnt, num_gpus)
    return ratio(loads.mean(-1), loads.max(-1).values, 1.0)


def imbalance_ratio(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Max GPU load / mean GPU load per layer [L] (the engines' imbalance figure); 1.0 when all zero."""
    return 1.0 / balancedness(weight, phy2log, logcnt, num_gpus)


def expert_histogram(phy2log: torch.Tensor, num_experts: int, num_gpus: int, compact: bool = False) -> torch.Tensor:
    """Copies of each expert on each GPU: [L, G, E] int64, or with `compact` the smallest type that holds
    a GPU's slots (int16 below 2**15: an eighth of the memory for callers that compare or test > 0)
    (phy2log of any integer dtype)."""
    phy2log = phy2log.long()
    num_layers, num_slots = phy2log.shape
    count_type = count_dtype(num_slots // num_gpus) if compact else torch.int64
    gpu = torch.arange(num_slots, device=phy2log.device) // (num_slots // num_gpus)
    hist = torch.zeros(num_layers, num_gpus * num_experts, dtype=count_type, device=phy2log.device)
    hist.scatter_add_(1, gpu * num_experts + phy2log, torch.ones_like(phy2log, dtype=count_type))
    return hist.view(num_layers, num_gpus, num_experts)


def count_dtype(slots_per_gpu: int) -> torch.dtype:
    """The smallest signed integer type for copy counts (and their differences) of a GPU's slots."""
    return torch.int16 if slots_per_gpu < 2**15 else torch.int32


def moved_copies(prev_phy2log: torch.Tensor, phy2log: torch.Tensor, num_experts: int, num_gpus: int) -> torch.Tensor:
    """Expert copies each layer must ship: per GPU, experts it hosts now that it did not host before. [L].

    One histogram of new minus old copies per (GPU, expert), in int16 while a GPU has fewer than 2**15
    slots: 8-10x faster than two int64 histograms (DeepSeek-V3 on 72 GPUs: 1.0 ms instead of 8.5)."""
    num_layers, num_slots = phy2log.shape
    count_type = count_dtype(num_slots // num_gpus)
    gpu = torch.arange(num_slots, device=phy2log.device) // (num_slots // num_gpus)
    change = torch.zeros(num_layers, num_gpus * num_experts, dtype=count_type, device=phy2log.device)
    change.scatter_add_(1, gpu * num_experts + phy2log.long(), torch.ones_like(phy2log, dtype=count_type))
    change.scatter_add_(1, gpu * num_experts + prev_phy2log.long(), torch.full_like(phy2log, -1, dtype=count_type))
    return change.clamp_min_(0).sum(1, dtype=torch.int64)
