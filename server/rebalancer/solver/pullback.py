"""Swap copies back towards the placement in force while every GPU stays under its target.

A plan built by moves (elastic.py's re-hosting and shedding) or taken fresh (a layer no move could
balance) ships copies that a later look shows to be unnecessary: two GPUs can often exchange a copy so
that one or both land on a GPU that held them before, at loads both GPUs can take. Each round, per
layer, scores every swap of a copy that was shipped in (slot s on GPU g) with any slot t on another
GPU h; the swap ships `keep_t - had(g, t) - had(h, s)` more copies (had: the old placement hosted that
expert on that GPU), so -2 or -1 where it helps, and the best one whose two GPUs stay at or under the
target (fewest copies, then the lower of the two loads) is applied. Copy counts never change, so no
other GPU's load does. On drifting windows the incremental plan only ships copies it needs (pulling
its copies back up to its peak measured worse on the next window), so there only the layers taken
fresh use this. The scoring runs compiled on the CPU (`host_pullback`), as tensor ops elsewhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import host_pullback
from .blocks import in_row_blocks
from .cancel import checkpoint
from .maps import expert_histogram, logcnt_from_phy2log

# Weight of the busier of the two GPUs (over its target) beside the copies a swap saves.
LOAD_TIE = 1e-3
# Swaps on disjoint GPU pairs one round may apply per layer: at least this many, and one per this many
# GPUs on wide layouts (a property of the shape, so a layer's choice does not depend on its batch). 50
# layers of 394 experts on 144 GPUs x 3 slots, all taken fresh: 7.6 s at 8 a round, 3.2 s at 36.
SWAPS_PER_ROUND = 8
GPUS_PER_SWAP = 4


def swaps_per_round(num_gpus: int) -> int:
    """How many swaps one round applies per layer on G GPUs."""
    return max(SWAPS_PER_ROUND, num_gpus // GPUS_PER_SWAP)


# Layers scored together (the swap scores are [PULL_ROWS, M, R]).
PULL_ROWS = 32


def pull_back(
    loads: torch.Tensor, phy2log: torch.Tensor, before: torch.Tensor, num_gpus: int, targets: torch.Tensor
) -> torch.Tensor:
    """loads [L, E] float64, phy2log [L, R], before [L, R] what each slot held (-1: a new GPU, nothing),
    targets [L] max GPU loads -> phy2log [L, R] shipping fewer copies, each GPU's load at or under
    max(its load, target). Rounds: until no swap saves a copy (each saves at least one, so at most R).
    Layers go in blocks of `PULL_ROWS`: memory O(PULL_ROWS * M * R), M the most copies shipped into a
    layer.
    """
    if phy2log.shape[0] == 0:
        return phy2log.clone()
    rows = {"loads": loads, "phy2log": phy2log, "before": before, "targets": targets}
    return in_row_blocks(_pull_back_block, PULL_ROWS, rows, num_gpus=num_gpus)


def _pull_back_block(
    loads: torch.Tensor, phy2log: torch.Tensor, before: torch.Tensor, num_gpus: int, targets: torch.Tensor
) -> torch.Tensor:
    """`pull_back` on one block of layers."""
    num_layers, num_slots = phy2log.shape
    num_experts = loads.shape[1]
    slots_per_gpu = num_slots // num_gpus
    device = phy2log.device
    slot_gpu = torch.arange(num_slots, device=device) // slots_per_gpu
    swaps = swaps_per_round(num_gpus)
    old = torch.where(before < 0, num_experts, before)
    had = expert_histogram(old, num_experts + 1, num_gpus, compact=True)[..., :num_experts] > 0  # [L, G, E]
    per_copy = loads / logcnt_from_phy2log(phy2log, num_experts).clamp_min(1)
    phy2log = phy2log.clone()
    active = torch.arange(num_layers, device=device)
    for _ in range(num_slots):
        checkpoint()
        phy, layer_had = phy2log[active], had[active]
        rows = active.numel()
        slot_load = per_copy[active].gather(1, phy)
        gpu_load = slot_load.view(rows, num_gpus, slots_per_gpu).sum(-1)
        hosts = expert_histogram(phy, num_experts, num_gpus, compact=True) > 0
        had_slot = layer_had.gather(2, phy.unsqueeze(1).expand(-1, num_gpus, -1))  # [A, G, R]: g held t's expert
        kept = had_slot.gather(1, slot_gpu.view(1, 1, -1).expand(rows, 1, -1)).squeeze(1)  # [A, R]
        shipped = (~kept).sum(1)
        width = int(shipped.max())
        if width == 0:
            break
        # Shipped-in slots first in slot order (so a layer's choice does not depend on its batch), the
        # rest padded with kept slots, which no swap below can use.
        moved_in = kept.to(torch.int8).sort(dim=1, stable=True).indices[:, :width]  # [A, M]
        state = RoundState(
            phy, layer_had, hosts, slot_load, gpu_load, kept, moved_in, targets[active], slots_per_gpu, LOAD_TIE
        )
        per_slot, partner = (host_pullback.best_partners if device.type == "cpu" else best_partners)(state)
        # Swaps on disjoint GPU pairs do not interact: each round applies the best swap of each of the
        # `swaps` best shipped-in slots whose GPUs no better-ranked one of them touches.
        if width < swaps:  # a fixed K, so that a layer's choice does not depend on its batch
            pad = swaps - width
            per_slot = torch.cat([per_slot, per_slot.new_full((rows, pad), -torch.inf)], 1)
            partner, moved_in = (torch.cat([t, t.new_zeros(rows, pad)], 1) for t in (partner, moved_in))
        best, rank = per_slot.sort(dim=1, descending=True, stable=True)
        best, rank = best[:, :swaps], rank[:, :swaps]  # [A, K]
        first = moved_in.gather(1, rank)
        second = partner.gather(1, rank)
        pair = torch.stack([slot_gpu[first], slot_gpu[second]], 2)  # [A, K, 2]
        shares = (pair.unsqueeze(2).unsqueeze(4) == pair.unsqueeze(1).unsqueeze(3)).flatten(3).any(3)  # [A, K, K]
        earlier = torch.ones_like(shares[0]).tril(-1)
        apply = (best > -torch.inf) & ~(shares & earlier & (best > -torch.inf).unsqueeze(1)).any(2)
        found = apply.any(1)
        if not bool(found.any()):
            break
        layer, which = apply.nonzero(as_tuple=True)
        layer_id = active[layer]
        first, second = first[layer, which], second[layer, which]
        first_expert = phy2log[layer_id, first]
        phy2log[layer_id, first] = phy2log[layer_id, second]
        phy2log[layer_id, second] = first_expert
        active = active[found]
    return phy2log


class RoundState(NamedTuple):
    """What a round scores swap partners from, for the active layers [A]: both scorers take it."""

    phy: torch.Tensor  # [A, R] the placement now
    had: torch.Tensor  # [A, G, E] bool: the old placement hosted e on g
    hosts: torch.Tensor  # [A, G, E] bool: the placement now does
    slot_load: torch.Tensor  # [A, R] float64
    gpu_load: torch.Tensor  # [A, G] float64
    kept: torch.Tensor  # [A, R] bool: the slot's copy was on its GPU before
    moved_in: torch.Tensor  # [A, M] the shipped-in slots, padded with kept ones
    targets: torch.Tensor  # [A] max GPU loads
    slots_per_gpu: int
    load_tie: float  # weight of the busier GPU's load beside the copies saved


def best_partners(state: RoundState) -> tuple[torch.Tensor, torch.Tensor]:
    """For each shipped-in slot s [A, M] its best swap partner t: (score [A, M], t [A, M]), -inf and 0 where
    none saves a copy within the target. As tensor ops (a GPU's path; the CPU's is
    `host_pullback.best_partners`, the same scores)."""
    phy, had, hosts, slot_load, gpu_load, kept, moved_in, targets, slots_per_gpu, load_tie = state
    rows, num_slots = phy.shape
    num_gpus, width = gpu_load.shape[1], moved_in.shape[1]
    slot_gpu = torch.arange(num_slots, device=phy.device) // slots_per_gpu
    cap = targets.view(-1, 1, 1)
    by_slot = phy.unsqueeze(1).expand(-1, num_gpus, -1)
    had_slot, hosts_slot = had.gather(2, by_slot), hosts.gather(2, by_slot)  # [A, G, R]
    usable = ~kept.gather(1, moved_in)
    source_gpu = slot_gpu[moved_in]  # [A, M]
    gather_gpu = source_gpu.unsqueeze(2).expand(-1, -1, num_slots)
    gets_back = had_slot.gather(1, gather_gpu)  # [A, M, R]: g held t's expert before
    crowded = hosts_slot.gather(1, gather_gpu)  # g hosts t's expert already
    by_moved = phy.gather(1, moved_in).unsqueeze(1).expand(-1, num_gpus, -1)
    partner_gpu = slot_gpu.view(1, -1, 1).expand(rows, -1, width)
    returns = had.gather(2, by_moved).gather(1, partner_gpu).transpose(1, 2)  # h held s's expert
    partner_crowded = hosts.gather(2, by_moved).gather(1, partner_gpu).transpose(1, 2)
    # Copies the swap saves, in {-1, ..., 2}: int8 (the [A, M, R] tensors here are the round's cost).
    saved = gets_back.to(torch.int8) + returns.to(torch.int8) - kept.unsqueeze(1).to(torch.int8)
    moved_load = slot_load.gather(1, moved_in).unsqueeze(2)
    source_after = gpu_load.gather(1, source_gpu).unsqueeze(2) - moved_load + slot_load.unsqueeze(1)
    partner_after = gpu_load.gather(1, slot_gpu.expand(rows, -1)).unsqueeze(1) - slot_load.unsqueeze(1) + moved_load
    fits = (source_after <= cap) & (partner_after <= cap)
    allowed = usable.unsqueeze(2) & ~crowded & ~partner_crowded & (source_gpu.unsqueeze(2) != slot_gpu) & fits
    score = torch.where(
        allowed & (saved > 0), saved - load_tie * torch.maximum(source_after, partner_after) / cap, -torch.inf
    )
    return score.max(2)  # the first best partner among equals
