"""Bring a placement under a max GPU load per layer with as few shipped copies as possible.

Used where the GPU set changed (elastic.py). Homeless experts are re-hosted first
(`rehost_by_chains`). After a GPU is lost and its homeless experts re-hosted,
about half of the GPUs are over the target at once (15 of 31 on DeepSeek-V3 zipf loads), so the
objective is the excess over the target, sum over GPUs of max(0, load - target): zero exactly when the
layer's max GPU load meets it, and, unlike the peak alone, it credits a move that fixes any GPU over
the target, not only the heaviest. Each round, per layer, scores two kinds of moves around the
`SOURCE_GPUS` heaviest GPUs and applies the one that removes most excess per shipped copy:

* a swap of a slot on such a GPU with a slot of one of the `PARTNER_GPUS` lightest GPUs (two copies;
  only the two GPUs change);
* a handover (one copy): a slot changes expert, x in place of y (y keeps a copy elsewhere), so every
  copy of x gets lighter and every other copy of y heavier. Either the slot is on a source GPU and x
  is one of the hottest experts per copy, or x is hosted on a source GPU and the slot is one of the
  spare copies on the lightest GPUs.

A layer stops when it meets its target, when nothing lowers its excess, or when its copy budget is
spent. Everything is batched over layers; finished layers leave the batch (on a GPU they stay in it,
masked, and the host checks for the end every few rounds only).

Drifting windows keep the migration's peak-driven swaps (migration.py): this search shipped 16 % fewer
copies there at the same last-window balance, but stopping every GPU right at the target cost 0.0025
next-window balancedness (DeepSeek-V3, drift seed 21), which a placement in force cannot afford.
"""

from __future__ import annotations

import torch

from .cancel import checkpoint
from .maps import expert_histogram, logcnt_from_phy2log

# GPUs (heaviest first) whose slots the moves of a round start from.
SOURCE_GPUS = 2
# Lightest GPUs a source slot may swap with.
PARTNER_GPUS = 8
# Hottest experts per copy offered to each slot of a source GPU, and spare-copy slots offered to each
# expert of a source GPU.
RECEIVERS = 8
SPARE_SLOTS = 16
# A move must remove this share of the layer's mean GPU load from the excess (float noise never cycles).
MIN_GAIN = 1e-9
# Handovers per layer and round scored exactly, of those the proxy ranks best.
EXACT_HANDOVERS = 32
# Spare copies per layer and round that a homeless expert may take the slot of (directly or by a chain).
FREED_SLOTS = 32
# On a GPU the host looks at the layers' progress every this many rounds.
SYNC_EVERY = 8


def excess(gpu_loads: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """gpu_loads [..., G] and targets broadcastable to it -> load over the target, summed: [...]."""
    return (gpu_loads - targets).clamp_min(0).sum(-1)


def _gpu_slots(gpus: torch.Tensor, slots_per_gpu: int) -> torch.Tensor:
    """GPU ids [A, K] -> their slots [A, K * S], GPU by GPU."""
    return (gpus.unsqueeze(2) * slots_per_gpu + torch.arange(slots_per_gpu, device=gpus.device)).flatten(1)


def _swap_moves(
    slot_load: torch.Tensor,
    gpu_load: torch.Tensor,
    source_slots: torch.Tensor,
    partner_slots: torch.Tensor,
    slots_per_gpu: int,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best swap per layer of a source slot with a slot of a partner GPU (the lightest ones: a GPU over
    the target gains nothing from a swap with another one over it).

    slot_load [A, R], gpu_load [A, G], source_slots [A, Q], partner_slots [A, P], targets [A] ->
    (excess removed [A], the flat move index q * P + p [A]).
    """
    moved = slot_load.gather(1, source_slots).unsqueeze(2) - slot_load.gather(1, partner_slots).unsqueeze(1)
    source_load = gpu_load.gather(1, source_slots // slots_per_gpu).unsqueeze(2)  # [A, Q, 1]
    partner_load = gpu_load.gather(1, partner_slots // slots_per_gpu).unsqueeze(1)  # [A, 1, P]
    cap = targets.view(-1, 1, 1)
    gain = (
        (source_load - cap).clamp_min(0)
        - (source_load - moved - cap).clamp_min(0)
        + (partner_load - cap).clamp_min(0)
        - (partner_load + moved - cap).clamp_min(0)
    )
    same_gpu = (source_slots // slots_per_gpu).unsqueeze(2) == (partner_slots // slots_per_gpu).unsqueeze(1)
    return torch.where(same_gpu, -torch.inf, gain).flatten(1).max(1)


def _handover_candidates(
    phy2log: torch.Tensor,
    counts: torch.Tensor,
    per_copy: torch.Tensor,
    slot_load: torch.Tensor,
    gpu_load: torch.Tensor,
    source_slots: torch.Tensor,
    slots_per_gpu: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The handovers of a round: (slot [A, M], new expert x [A, M]); see the module doc."""
    num_slots = phy2log.shape[1]
    slot_gpu = torch.arange(num_slots, device=phy2log.device) // slots_per_gpu
    num_sources = source_slots.shape[1]
    receivers = per_copy.topk(min(RECEIVERS, per_copy.shape[1]), dim=1).indices  # [A, W]
    into_slot = source_slots.unsqueeze(2).expand(-1, -1, receivers.shape[1]).flatten(1)
    into_expert = receivers.unsqueeze(1).expand(-1, num_sources, -1).flatten(1)
    # Spare copies on light GPUs: what the GPU would carry without the slot, lightest first.
    spare = counts.gather(1, phy2log) > 1
    rest = gpu_load.gather(1, slot_gpu.expand_as(slot_load)) - slot_load
    spare_slots = torch.where(spare, rest, torch.inf).topk(min(SPARE_SLOTS, num_slots), dim=1, largest=False).indices
    out_slot = spare_slots.unsqueeze(1).expand(-1, num_sources, -1).flatten(1)
    out_expert = phy2log.gather(1, source_slots).unsqueeze(2).expand(-1, -1, spare_slots.shape[1]).flatten(1)
    return torch.cat([into_slot, out_slot], 1), torch.cat([into_expert, out_expert], 1)


def _handover_moves(
    loads: torch.Tensor,
    phy2log: torch.Tensor,
    counts: torch.Tensor,
    gpu_load: torch.Tensor,
    slot: torch.Tensor,
    new_expert: torch.Tensor,
    num_gpus: int,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best handover per layer among (slot, new_expert) [A, M]: (excess removed [A], index in M [A]).

    GPU g's load after "slot s (GPU h) holds x instead of y": load_g + n_gy (y' - y) + n_gx (x' - x)
    + [g = h] (x' - y'), with n the copies per GPU and x, y, x', y' the loads per copy before and after.
    That costs O(G) per move, so every move is first ranked by a proxy that looks at three GPUs only
    (the slot's, the busiest host of x and the busiest host of y), and the `EXACT_HANDOVERS` best are
    scored exactly.
    """
    num_layers, num_slots = phy2log.shape
    num_experts = loads.shape[1]
    slots_per_gpu = num_slots // num_gpus
    slot_gpu = torch.arange(num_slots, device=loads.device) // slots_per_gpu
    cap = targets.view(-1, 1)
    old_expert = phy2log.gather(1, slot)
    count_x, count_y = counts.gather(1, new_expert).to(loads.dtype), counts.gather(1, old_expert).to(loads.dtype)
    valid = (count_y > 1) & (new_expert != old_expert)
    load_x, load_y = loads.gather(1, new_expert), loads.gather(1, old_expert)
    # An expert without a copy (elastic re-hosting) has no GPU to relieve: its term is zero.
    x_after, x_before = load_x / (count_x + 1), load_x / count_x.clamp_min(1)
    y_after, y_before = load_y / (count_y - 1).clamp_min(1), load_y / count_y
    busiest_host = torch.zeros_like(loads).scatter_reduce(1, phy2log, gpu_load[:, slot_gpu], "amax")  # [A, E]
    host_x, host_y = busiest_host.gather(1, new_expert), busiest_host.gather(1, old_expert)
    at_slot = gpu_load.gather(1, slot // slots_per_gpu)
    proxy = (
        (at_slot - cap).clamp_min(0)
        - (at_slot + x_after - y_before - cap).clamp_min(0)
        + torch.where(count_x > 0, (host_x - cap).clamp_min(0) - (host_x + x_after - x_before - cap).clamp_min(0), 0)
        - (host_y + y_after - y_before - cap).clamp_min(0)
        + (host_y - cap).clamp_min(0)
    )
    pick = torch.where(valid, proxy, -torch.inf).topk(min(EXACT_HANDOVERS, slot.shape[1]), dim=1).indices  # [A, K]
    slot, new_expert, old_expert = slot.gather(1, pick), new_expert.gather(1, pick), old_expert.gather(1, pick)
    x_after, x_before = x_after.gather(1, pick), x_before.gather(1, pick)
    y_after, y_before = y_after.gather(1, pick), y_before.gather(1, pick)
    hist = torch.zeros(num_layers, num_gpus * num_experts, dtype=loads.dtype, device=loads.device)
    hist.scatter_add_(1, slot_gpu * num_experts + phy2log, torch.ones_like(phy2log, dtype=loads.dtype))
    hist = hist.view(num_layers, num_gpus, num_experts)  # copies of each expert per GPU
    on_x = hist.gather(2, new_expert.unsqueeze(1).expand(-1, num_gpus, -1))  # [A, G, K]
    on_y = hist.gather(2, old_expert.unsqueeze(1).expand(-1, num_gpus, -1))
    gpus = torch.arange(num_gpus, device=loads.device).view(1, -1, 1)
    after = (
        gpu_load.unsqueeze(2)
        + on_y * (y_after - y_before).unsqueeze(1)
        + on_x * (x_after - x_before).unsqueeze(1)
        + (gpus == (slot // slots_per_gpu).unsqueeze(1)) * (x_after - y_after).unsqueeze(1)
    )
    gain = excess(gpu_load, cap).unsqueeze(1) - excess(after.transpose(1, 2), cap.unsqueeze(2))
    best, index = torch.where(valid.gather(1, pick), gain, -torch.inf).max(1)
    return best, pick.gather(1, index.unsqueeze(1)).squeeze(1)


def _penalty(over: torch.Tensor, over_cost: torch.Tensor) -> torch.Tensor:
    """Load over the target plus `over_cost` [A] for every GPU over it: over [A, ...] -> [A, ...].

    Each GPU left over the target costs at least one more shipped copy to fix, however little it is
    over, so a plan that leaves few GPUs over beats one that leaves a little over on many."""
    return over.clamp_min(0) + over_cost.view([-1] + [1] * (over.dim() - 1)) * (over > 0)


def _freed_loads(
    loads: torch.Tensor, phy2log: torch.Tensor, counts: torch.Tensor, gpu_load: torch.Tensor, freed: torch.Tensor
) -> torch.Tensor:
    """GPU loads once the copy in slot `freed` [A, K] is gone (its expert keeps its other copies, which
    each carry more): [A, K, G]."""
    num_layers, num_gpus = gpu_load.shape
    slots_per_gpu = phy2log.shape[1] // num_gpus
    expert = phy2log.gather(1, freed)
    load, count = loads.gather(1, expert), counts.gather(1, expert).to(loads.dtype)
    after = load / (count - 1).clamp_min(1)
    hist = expert_histogram(phy2log, loads.shape[1], num_gpus).to(loads.dtype)  # [A, G, E]
    copies = hist.gather(2, expert.unsqueeze(1).expand(-1, num_gpus, -1)).transpose(1, 2)  # [A, K, G]
    gpus = torch.arange(num_gpus, device=loads.device)
    on_freed = (gpus == (freed // slots_per_gpu).unsqueeze(2)).to(loads.dtype)
    return gpu_load.unsqueeze(1) + copies * (after - load / count).unsqueeze(2) - on_freed * after.unsqueeze(2)


def rehost_by_chains(
    loads: torch.Tensor,
    seed: torch.Tensor,
    num_gpus: int,
    targets: torch.Tensor,
    move_cost: torch.Tensor,
    over_cost: torch.Tensor,
) -> torch.Tensor:
    """Give every expert without a copy a slot, heaviest first, one per layer and round.

    A homeless expert y needs a slot that a spare copy (of an expert x with several) gives up. Either y
    takes that slot (one copy shipped), or a copy z from any GPU h moves into it and y takes z's slot
    on h (two copies): a chain that carries z's load to the freed slot's GPU and relieves h, so the
    lost GPU's load spreads over more GPUs than the freed slots' and x's. Per round and layer every
    freed slot among the `FREED_SLOTS` spare copies whose loss raises their siblings least, and every z,
    is scored exactly in O(1) from the GPU loads after the freeing ([A, K, G]); the choice minimises
    `_penalty` over all GPUs plus `move_cost` per shipped copy.

    loads [A, E] float64, seed [A, R] (every slot holding an expert), targets / move_cost / over_cost
    [A] -> [A, R], every expert hosted. Rounds: the most homeless experts of any layer. Memory
    O(A * FREED_SLOTS * R).
    """
    num_layers, num_slots = seed.shape
    slots_per_gpu = num_slots // num_gpus
    slot_gpu = torch.arange(num_slots, device=seed.device) // slots_per_gpu
    rows = torch.arange(num_layers, device=seed.device)
    cap = targets.view(-1, 1)
    rounds = int((logcnt_from_phy2log(seed, loads.shape[1]) == 0).sum(1).max()) if num_layers else 0
    for _ in range(rounds):
        checkpoint()
        counts = logcnt_from_phy2log(seed, loads.shape[1])
        missing = counts == 0
        active = missing.any(1)
        if not bool(active.any()):
            break
        homeless = torch.where(missing, loads, -1.0).argmax(1)  # [A]
        homeless_load = loads.gather(1, homeless.unsqueeze(1))  # [A, 1]
        slot_load = (loads / counts.clamp_min(1)).gather(1, seed)
        gpu_load = slot_load.view(num_layers, num_gpus, slots_per_gpu).sum(-1)
        copies = counts.gather(1, seed)
        rise = torch.where(copies > 1, slot_load / (copies - 1).clamp_min(1), torch.inf)
        rise, freed = rise.topk(min(FREED_SLOTS, num_slots), dim=1, largest=False)  # [A, K]
        usable = rise.isfinite()
        after = _freed_loads(loads, seed, counts, gpu_load, freed)  # [A, K, G]
        total = _penalty(after - cap.unsqueeze(2), over_cost).sum(2)  # [A, K]
        at_freed = after.gather(2, (freed // slots_per_gpu).unsqueeze(2)).squeeze(2)
        rest = total - _penalty(at_freed - cap, over_cost)
        direct = rest + _penalty(at_freed + homeless_load - cap, over_cost) + move_cost.view(-1, 1)
        direct = torch.where(usable, direct, torch.inf)
        # Chains: z in slot q (GPU h) moves into the freed slot, y takes slot q.
        at_h = after.gather(2, slot_gpu.view(1, 1, -1).expand(num_layers, after.shape[1], -1))  # [A, K, R]
        moved = slot_load.unsqueeze(1)
        chain = (
            (rest.unsqueeze(2) - _penalty(at_h - cap.unsqueeze(2), over_cost))
            + _penalty(at_freed.unsqueeze(2) + moved - cap.unsqueeze(2), over_cost)
            + _penalty(at_h - moved + homeless_load.unsqueeze(2) - cap.unsqueeze(2), over_cost)
            + 2 * move_cost.view(-1, 1, 1)
        )
        freed_gpu = (freed // slots_per_gpu).unsqueeze(2)
        hist = expert_histogram(seed, loads.shape[1], num_gpus)
        already_there = hist.gather(1, freed_gpu.expand(-1, -1, loads.shape[1])).gather(
            2, seed.unsqueeze(1).expand_as(at_h)
        )
        forbidden = (slot_gpu.view(1, 1, -1) == freed_gpu) | (already_there > 0) | ~usable.unsqueeze(2)
        forbidden |= seed.unsqueeze(1) == seed.gather(1, freed).unsqueeze(2)
        chain = torch.where(forbidden, torch.inf, chain)
        best_direct, direct_index = direct.min(1)
        best_chain, chain_index = chain.flatten(1).min(1)
        use_chain = active & (best_chain < best_direct)
        use_direct = active & ~use_chain
        direct_slot = freed.gather(1, direct_index.unsqueeze(1)).squeeze(1)
        chain_slot = freed.gather(1, (chain_index // num_slots).unsqueeze(1)).squeeze(1)
        relocated = chain_index % num_slots
        result = seed.clone()
        result[rows[use_direct], direct_slot[use_direct]] = homeless[use_direct]
        result[rows[use_chain], chain_slot[use_chain]] = seed[rows[use_chain], relocated[use_chain]]
        result[rows[use_chain], relocated[use_chain]] = homeless[use_chain]
        seed = result
    return seed


def _round(
    loads: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    targets: torch.Tensor,
    left: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One move per layer: (phy2log [A, R], copies shipped [A] (0: none helped), excess after [A])."""
    num_layers, num_slots = phy2log.shape
    slots_per_gpu = num_slots // num_gpus
    counts = logcnt_from_phy2log(phy2log, loads.shape[1])
    per_copy = loads / counts.clamp_min(1)
    slot_load = per_copy.gather(1, phy2log)
    gpu_load = slot_load.view(num_layers, num_gpus, slots_per_gpu).sum(-1)
    now = excess(gpu_load, targets.view(-1, 1))
    source_slots = _gpu_slots(gpu_load.topk(min(SOURCE_GPUS, num_gpus), dim=1).indices, slots_per_gpu)
    partners = gpu_load.topk(min(PARTNER_GPUS, num_gpus), dim=1, largest=False).indices
    partner_slots = _gpu_slots(partners, slots_per_gpu)
    swap_gain, swap_index = _swap_moves(slot_load, gpu_load, source_slots, partner_slots, slots_per_gpu, targets)
    slot, new_expert = _handover_candidates(phy2log, counts, per_copy, slot_load, gpu_load, source_slots, slots_per_gpu)
    hand_gain, hand_index = _handover_moves(loads, phy2log, counts, gpu_load, slot, new_expert, num_gpus, targets)
    floor = MIN_GAIN * gpu_load.mean(-1)
    swap_ok = (swap_gain > floor) & (left >= 2)
    hand_ok = (hand_gain > floor) & (left >= 1)
    use_swap = swap_ok & (~hand_ok | (swap_gain / 2 > hand_gain))
    use_hand = hand_ok & ~use_swap
    rows = torch.arange(num_layers, device=loads.device)
    num_partner_slots = partner_slots.shape[1]
    first = source_slots.gather(1, (swap_index // num_partner_slots).unsqueeze(1)).squeeze(1)
    second = partner_slots.gather(1, (swap_index % num_partner_slots).unsqueeze(1)).squeeze(1)
    swapped = phy2log.clone()
    swapped[rows, first] = phy2log[rows, second]
    swapped[rows, second] = phy2log[rows, first]
    handed = phy2log.clone()
    pick = hand_index.unsqueeze(1)
    handed[rows, slot.gather(1, pick).squeeze(1)] = new_expert.gather(1, pick).squeeze(1)
    phy2log = torch.where(use_swap.unsqueeze(1), swapped, torch.where(use_hand.unsqueeze(1), handed, phy2log))
    shipped = torch.where(use_swap, 2, torch.where(use_hand, 1, 0))
    remaining = torch.where(use_swap, now - swap_gain, torch.where(use_hand, now - hand_gain, now))
    return phy2log, shipped, remaining


def shed_excess(
    loads: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    targets: torch.Tensor,
    budget: torch.Tensor | int,
) -> torch.Tensor:
    """loads [L, E] float64, phy2log [L, R], targets [L] max GPU loads, budget ([L] or one int) copies
    a layer may ship -> phy2log [L, R], every expert still hosted, moved towards the targets."""
    num_layers = phy2log.shape[0]
    device = loads.device
    left = torch.as_tensor(budget, dtype=torch.int64, device=device).expand(num_layers).clone()
    phy2log = phy2log.clone()
    active = torch.arange(num_layers, device=device)
    on_cpu = device.type == "cpu"
    rounds = int(left.max()) if num_layers else 0
    for step in range(rounds):
        checkpoint()
        sub, shipped, remaining = _round(loads[active], phy2log[active], num_gpus, targets[active], left[active])
        phy2log[active] = sub
        left[active] -= shipped
        going = (shipped > 0) & (remaining > 0)
        if on_cpu or step % SYNC_EVERY == SYNC_EVERY - 1:
            active = active[going]
            if active.numel() == 0:
                break
    return phy2log
