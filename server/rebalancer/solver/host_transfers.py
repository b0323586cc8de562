"""`transfers.choose_sources` on the CPU, compiled with Numba.

The torch version runs SOURCE_ROUNDS rounds of ~9 small tensor operations each: ~1.5 ms for the 1-2
thousand copies of a DeepSeek-V3 rebalance, most of it per-operation cost, paid by the service after every
solve with a placement in force. Compiled it is one pass over the transfers, with the same order, the same
rounds, the same float32 tie offsets and the same first-lowest choice, so both give the same sources.
"""

from __future__ import annotations

import numpy as np
import torch

from .jit import compiled


@compiled()
def _choose(candidates, dst, gpus_per_node, max_rounds, intra, inter, from_host):
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
    order = np.argsort(choices * num_transfers + np.arange(num_transfers), kind="mergesort")
    order = order[choices[order] > 0]
    src = np.full(num_transfers, from_host, dtype=np.int64)
    sent = np.zeros((2, num_gpus), dtype=np.float64)
    total = order.shape[0]
    rounds = min(max_rounds, max(total, 1))
    size, bigger = total // rounds, total % rounds  # as torch.tensor_split: the first `bigger` one longer
    start = 0
    picks = np.empty(total, dtype=np.int64)
    for chunk in range(rounds):
        end = start + size + (1 if chunk < bigger else 0)
        for at in range(start, end):
            t = order[at]
            best, pick = np.inf, 0
            for g in range(num_gpus):
                if preferred[t, g]:
                    offset = np.float32((t * 7 + g * 13) % num_gpus) / np.float32(num_gpus)
                    score = sent[link[t], g] + np.float64(offset)
                    if score < best:
                        best, pick = score, g
            picks[at] = pick
        for at in range(start, end):
            t = order[at]
            src[t] = picks[at]
            sent[link[t], picks[at]] += 1.0
        start = end
    return src


def choose_sources(
    candidates: torch.Tensor, dst: torch.Tensor, gpus_per_node: int, rounds: int, intra: int, inter: int, from_host: int
) -> torch.Tensor:
    """candidates [T, G] bool, dst [T] on the CPU -> the source of each transfer [T] int64."""
    chosen = _choose(candidates.numpy(), dst.numpy(), gpus_per_node, rounds, intra, inter, from_host)
    return torch.from_numpy(chosen)


def warm_up() -> None:
    """Compile (or load from the disk cache) the loop, so that no request pays the first compilation."""
    choose_sources(torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, dtype=torch.int64), 1, 2, 0, 1, -1)
