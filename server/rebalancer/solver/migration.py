"""Placements that move few expert copies away from the one in force (`prev_phy2log`).

Two plans per layer compete:
* incremental: the old placement, copies unchanged, improved by single swaps between its heaviest GPU
  and another one (the swap that reaches the target shipping fewest copies, swaps.py) only until it is
  as balanced as the fresh plan allows;
* fresh: the best new plan with its GPUs relabelled to match the old ones (a greedy maximum-overlap
  matching), every expert that stays on a GPU kept in its old slot, and copies it ships without need
  swapped back (`pullback.py`) while its GPUs stay under the incremental plan's target.
The incremental plan wins when its balancedness is within `balance_tolerance` of the fresh one (and
always when the fresh one would ship more than `max_moves_per_layer` copies). Layers planned to keep
groups on one node take the fresh plan relabelled node by node, since swaps ignore node boundaries.
"""

from __future__ import annotations

import torch

from . import maps
from .blocks import in_row_blocks
from .cancel import checkpoint
from .joint import SearchEffort, copy_moves, improve_replication, moved_counts
from .maps import expert_histogram, logcnt_from_phy2log
from .pullback import pull_back
from .swaps import cheapest_swaps

ORIGINS = ("fresh", "incremental", "kept")
# Rounds of single-copy handovers tried before swaps (each ships one copy).
COPY_ROUNDS = 8
# Copy moves for layers the handovers and swaps leave above their target: in place only (a fresh repack
# would ship most copies).
IN_PLACE_EFFORT = SearchEffort(rounds=4, width=4, trials=2, fresh_trials=0, slack=5e-4)
# Trial slots (layers x moves x R) of one block of `hand_over_copies`: ~1 GB and 1.8 s between cancellation
# checkpoints on 2,749 DeepSeek-V3 layers at once, 2**21 of them about 0.1 s.
HANDOVER_BLOCK_ITEMS = 2**21


def greedy_matching(overlap: torch.Tensor) -> torch.Tensor:
    """overlap [L, n, n] (>= 0 where allowed, < 0 where forbidden) -> assignment row -> column [L, n].

    n steps, each taking every layer's largest remaining entry: near the optimum of the assignment
    problem and free of per-layer Python loops.
    """
    num_layers, size, _ = overlap.shape
    overlap = overlap.clone()
    assignment = torch.empty(num_layers, size, dtype=torch.int64, device=overlap.device)
    rows = torch.arange(num_layers, device=overlap.device)
    taken = torch.tensor(-1e30, dtype=overlap.dtype, device=overlap.device)
    for _ in range(size):
        checkpoint()
        best = overlap.view(num_layers, -1).argmax(-1)
        row, column = best // size, best % size
        assignment[rows, row] = column
        overlap[rows, row, :] = taken
        overlap[rows, :, column] = taken
    return assignment


def match_gpus(
    prev_phy2log: torch.Tensor, phy2log: torch.Tensor, num_experts: int, num_gpus: int, num_nodes: int = 1
) -> torch.Tensor:
    """Relabel the GPUs of `phy2log` [L, R] to overlap the old placement most: new GPU -> old GPU [L, G].

    With num_nodes > 1 whole nodes are matched first and GPUs only within matched nodes, so a plan
    that keeps groups on one node still does after relabelling.
    """
    new = expert_histogram(phy2log, num_experts, num_gpus, compact=True).clamp_max(1).to(torch.float32)
    old = expert_histogram(prev_phy2log, num_experts, num_gpus, compact=True).clamp_max(1).to(torch.float32)
    overlap = torch.bmm(new, old.transpose(1, 2))  # [L, G_new, G_old]
    # Ties broken towards the identity so that unchanged GPUs keep their label.
    overlap += torch.eye(num_gpus, device=overlap.device) * 1e-3
    if num_nodes > 1:
        gpus_per_node = num_gpus // num_nodes
        node_overlap = overlap.view(-1, num_nodes, gpus_per_node, num_nodes, gpus_per_node).sum((2, 4))
        node_match = greedy_matching(node_overlap)  # [L, N_new] -> N_old
        node_of_gpu = torch.arange(num_gpus, device=overlap.device) // gpus_per_node
        allowed = node_match[:, node_of_gpu].unsqueeze(2) == node_of_gpu.view(1, 1, -1)  # [L, G_new, G_old]
        overlap = torch.where(allowed, overlap, torch.full_like(overlap, -1.0))
    return greedy_matching(overlap)


def align_slots(
    prev_phy2log: torch.Tensor, phy2log: torch.Tensor, num_experts: int, num_gpus: int, num_nodes: int = 1
) -> torch.Tensor:
    """Reorder `phy2log` [L, R]: GPUs relabelled to the old ones, and within a GPU every expert that was
    already there back in its old slot (new arrivals fill the freed slots). Same placement, fewer copies."""
    num_layers, num_slots = phy2log.shape
    slots_per_gpu = num_slots // num_gpus
    assignment = match_gpus(prev_phy2log, phy2log, num_experts, num_gpus, num_nodes)
    relabelled = torch.empty_like(phy2log).view(num_layers, num_gpus, slots_per_gpu)
    relabelled.scatter_(1, assignment.unsqueeze(-1).expand(-1, -1, slots_per_gpu), phy2log.view_as(relabelled))
    return keep_old_slots(prev_phy2log, relabelled.view(num_layers, num_slots), num_gpus)


def _copy_keys(slots: torch.Tensor) -> torch.Tensor:
    """[..., K] expert ids -> [..., K] keys expert * K + k for the k-th copy of its expert in the row
    (slot order): distinct within a row, equal across rows for the same copy of the same expert."""
    num_slots = slots.shape[-1]
    experts, order = slots.sort(dim=-1, stable=True)
    positions = torch.arange(num_slots, device=slots.device).expand_as(slots)
    run_starts = torch.ones_like(slots, dtype=torch.bool)
    run_starts[..., 1:] = experts[..., 1:] != experts[..., :-1]
    first = torch.where(run_starts, positions, 0).cummax(-1).values
    copy_index = torch.empty_like(slots).scatter_(-1, order, positions - first)
    return slots * num_slots + copy_index


def keep_old_slots(prev_phy2log: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Reorder the slots within each GPU of `phy2log` [L, R] so that every expert the GPU already hosted
    stays in its old slot and new arrivals fill the freed ones, in slot order: the same placement, and a
    transfer plan without local shuffles. An expert's k-th copy on a GPU keeps the slot of its k-th old
    copy there (vLLM's `preserve_intragpu_slots` rule). Sorts per GPU: memory linear in the slots."""
    num_layers, num_slots = phy2log.shape
    slots_per_gpu = num_slots // num_gpus
    relabelled = phy2log.view(num_layers, num_gpus, slots_per_gpu)
    old_keys = _copy_keys(prev_phy2log.view(num_layers, num_gpus, slots_per_gpu))
    new_keys = _copy_keys(relabelled)
    sorted_old, old_slots = old_keys.sort(-1)
    at = torch.searchsorted(sorted_old, new_keys).clamp_max(slots_per_gpu - 1)
    matched = sorted_old.gather(-1, at) == new_keys  # [L, G, K_new]: this copy was on the GPU before
    kept_slot = old_slots.gather(-1, at)
    claimed = torch.zeros(num_layers, num_gpus, slots_per_gpu + 1, dtype=torch.bool, device=phy2log.device)
    claimed.scatter_(-1, torch.where(matched, kept_slot, slots_per_gpu), True)
    positions = torch.arange(slots_per_gpu, device=phy2log.device)
    free_slots = torch.where(claimed[..., :-1], slots_per_gpu, positions).sort(-1).values  # free first, ascending
    arrival_rank = ((~matched).cumsum(-1) - 1).clamp_min(0)
    final_slot = torch.where(matched, kept_slot, free_slots.gather(2, arrival_rank))
    aligned = torch.empty_like(relabelled).scatter_(2, final_slot, relabelled)
    return aligned.view(num_layers, num_slots)


def hand_over_copies(
    loads: torch.Tensor, phy2log: torch.Tensor, num_gpus: int, targets: torch.Tensor, rounds: int, width: int = 5
) -> torch.Tensor:
    """Turn single slots into copies of hotter experts, in place, while that lowers the max GPU load.

    Each round, per layer, tries the T x T moves of `joint.copy_moves` with the donor handing over its
    copy on its lightest GPU, and applies the best if it lowers the peak of a layer still above its
    target. One move ships one copy. loads [L, E] float64, phy2log [L, R], targets [L] -> phy2log [L, R].
    Layers go in blocks of at most HANDOVER_BLOCK_ITEMS trial slots (layers are independent problems).
    """
    block = HANDOVER_BLOCK_ITEMS // (min(width, loads.shape[1]) ** 2 * phy2log.shape[1])
    rows = {"loads": loads, "phy2log": phy2log, "targets": targets}
    return in_row_blocks(_hand_over, block, rows, num_gpus=num_gpus, rounds=rounds, width=width)


def _hand_over(
    loads: torch.Tensor, phy2log: torch.Tensor, num_gpus: int, targets: torch.Tensor, rounds: int, width: int
) -> torch.Tensor:
    """`hand_over_copies` on one block of layers. A layer that applies no move keeps its placement, so every
    later round would score the same moves and apply none: on the CPU such layers leave the rounds (on
    DeepSeek-V3 drift windows 58 layers, then ~47, ~28, ~12, ~2 of the 8 rounds), on a GPU all run masked."""
    num_slots = phy2log.shape[1]
    slot_gpu = torch.arange(num_slots, device=phy2log.device) // (num_slots // num_gpus)
    on_cpu = phy2log.device.type == "cpu"
    phy2log = phy2log.clone()
    active = torch.arange(phy2log.shape[0], device=phy2log.device)
    for _ in range(rounds):
        checkpoint()
        if not on_cpu:  # every layer, masked: the host never waits
            phy2log, _ = _hand_over_round(loads, phy2log, targets, num_gpus, slot_gpu, width)
            continue
        placed, moved = _hand_over_round(loads[active], phy2log[active], targets[active], num_gpus, slot_gpu, width)
        phy2log[active] = placed
        active = active[moved]
        if active.numel() == 0:
            break
    return phy2log


def _hand_over_round(
    loads: torch.Tensor, phy2log: torch.Tensor, targets: torch.Tensor, num_gpus: int, slot_gpu: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of `_hand_over` on rows [A]: (their placements after it [A, R], which rows moved a copy [A])."""
    num_layers, num_slots = phy2log.shape
    counts = logcnt_from_phy2log(phy2log, loads.shape[1])
    per_copy = loads / counts
    gpu_loads = per_copy.gather(1, phy2log).view(num_layers, num_gpus, -1).sum(-1)
    peak = gpu_loads.max(-1).values
    x, y, valid = copy_moves(loads, counts, width)  # [L, M]
    # The donor's copy on its lightest GPU is the one handed over.
    load_of_slot_gpu = gpu_loads.gather(1, slot_gpu.expand(num_layers, -1))  # [L, R]
    is_donor_slot = phy2log.unsqueeze(1) == y.unsqueeze(2)  # [L, M, R]
    slot = torch.where(is_donor_slot, load_of_slot_gpu.unsqueeze(1), float("inf")).argmin(-1)  # [L, M]
    moves = x.shape[1]
    trial_counts = moved_counts(counts, x, y, valid)
    trial_phy = phy2log.unsqueeze(1).repeat(1, moves, 1)
    trial_phy.scatter_(2, slot.unsqueeze(2), torch.where(valid, x, y).unsqueeze(2))
    trial_loads = (loads.unsqueeze(1) / trial_counts).gather(2, trial_phy)
    trial_peak = trial_loads.view(num_layers, moves, num_gpus, -1).sum(-1).max(-1).values
    trial_peak = torch.where(valid, trial_peak, float("inf"))
    best_peak, best = trial_peak.min(1)
    apply = (best_peak < peak * (1.0 - 1e-9)) & (peak > targets)
    chosen = trial_phy.gather(1, best.view(-1, 1, 1).expand(-1, 1, num_slots)).squeeze(1)
    return torch.where(apply.unsqueeze(1), chosen, phy2log), apply


def incremental(
    loads: torch.Tensor,
    prev_phy2log: torch.Tensor,
    num_gpus: int,
    targets: torch.Tensor,
    max_swaps: int,
    copy_rounds: int,
    reassign_copies: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The old placement improved in place: first copies handed from spare experts to hot ones (one
    copy shipped each), then single heaviest-GPU swaps (swaps.py: two copies each at most, the cheapest
    that reaches the target), then, with `reassign_copies`,
    copies moved between experts where the swaps stall, until each layer's max GPU load is at or below
    `targets` [L]. Returns (phy2log [L, R], max GPU load [L])."""
    num_layers, num_slots = prev_phy2log.shape
    phy2log = hand_over_copies(loads, prev_phy2log, num_gpus, targets, copy_rounds)
    counts = logcnt_from_phy2log(phy2log, loads.shape[1])
    phy2log = cheapest_swaps(loads / counts, prev_phy2log, phy2log, num_gpus, targets, max_swaps)
    peak = (loads / counts).gather(1, phy2log).view(num_layers, num_gpus, -1).sum(-1).max(-1).values
    # Swaps alone stall where the copy counts are wrong for the new loads: the layers still above their
    # target move copies between experts in place (one copy each), stopping as soon as they meet it.
    short = (peak > targets * (1.0 + 1e-9)).nonzero().squeeze(1)
    if reassign_copies and short.numel():
        moved, moved_peak = improve_replication(
            loads[short], phy2log[short], peak[short], num_gpus, effort=IN_PLACE_EFFORT, target=targets[short]
        )
        phy2log, peak = phy2log.index_copy(0, short, moved), peak.index_copy(0, short, moved_peak)
    return phy2log, peak


def migrate(
    loads: torch.Tensor,
    prev_phy2log: torch.Tensor,
    fresh_phy2log: torch.Tensor,
    fresh_peak: torch.Tensor,
    num_gpus: int,
    balance_tolerance: float,
    max_moves_per_layer: int | None,
    local_layers: torch.Tensor,
    num_groups: int,
    num_nodes: int,
    incremental_budget: int = 128,
) -> tuple[torch.Tensor, list[str]]:
    """Choose, per layer, between the incremental plan and the aligned fresh plan (see module doc).

    loads [L, E] float64, prev/fresh phy2log [L, R], fresh_peak [L], local_layers [L] bool (layers whose
    fresh plan keeps groups on one node: they take the fresh plan relabelled node by node, since the
    incremental swaps ignore node boundaries) -> (phy2log [L, R], origin per layer). Without a move cap
    the incremental plan may ship up to `incremental_budget` copies per layer.
    """
    num_experts = loads.shape[1]
    mean = loads.sum(-1) / num_gpus
    fresh_balance = mean / fresh_peak.clamp_min(1e-300)
    allowed_peak = mean / (fresh_balance - balance_tolerance).clamp_min(1e-6)
    budget = incremental_budget if max_moves_per_layer is None else max_moves_per_layer
    copy_rounds = min(COPY_ROUNDS, budget)
    swaps = (budget - copy_rounds) // 2
    # Copy moves ship an unbounded number of copies per layer, so they run only without a move cap.
    kept, kept_peak = incremental(
        loads, prev_phy2log, num_gpus, allowed_peak, swaps, copy_rounds, reassign_copies=max_moves_per_layer is None
    )
    aligned = align_slots(prev_phy2log, fresh_phy2log, num_experts, num_gpus)
    if bool(local_layers.any()):
        aligned_local = align_slots(prev_phy2log, fresh_phy2log, num_experts, num_gpus, num_nodes)
        aligned = torch.where(local_layers.unsqueeze(1), aligned_local, aligned)
    use_kept = (kept_peak <= allowed_peak * (1.0 + 1e-9)) & ~local_layers
    phy2log = torch.where(use_kept.unsqueeze(1), kept, aligned)
    # A fresh layer ships copies it does not need: swapped back while every GPU stays under the allowed
    # peak (drift series: 3.8 % fewer copies in all, next-window balancedness unchanged within noise).
    fresh_layers = (~use_kept & ~local_layers).nonzero().squeeze(1)
    if fresh_layers.numel():
        pulled = pull_back(
            loads[fresh_layers], phy2log[fresh_layers], prev_phy2log[fresh_layers], num_gpus, allowed_peak[fresh_layers]
        )
        phy2log = phy2log.index_copy(0, fresh_layers, pulled)
    origins = torch.where(use_kept, 1, 0)
    if max_moves_per_layer is not None:
        # The cap is a hard limit: over it, take the incremental plan, or for a layer that must keep its
        # groups on one node and whose incremental plan does not, the placement in force unchanged.
        over = maps.moved_copies(prev_phy2log, phy2log, num_experts, num_gpus) > max_moves_per_layer
        breaks_locality = local_layers & ~groups_on_one_node(kept, num_experts, num_groups, num_nodes)
        fallback = torch.where(breaks_locality.unsqueeze(1), prev_phy2log, kept)
        phy2log = torch.where(over.unsqueeze(1), fallback, phy2log)
        origins = torch.where(over, torch.where(breaks_locality, 2, 1), origins)
    return phy2log, [ORIGINS[origin] for origin in origins.tolist()]


def groups_on_one_node(phy2log: torch.Tensor, num_experts: int, num_groups: int, num_nodes: int) -> torch.Tensor:
    """Whether every group's copies sit on a single node, per layer: [L] bool."""
    num_layers, num_slots = phy2log.shape
    group_of_slot = phy2log // (num_experts // num_groups)
    node_of_slot = torch.arange(num_slots, device=phy2log.device) // (num_slots // num_nodes)
    hosted = torch.zeros(num_layers, num_groups * num_nodes, dtype=torch.int64, device=phy2log.device)
    hosted.scatter_add_(1, group_of_slot * num_nodes + node_of_slot, torch.ones_like(phy2log))
    return ((hosted.view(num_layers, num_groups, num_nodes) > 0).sum(-1) <= 1).all(-1)
