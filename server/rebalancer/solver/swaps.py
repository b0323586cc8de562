"""Swaps that bring a layer's GPUs under a target shipping as few copies as they can (the incremental plan).

Swapping by load alone (the heaviest GPU levelled against one of its lightest partners) ships two copies
a swap and often swaps where a smaller step would reach the target: on drifting windows ~39 copies per
DeepSeek-V3 layer for ~14 GPUs over the target. Choosing, among the swaps that reach the target, the one
that ships fewest (a copy going back to a GPU that held it ships none) ships ~19 % fewer copies to the
same target. See host_swaps.py for the rule; the loop is compiled and runs on the host.
"""

from __future__ import annotations

import numpy as np
import torch

from . import host_swaps

# Partner GPUs a round looks at, the lightest first: as many as keep a round within MAX_PAIRS scored
# pairs (partners x slots per GPU squared), between 8 and 64. DeepSeek-V3 on 32 GPUs (9 slots): 50, so
# all 31; Kimi-K2 (13 slots): 24; 23 or more slots per GPU: 8, as many as the load-only swaps had.
MAX_PAIRS = 4096
MIN_PARTNERS, MAX_PARTNERS = 8, 64


def swap_partners(num_gpus: int, slots_per_gpu: int) -> int:
    """Partner GPUs one round of `cheapest_swaps` scores on this shape (the admission model uses it too)."""
    return max(1, min(num_gpus - 1, MAX_PARTNERS, max(MIN_PARTNERS, MAX_PAIRS // slots_per_gpu**2)))


def cheapest_swaps(
    copy_loads: torch.Tensor,
    prev_phy2log: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    targets: torch.Tensor,
    max_swaps: int,
) -> torch.Tensor:
    """copy_loads [L, E] float64 (one copy's load), prev_phy2log [L, R] (the placement in force; -1 where a
    slot was empty), phy2log
    [L, R], targets [L] -> phy2log [L, R] after at most `max_swaps` swaps per layer (host_swaps.py), on
    phy2log's device."""
    rows = np.ascontiguousarray(phy2log.cpu().numpy(), dtype=np.int64).copy()
    prev_rows = np.ascontiguousarray(prev_phy2log.cpu().numpy(), dtype=np.int64)
    host_swaps.cheapest_swaps(
        rows,
        prev_rows,
        np.ascontiguousarray(copy_loads.cpu().numpy(), dtype=np.float64),
        phy2log.shape[1] // num_gpus,
        np.ascontiguousarray(targets.cpu().numpy(), dtype=np.float64),
        max_swaps,
        swap_partners(num_gpus, phy2log.shape[1] // num_gpus),
    )
    return torch.from_numpy(rows).to(phy2log.device)
