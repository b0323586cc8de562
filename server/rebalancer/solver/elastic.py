"""Elastic expert parallelism: plan on the GPUs that exist now, from the placement in force.

Two changes of the GPU set, one mechanism. Failed GPUs (`unavailable_gpus`) leave the healthy ones with
their slots per GPU unchanged (S x healthy slots per layer); a new GPU count G' (whole nodes added or
removed at the end) keeps GPUs 0 .. min(G, G') - 1. Either way the new layout is a list of GPU ids
(`gpu_ids` [G_new], ids of the old numbering; ids past the old count are new GPUs), and:

1. every surviving GPU keeps its copies in their slots; slots of new GPUs start empty;
2. as many copies as the change took away or added are given back, one per round to the expert with the
   highest load per copy (experts left without any first): into an empty slot while there is one, else
   into the slot of a spare copy where that hurts least (`restore_copies`);
3. that seed placement is improved like any placement in force (`migration.migrate`: copy handovers and
   swaps until within the balance tolerance of a fresh plan on the new GPUs, else the fresh plan
   relabelled to overlap it most).
Step 2 loops over rounds bounded by the removed or added slots; every step is batched over layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from rebalancer_wire.options import ArgumentError

from .maps import expert_histogram, logcnt_from_phy2log
from .migration import migrate
from .planner import plan
from .transfers import old_content

ELASTIC_SWAPS_PER_GPU = 8


def elastic_gpu_ids(
    num_gpus: int,
    num_nodes: int,
    unavailable_gpus: Sequence[int] | None,
    new_num_gpus: int | None,
) -> torch.Tensor:
    """Validate the change of GPU set and return the new layout's GPU ids [G_new] (int64, CPU).

    Raises ArgumentError naming `unavailable_gpus` (unknown or repeated ids, none left) or `new_num_gpus`
    (not a positive multiple of the GPUs per node), and when both are given.
    """
    if unavailable_gpus is not None and new_num_gpus is not None:
        raise ArgumentError("unavailable_gpus", "cannot be combined with new_num_gpus: give one change of the GPU set")
    gpus_per_node = num_gpus // num_nodes
    if new_num_gpus is not None:
        if isinstance(new_num_gpus, bool) or not isinstance(new_num_gpus, int) or new_num_gpus < 1:
            raise ArgumentError("new_num_gpus", f"must be a positive integer, got {new_num_gpus!r}")
        if new_num_gpus % gpus_per_node:
            raise ArgumentError(
                "new_num_gpus",
                f"({new_num_gpus}) must be a multiple of the GPUs per node ({gpus_per_node}): scale by whole nodes",
            )
        return torch.arange(new_num_gpus)
    ids = list(unavailable_gpus or [])
    if any(isinstance(g, bool) or not isinstance(g, int) for g in ids):
        raise ArgumentError("unavailable_gpus", f"must be GPU ids (integers), got {ids!r}")
    unknown = sorted({g for g in ids if not 0 <= g < num_gpus})
    if unknown:
        raise ArgumentError("unavailable_gpus", f"names unknown GPU ids {unknown}: ids are in [0, {num_gpus})")
    if len(set(ids)) != len(ids):
        raise ArgumentError("unavailable_gpus", f"repeats GPU ids: {ids}")
    healthy = sorted(set(range(num_gpus)) - set(ids))
    if not healthy:
        raise ArgumentError("unavailable_gpus", "leaves no GPU to plan on")
    return torch.tensor(healthy, dtype=torch.int64)


def restore_copies(loads: torch.Tensor, seed: torch.Tensor, num_gpus: int, rounds: int) -> torch.Tensor:
    """Give back the copies the change of GPU set took or added (steps 2 and 3), one per layer and round.

    Each round the expert with the highest load per copy (first those without any) gains a copy: in an
    empty slot while there is one (the lightest GPU's), else in the slot of a spare copy (an expert with
    two or more) where the larger of the GPU's resulting load and the donor's busiest host after the
    rise of its copies is lowest.
    loads [L, E], seed [L, R] with empty slots marked E -> seed [L, R] without empty slots, every expert
    hosted, provided `rounds` covers the empty slots and the experts without a copy.
    """
    num_layers, num_slots = seed.shape
    num_experts = loads.shape[1]
    device = seed.device
    slot_gpu = torch.arange(num_slots, device=device) // (num_slots // num_gpus)
    slots = torch.arange(num_slots, device=device)
    padded = torch.cat([loads, torch.zeros_like(loads[:, :1])], 1)
    for _ in range(rounds):
        counts = logcnt_from_phy2log(seed, num_experts + 1)
        slot_counts = counts.gather(1, seed)
        slot_loads = (padded / counts.clamp_min(1)).gather(1, seed)
        empty = seed == num_experts
        per_copy = torch.where(counts[:, :num_experts] > 0, loads / counts[:, :num_experts].clamp_min(1), math.inf)
        expert = per_copy.argmax(1, keepdim=True)  # [L, 1]
        gpu_loads = torch.zeros(num_layers, num_gpus, dtype=loads.dtype, device=device)
        gpu_loads.index_add_(1, slot_gpu, slot_loads)
        arriving = loads.gather(1, expert) / (counts.gather(1, expert) + 1)
        donor_rise = padded.gather(1, seed) / (slot_counts - 1).clamp_min(1) - slot_loads
        at_slot_gpu = gpu_loads[:, slot_gpu]
        # The donor's busiest host (this slot's GPU aside, approximately) carries the rise of its copies.
        donor_peak = torch.zeros_like(padded).scatter_reduce(1, seed, at_slot_gpu, "amax").gather(1, seed)
        score = torch.maximum(
            at_slot_gpu - slot_loads + arriving, torch.where(empty, -math.inf, donor_peak + donor_rise)
        )
        allowed = torch.where(empty.any(1, keepdim=True), empty, (slot_counts > 1) & (seed != expert))
        slot = torch.where(allowed, score, math.inf).argmin(1, keepdim=True)
        todo = allowed.any(1, keepdim=True) & (empty.any(1, keepdim=True) | (per_copy.amax(1, keepdim=True) > 0))
        seed = torch.where(todo & (slots == slot), expert, seed)
    return seed


def plan_elastic(
    loads: torch.Tensor,
    prev_phy2log: torch.Tensor,
    slots_per_gpu: int,
    gpu_ids: torch.Tensor,
    layer_seeds: torch.Tensor,
    num_candidates: int,
    balance_tolerance: float,
) -> tuple[torch.Tensor, list[str]]:
    """loads [L, E] float64, prev_phy2log [L, R_old], gpu_ids [G_new] -> (phy2log [L, S * G_new], the
    origin of each layer's plan: "incremental" or "fresh")."""
    num_layers, num_experts = loads.shape
    num_gpus = gpu_ids.numel()
    num_slots = slots_per_gpu * num_gpus
    seed = old_content(prev_phy2log, slots_per_gpu, gpu_ids)
    seed = torch.where(seed < 0, num_experts, seed)
    lost = prev_phy2log.shape[1] - int((seed < num_experts).sum(1).min())  # copies gone per layer, at most
    seed = restore_copies(loads, seed, num_gpus, max(lost, int((seed == num_experts).sum(1).max())))
    fresh, fresh_peak = plan(loads, num_slots, num_gpus, layer_seeds, num_candidates)
    no_locality = torch.zeros(num_layers, dtype=torch.bool, device=loads.device)
    # A changed GPU set needs swaps on most GPUs (each receives or sheds about |G - G_new| / G of its
    # load), more than a drifting window does: the incremental plan may take a few per GPU.
    budget = ELASTIC_SWAPS_PER_GPU * num_gpus
    return migrate(loads, seed, fresh, fresh_peak, num_gpus, balance_tolerance, None, no_locality, 1, 1, budget)


def elastic_moves(
    prev_phy2log: torch.Tensor, phy2log: torch.Tensor, num_experts: int, slots_per_gpu: int, gpu_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies each layer ships, per GPU of the new layout counting the experts it did not host before
    (everything, on a new GPU), and copies kept in place: ([L], [L]) int64."""
    before = old_content(prev_phy2log, slots_per_gpu, gpu_ids)
    before = torch.where(before < 0, num_experts, before)
    num_gpus = gpu_ids.numel()
    new = expert_histogram(phy2log, num_experts + 1, num_gpus)
    old = expert_histogram(before, num_experts + 1, num_gpus)[..., :num_experts]
    new = new[..., :num_experts]
    return (new - old).clamp_min(0).sum((1, 2)), torch.minimum(new, old).sum((1, 2))
