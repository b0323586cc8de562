"""`pullback.best_partners` on the CPU, compiled with Numba.

A pull-back round scores every shipped-in slot against every slot of its layer: as tensor ops, ~25 passes
over [A, M, R] arrays (a DeepSeek-V3 layer taken fresh: 260 x 288 a round), most of them on pairs that
cannot save a copy. Compiled, a pair is a few lookups, left at the first failed condition. The float steps
are the tensor path's in its order, and the first best partner wins among equals, so both pick alike.
"""

from __future__ import annotations

import numpy as np
import torch

from .jit import compiled


def best_partners(state: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """`pullback.best_partners` for a `pullback.RoundState` of CPU tensors -> (score [A, M] float64,
    partner slot [A, M] int64)."""
    *arrays, slots_per_gpu, load_tie = state
    rows, width = state.moved_in.shape
    score, partner = np.empty((rows, width)), np.empty((rows, width), dtype=np.int64)
    _best_partners(*(np.ascontiguousarray(array.numpy()) for array in arrays), slots_per_gpu, load_tie, score, partner)
    return torch.from_numpy(score), torch.from_numpy(partner)


@compiled()
def _best_partners(
    phy, had, hosts, slot_load, gpu_load, kept, moved_in, targets, slots_per_gpu, load_tie, score, partner
):
    """Fill score / partner [A, M]: for shipped-in slot s on GPU g, the slot t on another GPU h whose swap
    saves most copies (g held t's expert before, h held s's, t's copy was not kept), neither GPU hosting
    the other's expert already and both within the target, ties to the lower busier-GPU load, then to t."""
    num_rows, num_slots = phy.shape
    for row in range(num_rows):
        cap = targets[row]
        for rank in range(moved_in.shape[1]):
            s = moved_in[row, rank]
            g, expert_s, moved_load = s // slots_per_gpu, phy[row, s], slot_load[row, s]
            best, best_t = -np.inf, 0
            if not kept[row, s]:
                for t in range(num_slots):
                    h, expert_t = t // slots_per_gpu, phy[row, t]
                    if h == g or hosts[row, g, expert_t] or hosts[row, h, expert_s]:
                        continue
                    saved = np.int64(had[row, g, expert_t]) + np.int64(had[row, h, expert_s]) - np.int64(kept[row, t])
                    if saved <= 0:
                        continue
                    source_after = gpu_load[row, g] - moved_load + slot_load[row, t]
                    partner_after = gpu_load[row, h] - slot_load[row, t] + moved_load
                    if source_after <= cap and partner_after <= cap:
                        value = np.float64(saved) - load_tie * max(source_after, partner_after) / cap
                        if value > best:
                            best, best_t = value, t
            score[row, rank], partner[row, rank] = best, best_t
