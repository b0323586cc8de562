"""`transfers.choose_sources`, compiled with Numba: one pass over the transfers, each picking its source
with the sends of every earlier pick counted.

Picking in rounds (every transfer of a round seeing only the earlier rounds' sends, as a tensor version
must) sent all eight copies of an expert held by thirteen GPUs from the one that had sent least before
the round: DeepSeek-V3 EP72's busiest sender sent 90 copies where one at a time needs 56 (estimated
rearrangement 8.8 -> 6.5 ms). The choice is sequential, so it runs here for every solve device; the
candidates [T, G] are small next to the maps.
"""

from __future__ import annotations

import numpy as np
import torch

from .jit import compiled


@compiled()
def _choose(candidates, dst, gpus_per_node, intra, inter, from_host):
    num_transfers, num_gpus = candidates.shape
    preferred = np.zeros((num_transfers, num_gpus), dtype=np.bool_)
    link = np.empty(num_transfers, dtype=np.int64)
    choices = np.zeros(num_transfers, dtype=np.int64)
    for t in range(num_transfers):
        node = dst[t] // gpus_per_node
        has_near = False
        for g in range(num_gpus):
            if candidates[t, g] and g // gpus_per_node == node:
                has_near = True
        link[t] = intra if has_near else inter
        for g in range(num_gpus):
            preferred[t, g] = candidates[t, g] and (not has_near or g // gpus_per_node == node)
            choices[t] += preferred[t, g]
    # Fewest choices first (a forced source takes its send before the flexible ones spread around it).
    order = np.argsort(choices * num_transfers + np.arange(num_transfers), kind="mergesort")
    src = np.full(num_transfers, from_host, dtype=np.int64)
    sent = np.zeros((2, num_gpus), dtype=np.float64)
    for t in order:
        if choices[t] == 0:
            continue
        best, pick = np.inf, 0
        for g in range(num_gpus):
            if preferred[t, g]:
                # Least sent on this link class; among equals a per-(transfer, GPU) offset in [0, 1).
                score = sent[link[t], g] + ((t * 7 + g * 13) % num_gpus) / num_gpus
                if score < best:
                    best, pick = score, g
        src[t] = pick
        sent[link[t], pick] += 1.0
    return src


def choose_sources(
    candidates: torch.Tensor, dst: torch.Tensor, gpus_per_node: int, intra: int, inter: int, from_host: int
) -> torch.Tensor:
    """candidates [T, G] bool, dst [T] (any device) -> the source of each transfer [T] int64, on their device."""
    chosen = _choose(candidates.cpu().numpy(), dst.cpu().numpy(), gpus_per_node, intra, inter, from_host)
    return torch.from_numpy(chosen).to(dst.device)


def warm_up() -> None:
    """Compile (or load from the disk cache) the loop, so that no request pays the first compilation."""
    choose_sources(torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, dtype=torch.int64), 1, 0, 1, -1)
