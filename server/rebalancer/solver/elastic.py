"""Elastic expert parallelism: plan on the GPUs that exist now, from the placement in force.

Two changes of the GPU set, one mechanism. Failed GPUs (`unavailable_gpus`) leave the healthy ones with
their slots per GPU unchanged (S x healthy slots per layer); a new GPU count G' (whole nodes added or
removed at the end) keeps GPUs 0 .. min(G, G') - 1. Either way the new layout is a list of GPU ids
(`gpu_ids` [G_new], ids of the old numbering; ids past the old count are new GPUs), and:

1. every surviving GPU keeps its copies in their slots; copies on removed GPUs are dropped (an expert
   that keeps another copy needs nothing shipped: its other copies take its load);
2. slots of new GPUs are filled, one per round, by the expert with the highest load per copy
   (`fill_empty_slots`);
3. every expert left without a copy takes the slot of a spare copy of another expert, directly or by
   a two-copy chain through a GPU it relieves (`shedding.rehost_by_chains`);
4. a bounded number of moves then sheds load from the GPUs over the target, most excess removed per
   shipped copy first (`shedding.shed_excess`), or swaps copies, the cheapest swap that reaches the
   target first (`swaps.cheapest_swaps`), the target being the max GPU load within the balance
   tolerance of a fresh plan on the new GPU set. Steps 3-4 run under a few weightings of shipped
   copies against GPUs left over the target, batched, and each layer keeps its cheapest plan that
   meets the target (`best_repair`);
5. layers still over it go on like any placement in force (`migration.migrate`: copy handovers and swaps,
   else the fresh plan relabelled to overlap it most);
6. swaps then take back the copies shipped without need (`pullback.pull_back`), every GPU staying
   under the target: on a layer that had to take the fresh plan they return most of its copies.
Steps 2-4 and 6 loop over rounds bounded by the slots added, the experts left homeless, the move budget
and the copies shipped; every step is batched over layers.

On DeepSeek-V3 prefill (58 layers, 256 experts, 288 slots on 32 GPUs, zipf loads) losing one GPU ships
about 33 copies per layer (the lost GPU held 9) at the 0.01 tolerance: the 31 GPUs must end within
about 1 % of their target, so nearly every GPU has to receive a copy; benchmarks/migration_bench.py.
Better plans exist (seed 21, GPU 5 lost): a per-layer MILP in HiGHS, each expert's copy count within one
of this plan's or of its surviving copies, ships 21 copies on layer 1 where this ships 31 (bound 13) and
bounds layer 0 at 18 or more within that menu (this: 36), at 2 minutes a layer. Simulated annealing over
copy changes and swaps, started from this plan, gained little (45.3 -> 38.3 copies a layer on layers 0-3
at 10**6 steps, ~0.1 s a layer; nothing on layer 1 after 10**7 steps), so neither is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from rebalancer_wire.options import ArgumentError

from .blocks import in_row_blocks
from .cancel import checkpoint
from .maps import expert_histogram, logcnt_from_phy2log
from .migration import migrate
from .planner import plan
from .pullback import pull_back
from .shedding import rehost_by_chains, shed_excess
from .swaps import cheapest_swaps
from .transfers import old_content

# A changed GPU set needs moves on most GPUs (each receives or sheds about |G - G_new| / G of its load),
# more than a drifting window does: the shedding and then the incremental plan may ship a few per GPU.
ELASTIC_MOVES_PER_GPU = 8
# (cost of a shipped copy, cost of each GPU left over the target), in mean GPU loads of the layer, of
# the re-hosting tries kept per layer by `best_repair`: no one weighting suits every layer. The last one
# prices copies so high that no chain is taken. On DeepSeek-V3 prefill losing one of 32 GPUs (zipf
# seeds 21, 22) the first alone ships 42.3 / 44.0 copies per layer, all five 38.1 / 37.8 (with the
# cheapest swaps beside the shedding, 33.3 / 32.5).
REPAIR_WEIGHTS = ((0.1, 0.0), (0.1, 0.02), (0.05, 0.05), (0.0, 0.02), (1e3, 0.0))
# Rows re-hosted together.
REPAIR_ROWS = 128
# Rows shed together: a shedding round costs ~0.6 ms a row (DeepSeek-V3 prefill), so a block stays well
# under a second between cancellation checkpoints (all 13,745 rows of 2,749 layers at once: 7.9 s).
SHED_ROWS = 512


# Caps a plan on a changed GPU set cannot honour (every expert must find a home on the GPUs there are, so a
# cap would be exceeded, not met): refused with either change, by the library and the service alike.
REFUSED_CAPS = ("max_moves_per_layer", "max_transfer_seconds", "max_incoming_copies_per_gpu")


def refused_caps_reason(settings: object) -> str | None:
    """Why `settings` (solve settings) cannot go with a change of the GPU set, or None when they can."""
    caps = [name for name in REFUSED_CAPS if getattr(settings, name) is not None]
    return f"cannot be combined with {', '.join(caps)}: every expert must be hosted" if caps else None


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


def fill_empty_slots(loads: torch.Tensor, seed: torch.Tensor, num_gpus: int, rounds: int) -> torch.Tensor:
    """Fill the slots of new GPUs, one per layer and round: the expert with the highest load per copy gains
    a copy in an empty slot of the lightest GPU that has one.

    loads [L, E], seed [L, R] with empty slots marked E -> seed [L, R]; `rounds` covers the empty slots.
    """
    num_layers, num_slots = seed.shape
    num_experts = loads.shape[1]
    slot_gpu = torch.arange(num_slots, device=seed.device) // (num_slots // num_gpus)
    slots = torch.arange(num_slots, device=seed.device)
    padded = torch.cat([loads, torch.zeros_like(loads[:, :1])], 1)
    for _ in range(rounds):
        checkpoint()
        counts = logcnt_from_phy2log(seed, num_experts + 1)
        empty = seed == num_experts
        slot_loads = (padded / counts.clamp_min(1)).gather(1, seed)
        gpu_loads = torch.zeros(num_layers, num_gpus, dtype=loads.dtype, device=seed.device)
        gpu_loads.index_add_(1, slot_gpu, slot_loads)
        expert = (loads / counts[:, :num_experts].clamp_min(1)).argmax(1, keepdim=True)  # [L, 1]
        slot = torch.where(empty, gpu_loads[:, slot_gpu], math.inf).argmin(1, keepdim=True)
        seed = torch.where(empty.any(1, keepdim=True) & (slots == slot), expert, seed)
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
    fresh, fresh_peak = plan(loads, num_slots, num_gpus, layer_seeds, num_candidates)
    empty = int((seed == num_experts).sum(1).max())
    if empty:
        seed = fill_empty_slots(loads, seed, num_gpus, empty)
    mean = loads.sum(-1) / num_gpus
    targets = mean / (mean / fresh_peak.clamp_min(1e-300) - balance_tolerance).clamp_min(1e-6)
    budget = ELASTIC_MOVES_PER_GPU * num_gpus
    before = old_content(prev_phy2log, slots_per_gpu, gpu_ids)
    seed = best_repair(loads, seed, before, num_gpus, targets, budget)
    no_locality = torch.zeros(num_layers, dtype=torch.bool, device=loads.device)
    # Layers the shedding left short continue with the migration's swaps and copy moves, else take the
    # fresh plan relabelled; either way swaps then take back the copies shipped without need.
    phy2log, origins = migrate(
        loads, seed, fresh, fresh_peak, num_gpus, balance_tolerance, None, no_locality, 1, 1, budget
    )
    return pull_back(loads, phy2log, before, num_gpus, targets), origins


def best_repair(
    loads: torch.Tensor,
    seed: torch.Tensor,
    before: torch.Tensor,
    num_gpus: int,
    targets: torch.Tensor,
    budget: int,
) -> torch.Tensor:
    """Re-host the homeless experts once per weighting of `REPAIR_WEIGHTS`, then shed the excess or swap
    towards the target, all tries of all layers as one batch, and keep per layer the plan that meets its
    target with fewest shipped copies (else the one left least over it).

    loads [L, E] float64, seed [L, R] (every slot holding an expert), before [L, R] what each slot held
    (-1 on new GPUs), targets [L] -> [L, R]. Layers without a homeless expert run one weighting only.
    """
    num_layers, num_experts = loads.shape
    homeless = bool((logcnt_from_phy2log(seed, num_experts) == 0).any())
    weights = torch.tensor(REPAIR_WEIGHTS if homeless else REPAIR_WEIGHTS[:1], dtype=loads.dtype, device=loads.device)
    tries = weights.shape[0]
    mean = loads.sum(-1) / num_gpus
    all_loads, all_targets = loads.repeat(tries, 1), targets.repeat(tries)
    move_cost = (weights[:, :1] * mean).flatten()
    over_cost = (weights[:, 1:] * mean).flatten()
    # Row blocks bound the chain scoring's memory (REPAIR_ROWS x FREED_SLOTS x R) and the shedding's rounds.
    per_try = {"loads": all_loads, "targets": all_targets}
    chains = {**per_try, "seed": seed.repeat(tries, 1), "move_cost": move_cost, "over_cost": over_cost}
    repaired = in_row_blocks(rehost_by_chains, REPAIR_ROWS, chains, num_gpus=num_gpus)
    shed = in_row_blocks(shed_excess, SHED_ROWS, {**per_try, "phy2log": repaired}, num_gpus=num_gpus, budget=budget)
    # The same re-hosted plans brought to the target by the migration's cheapest swaps instead: the better
    # of the two differs by layer (losing one of 32 DeepSeek-V3 GPUs: 38.1 -> 33.3 copies a layer).
    copy_loads = all_loads / logcnt_from_phy2log(repaired, num_experts).clamp_min(1)
    swapped = cheapest_swaps(copy_loads, before.repeat(tries, 1), repaired, num_gpus, all_targets, budget // 2)
    repaired, tries = torch.cat([shed, swapped]), 2 * tries
    all_loads, all_targets = all_loads.repeat(2, 1), all_targets.repeat(2)
    counts = logcnt_from_phy2log(repaired, num_experts)
    peak = (all_loads / counts).gather(1, repaired).view(tries * num_layers, num_gpus, -1).sum(-1).amax(-1)
    before = torch.where(before < 0, num_experts, before).repeat(tries, 1)
    new = expert_histogram(repaired, num_experts + 1, num_gpus)
    moved = (new - expert_histogram(before, num_experts + 1, num_gpus)).clamp_min(0).sum((1, 2))
    over = (peak / all_targets - 1.0).clamp_min(0)
    # Meeting the target comes first, then fewer copies; the shortfall orders the rest.
    score = torch.where(over > 1e-9, over + moved.to(loads.dtype) + 1e9, moved.to(loads.dtype))
    best = score.view(tries, num_layers).argmin(0)
    return repaired.view(tries, num_layers, -1)[best, torch.arange(num_layers, device=loads.device)]


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
