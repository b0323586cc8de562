"""Joint replication and placement: move copies between experts when that lowers the max GPU load.

Greedy replication minimises the largest load per copy, which is not what packing needs: loads
[600, 560, 120, 120, 20, 10, 10, 10] on 8 GPUs x 2 slots reach 232 with greedy copies, 196.67 with
copies moved from the 560 expert to the 120 ones. For every layer still above its lower bound, each
round scores the moves "donor y gives one copy to receiver x, on GPU h" exactly and incrementally
(only the GPUs hosting x or y change: O(M x G) per layer, no repacking), takes the K best, levels each
with swap refinement, and keeps the best one when it lowers the max GPU load. Small layers also score
every move with its copies packed afresh by LPT in rounds. With two slots per GPU pairing the copies
heaviest with lightest is optimal and alone decides: every move is scored by that pairing read off the
copies sorted once per row (`paired_moves`). Repacking every trial from scratch, as before, cost 1-2 s
on 58 x 256 -> 320 slots.
"""

from __future__ import annotations

import dataclasses

import torch

from . import host_moves, host_pairing
from .cancel import checkpoint
from .maps import expert_histogram, logcnt_from_phy2log
from .packing import grouped_limits, round_pack, swap_refine
from .replication import replica_counts, slots_from_counts

# A trial whose max GPU load is within this fraction of its lower bound stops refining.
REFINE_SLACK = 5e-4
# A move must lower the max GPU load by this relative amount to be kept (float noise never cycles).
MIN_GAIN = 1e-9
# The per-GPU expert histogram of `_copies_on_gpus` is used while it has at most this many times the
# elements of the slot comparison it replaces.
HISTOGRAM_RATIO = 4


def lower_bound(loads: torch.Tensor, counts: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """max(total / G, largest load per copy) for given copies: [P]."""
    return torch.maximum(loads.sum(-1) / num_gpus, (loads / counts).max(-1).values)


def best_lower_bound(loads: torch.Tensor, num_replicas: int, num_gpus: int) -> torch.Tensor:
    """The bound no placement beats: total / G, and the smallest achievable largest load per copy. [P]."""
    return lower_bound(loads, replica_counts(loads, num_replicas), num_gpus)


def copy_moves(
    loads: torch.Tensor, counts: torch.Tensor, width: int, on_peak: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The T x T candidate moves "donor y gives one copy to receiver x" of each row.

    Receivers have the largest loads per copy (with `on_peak` [P, E] bool, the experts on the heaviest
    GPU come first); donors are experts with a spare copy that lose least by giving it up (smallest
    load per copy afterwards). loads, counts [P, E] -> (x [P, M], y [P, M], valid [P, M]) with
    M = T * T; a move is invalid when x == y or y has a single copy.
    """
    num_rows, num_experts = counts.shape
    width = min(width, num_experts)
    per_copy = loads / counts
    priority = per_copy if on_peak is None else per_copy + on_peak * per_copy.amax(-1, keepdim=True)
    receivers = priority.topk(width, dim=-1).indices  # [P, T]
    giving = torch.where(counts > 1, loads / (counts - 1).clamp_min(1), torch.full_like(loads, float("inf")))
    donors = giving.topk(width, dim=-1, largest=False).indices  # [P, T]
    can_give = (counts.gather(1, donors) > 1).unsqueeze(1).expand(-1, width, -1).reshape(num_rows, -1)
    x = receivers.unsqueeze(2).expand(-1, -1, width).reshape(num_rows, -1)
    y = donors.unsqueeze(1).expand(-1, width, -1).reshape(num_rows, -1)
    return x, y, can_give & (x != y)


def moved_counts(counts: torch.Tensor, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """counts [P, E] and moves [P, M] -> the copies after each move [P, M, E] (unchanged where invalid)."""
    trial = counts.unsqueeze(1).repeat(1, x.shape[1], 1)
    step = valid.to(counts.dtype).unsqueeze(2)
    return trial.scatter_add_(2, x.unsqueeze(2), step).scatter_add_(2, y.unsqueeze(2), -step)


def move_peaks(
    loads: torch.Tensor,
    counts: torch.Tensor,
    gpu_experts: torch.Tensor,
    gpu_loads: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Max GPU load after each move, for each GPU h whose copy of y becomes a copy of x: [P, M, G].

    loads, counts [P, E], gpu_experts [P, G, S] (the expert in each slot), gpu_loads [P, G] (float64),
    moves x, y, valid [P, M]. Every copy of x gets lighter and every copy of y heavier; GPU h also swaps
    one y copy for an x copy. +inf where the move is invalid or h hosts no copy of y. As tensor ops (a
    GPU's path; the CPU's is `host_moves.move_peaks`, the same peaks).
    """
    num_gpus = gpu_experts.shape[1]
    load_x, load_y = loads.gather(1, x), loads.gather(1, y)
    count_x, count_y = counts.gather(1, x).to(loads.dtype), counts.gather(1, y).to(loads.dtype)
    new_x, new_y = load_x / (count_x + 1), load_y / (count_y - 1).clamp_min(1)
    copies_x, copies_y = _copies_on_gpus(gpu_experts, torch.cat([x, y], 1), loads.shape[1])
    copies_x, copies_y = copies_x.to(loads.dtype), copies_y.to(loads.dtype)
    after = (
        gpu_loads.unsqueeze(1)
        + copies_x * (new_x - load_x / count_x).unsqueeze(2)
        + copies_y * (new_y - load_y / count_y).unsqueeze(2)
    )
    # The max over g != h for every h: the largest load, or the second largest on the largest's GPU
    # (with equal top loads both are the same, whichever index wins).
    first, first_index = after.max(2, keepdim=True)
    gpus = torch.arange(num_gpus, device=loads.device)
    second = torch.where(gpus == first_index, -torch.inf, after).amax(2, keepdim=True)
    others = torch.where(gpus == first_index, second if num_gpus > 1 else first, first)  # [P, M, G]
    peaks = torch.maximum(others, after + (new_x - new_y).unsqueeze(2))
    feasible = (copies_y > 0) & valid.unsqueeze(2)
    return torch.where(feasible, peaks, torch.full_like(peaks, float("inf")))


def _copies_on_gpus(gpu_experts: torch.Tensor, experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """How many copies of each of 2M experts [P, 2M] every GPU holds: the first M and the last M, each
    [P, M, G]. Read off the compact per-GPU expert histogram (0.38 ms against 0.73 for comparing every slot on
    DeepSeek-V3 EP72) unless it would be over HISTOGRAM_RATIO times the size of the comparison (many
    experts and GPUs, few slots each: memory stays linear in the problem)."""
    num_rows, num_gpus, slots = gpu_experts.shape
    num_moves = experts.shape[1] // 2
    if num_experts > HISTOGRAM_RATIO * experts.shape[1] * slots:  # G x E against 2M x G x S elements
        return (gpu_experts.unsqueeze(1) == experts[..., None, None]).sum(-1).split(num_moves, 1)
    hosted = expert_histogram(gpu_experts.view(num_rows, -1), num_experts, num_gpus, compact=True)  # [P, G, E]
    counted = hosted.gather(2, experts.unsqueeze(1).expand(-1, num_gpus, -1))  # [P, G, 2M]
    return counted.transpose(1, 2).contiguous().split(num_moves, 1)


def apply_moves(
    gpu_experts: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gpu: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """gpu_experts [P, G, S] and K moves [P, K] -> trial placements [P, K, G, S], the first copy of y on
    GPU `gpu` turned into a copy of x (unchanged where not valid)."""
    num_rows, num_gpus, slots = gpu_experts.shape
    rows = gpu_experts.gather(1, gpu.unsqueeze(2).expand(-1, -1, slots))  # [P, K, S]
    slot = (rows == y.unsqueeze(2)).int().argmax(2)  # first copy of y on that GPU
    flat = (gpu * slots + slot).unsqueeze(2)
    trial = gpu_experts.view(num_rows, 1, -1).repeat(1, x.shape[1], 1)
    current = trial.gather(2, flat)
    trial.scatter_(2, flat, torch.where(valid.unsqueeze(2), x.unsqueeze(2), current))
    return trial.view(num_rows, -1, num_gpus, slots)


def fresh_packs(
    loads: torch.Tensor, trial_counts: torch.Tensor, num_gpus: int, slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each move's copies packed from scratch by LPT in rounds (optimal with two slots per GPU).

    loads [P, E] float64, trial_counts [P, M, E] -> (gpu_experts [P, M, G, S], max GPU load [P, M]).
    """
    num_rows, num_moves, num_experts = trial_counts.shape
    num_replicas = num_gpus * slots
    experts = slots_from_counts(trial_counts, num_replicas).view(num_rows * num_moves, num_replicas)
    per_copy = (loads.unsqueeze(1) / trial_counts).view(num_rows * num_moves, num_experts)
    copy_loads = per_copy.gather(1, experts)
    packed = experts.gather(1, round_pack(copy_loads.to(torch.float32), num_gpus).view(num_rows * num_moves, -1))
    peaks = per_copy.gather(1, packed).view(num_rows, num_moves, num_gpus, slots).sum(-1).max(-1).values
    return packed.view(num_rows, num_moves, num_gpus, slots), peaks


def sorted_copies(
    loads: torch.Tensor, counts: torch.Tensor, num_replicas: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's copies heaviest first: (per-copy loads [P, R], their experts [P, R], the first position
    of each expert's run [P, E]). Equal loads keep the expert order, so every expert's copies form one run."""
    num_rows = loads.shape[0]
    experts = slots_from_counts(counts, num_replicas)  # [P, R], each expert's copies contiguous
    ordered, order = (loads / counts.clamp_min(1)).gather(1, experts).sort(dim=1, descending=True, stable=True)
    ordered_experts = experts.gather(1, order)
    positions = torch.arange(num_replicas, device=loads.device).expand(num_rows, -1)
    first = torch.full_like(counts, num_replicas).scatter_reduce_(1, ordered_experts, positions, "amin")
    return ordered, ordered_experts, first


def paired_peaks(
    ordered: torch.Tensor, high: torch.Tensor, low: torch.Tensor, runs: dict[str, torch.Tensor], with_slots: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Each move's new sorted copy list read off the old one, and its pairing peak: ordered [P, R] copy
    loads heaviest first, high / low [P, M] the inserted per-copy loads, `runs` the [P, M] bounds of the
    inserted (above_high, above_low, len_high, len_low) and removed runs (start_a, len_a, start_b, len_b,
    the earlier first) -> (max pair load [P, M], positions in the old list [P, M, R] int64, in the heavier
    inserted run [P, M, R] bool, in the lighter one; the CPU leaves those None without `with_slots`). The
    CPU runs it compiled (`host_pairing`)."""
    if ordered.device.type == "cpu":
        return host_pairing.paired_peaks(ordered, high, low, runs, with_slots)
    return torch_paired_peaks(ordered, high, low, runs, with_slots)


def torch_paired_peaks(
    ordered: torch.Tensor, high: torch.Tensor, low: torch.Tensor, runs: dict[str, torch.Tensor], with_slots: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`paired_peaks` in torch, the path of GPU tensors (the slots come along either way)."""
    num_replicas = ordered.shape[1]
    # Index arithmetic in int32 on [P, M, R] (half the memory traffic of int64).
    index = torch.arange(num_replicas, device=ordered.device, dtype=torch.int32).view(1, 1, -1)

    def column(name: str) -> torch.Tensor:
        return runs[name].to(torch.int32).unsqueeze(2)

    len_high, low_start = column("len_high"), column("above_low") + column("len_high")
    after_high, after_low = index >= column("above_high"), index >= low_start
    in_high = after_high & (index < column("above_high") + len_high)
    in_low = after_low & (index < low_start + column("len_low"))
    # Index among the copies left, then its position in s (skipping the removed runs).
    kept = index - len_high * after_high - column("len_low") * after_low
    kept += column("len_a") * (kept >= column("start_a"))
    kept += column("len_b") * (kept >= column("start_b"))
    kept = kept.clamp_(0, num_replicas - 1).long()
    value = ordered.unsqueeze(1).expand(-1, high.shape[1], -1).gather(2, kept)
    value = torch.where(in_high, high.unsqueeze(2), value)
    value = torch.where(in_low, low.unsqueeze(2), value)
    return (value + value.flip(2)).amax(2), kept, in_high, in_low


def paired_moves(
    loads: torch.Tensor,
    counts: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    valid: torch.Tensor,
    num_gpus: int,
    with_experts: bool = False,
    copies: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With two slots per GPU, each move's copies paired heaviest with lightest (the optimal packing of
    those copies), without repacking any of them: (max GPU load [P, M], +inf where invalid; with
    `with_experts`, the placement [P, M, G, 2], GPU i holding the i-th heaviest and i-th lightest copy).

    loads [P, E] float64, counts [P, E] (2 G copies a row), moves x, y, valid [P, M]. The copies sorted
    once per row, s [P, R] heaviest first, hold each expert's copies as one run. A move removes the runs
    of x and y and inserts n_x + 1 copies of w_x / (n_x + 1) and n_y - 1 copies of w_y / (n_y - 1): the
    new sorted list is read off by index arithmetic on s ([P, M, R] elementwise work), and its pairing
    peak is max_i new[i] + new[R - 1 - i]. Packing every move afresh sorted P x M rows instead.
    `copies`: `sorted_copies` of these counts, when the caller has them already.
    """
    num_replicas, num_moves = 2 * num_gpus, x.shape[1]
    ordered, ordered_experts, first = copies if copies is not None else sorted_copies(loads, counts, num_replicas)
    count_x, count_y = counts.gather(1, x), counts.gather(1, y)
    load_x, load_y = loads.gather(1, x), loads.gather(1, y)
    old_x, old_y = load_x / count_x.clamp_min(1), load_y / count_y.clamp_min(1)
    new_x, new_y = load_x / (count_x + 1), load_y / (count_y - 1).clamp_min(1)
    start_x, start_y = first.gather(1, x), first.gather(1, y)
    # The two removed runs, the earlier one first.
    x_first = start_x < start_y
    start_a, len_a = torch.where(x_first, start_x, start_y), torch.where(x_first, count_x, count_y)
    start_b, len_b = torch.where(x_first, start_y, start_x), torch.where(x_first, count_y, count_x)
    # The two inserted runs, the heavier one first.
    x_high = new_x >= new_y
    high, low = torch.where(x_high, new_x, new_y), torch.where(x_high, new_y, new_x)
    len_high = torch.where(x_high, count_x + 1, count_y - 1)
    len_low = torch.where(x_high, count_y - 1, count_x + 1)

    def heavier_left(value: torch.Tensor) -> torch.Tensor:
        """Copies left after the removal that are strictly heavier than `value` [P, M]."""
        above = torch.searchsorted(-ordered.contiguous(), -value.contiguous(), side="left")
        return above - count_x * (old_x > value) - count_y * (old_y > value)

    above_high, above_low = heavier_left(high), heavier_left(low)
    runs = {"above_high": above_high, "above_low": above_low, "len_high": len_high, "len_low": len_low}
    runs |= {"start_a": start_a, "len_a": len_a, "start_b": start_b, "len_b": len_b}
    peaks, kept, in_high, in_low = paired_peaks(ordered, high, low, runs, with_experts)
    peaks = torch.where(valid, peaks, torch.full_like(peaks, float("inf")))
    if not with_experts:
        return peaks, None
    high_expert, low_expert = torch.where(x_high, x, y).unsqueeze(2), torch.where(x_high, y, x).unsqueeze(2)
    placed = ordered_experts.unsqueeze(1).expand(-1, num_moves, -1).gather(2, kept)
    placed = torch.where(in_high, high_expert, torch.where(in_low, low_expert, placed))
    paired = torch.stack([placed[..., :num_gpus], placed[..., num_gpus:].flip(2)], 3)  # [P, M, G, 2]
    return peaks, paired


def refine_trials(loads: torch.Tensor, trial: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Level every trial placement by swap refinement.

    loads [P, E] float64, trial [P, K, G, S] experts, bound [P] -> (placements [P, K, G, S], max GPU
    load [P, K] float64).
    """
    num_rows, num_trials, num_gpus, slots = trial.shape
    batch = num_rows * num_trials
    experts = trial.reshape(batch, num_gpus * slots)
    per_copy = loads.repeat_interleave(num_trials, 0) / logcnt_from_phy2log(experts, loads.shape[1]).clamp_min(1)
    slot_loads = per_copy.to(torch.float32).gather(1, experts).view(batch, num_gpus, slots)
    targets = (bound * (1.0 + REFINE_SLACK)).repeat_interleave(num_trials, 0)
    # Trials start levelled (one move away from a refined placement, or LPT by rounds): the pair phase
    # adds little there (measured: 1e-5 balancedness for 3x the time), the heaviest-pack phase does it.
    limits = dataclasses.replace(grouped_limits(slot_loads, num_trials), pair_rounds=0)
    _, refined = swap_refine(slot_loads, experts.view(batch, num_gpus, slots), targets, limits)
    exact = per_copy.gather(1, refined.view(batch, -1)).view(batch, num_gpus, slots).sum(-1).max(-1).values
    return refined.view_as(trial), exact.view(num_rows, num_trials)


def _improve_round(
    loads: torch.Tensor, gpu_experts: torch.Tensor, bound: torch.Tensor, width: int, trials: int, fresh_trials: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hill-climbing step per row: loads [P, E], gpu_experts [P, G, S], bound [P] -> the best
    refined trial (gpu_experts [P, G, S], max GPU load [P]); +inf where no move is possible.

    Every move is scored twice, applied in place on its best GPU (keeps what earlier rounds built) and
    with its copies packed afresh (escapes it when the new copies pack differently); the `trials` best
    of the first kind and the `fresh_trials` best of the second are refined. With one or two slots per
    GPU the fresh packing (one slot: any; two: the pairing) is optimal and taken as it is.
    """
    num_rows, num_gpus, slots = gpu_experts.shape
    counts = logcnt_from_phy2log(gpu_experts.view(num_rows, -1), loads.shape[1])
    per_copy = loads / counts.clamp_min(1)
    gpu_loads = per_copy.gather(1, gpu_experts.view(num_rows, -1)).view(num_rows, num_gpus, slots).sum(-1)
    heaviest = gpu_loads.argmax(-1, keepdim=True).unsqueeze(2).expand(-1, -1, slots)
    on_peak = torch.zeros_like(counts, dtype=torch.bool).scatter_(1, gpu_experts.gather(1, heaviest)[:, 0], True)
    x, y, valid = copy_moves(loads, counts, width, on_peak)
    inf = torch.tensor(float("inf"), dtype=loads.dtype, device=loads.device)
    trials_found, feasible_found = [], []
    if slots == 2:  # the pairing is optimal for its copies: score every move by it, pack the best one
        copies = sorted_copies(loads, counts, num_gpus * 2)
        pick = paired_moves(loads, counts, x, y, valid, num_gpus, copies=copies)[0].argmin(1, keepdim=True)
        picked = [move.gather(1, pick) for move in (x, y, valid)]
        peak, chosen = paired_moves(loads, counts, *picked, num_gpus, with_experts=True, copies=copies)
        return chosen.squeeze(1), peak.squeeze(1)
    if slots == 1 or fresh_trials > 0:
        fresh, fresh_peaks = fresh_packs(loads, moved_counts(counts, x, y, valid), num_gpus, slots)
        fresh_peaks = torch.where(valid, fresh_peaks, inf)
        if slots == 1:  # one copy per GPU: every packing is the same, nothing left to refine
            peak, pick = fresh_peaks.min(1)
            return fresh.gather(1, pick.view(-1, 1, 1, 1).expand(-1, 1, num_gpus, slots)).squeeze(1), peak
        fresh_peaks, pick = fresh_peaks.topk(min(fresh_trials, x.shape[1]), dim=1, largest=False)
        trials_found.append(fresh.gather(1, pick.view(num_rows, -1, 1, 1).expand(-1, -1, num_gpus, slots)))
        feasible_found.append(torch.isfinite(fresh_peaks))

    score_moves = host_moves.move_peaks if loads.device.type == "cpu" else move_peaks
    in_place = score_moves(loads, counts, gpu_experts, gpu_loads, x, y, valid).view(num_rows, -1)
    in_place_peaks, best = in_place.topk(min(trials, in_place.shape[1]), dim=1, largest=False)
    move, gpu = best // num_gpus, best % num_gpus
    feasible = torch.isfinite(in_place_peaks)
    trials_found.insert(0, apply_moves(gpu_experts, x.gather(1, move), y.gather(1, move), gpu, feasible))
    feasible_found.insert(0, feasible)

    trial, feasible = torch.cat(trials_found, 1), torch.cat(feasible_found, 1)
    refined, refined_peaks = refine_trials(loads, trial, bound)
    peak, pick = torch.where(feasible, refined_peaks, inf).min(1)
    chosen = refined.gather(1, pick.view(-1, 1, 1, 1).expand(-1, 1, num_gpus, slots)).squeeze(1)
    return chosen, peak


@dataclasses.dataclass(frozen=True)
class SearchEffort:
    """How hard `improve_replication` searches: rounds (one move each), width (T: T x T moves), trials
    refined from moves applied in place, fresh_trials refined from the moves' copies packed afresh, and
    slack: rows whose max GPU load is within this fraction of their lower bound are not searched."""

    rounds: int
    width: int
    trials: int
    fresh_trials: int
    slack: float


# Small layers are cheap and hard (few copies, few GPUs): a search with fresh repacking brings the worst
# gap to the MILP optimum on 90 layers of 8-16 experts from 6.4 % to 0.7 %. On the big shapes (>= 288
# slots) fresh repacking adds <= 1e-5 balancedness for 2-3x the time, and layers within 0.1 % of their
# bound gain ~1e-4 for twice the solve time (58 x 256 -> 320 slots on 64 GPUs), so neither is done there.
SMALL_LAYER_SLOTS = 128
SMALL_EFFORT = SearchEffort(rounds=6, width=4, trials=2, fresh_trials=2, slack=5e-4)
LARGE_EFFORT = SearchEffort(rounds=4, width=4, trials=2, fresh_trials=0, slack=1e-3)


def search_effort(num_replicas: int) -> SearchEffort:
    """The effort for layers of R slots (a property of the shape, so batches do not change results)."""
    return SMALL_EFFORT if num_replicas <= SMALL_LAYER_SLOTS else LARGE_EFFORT


def improve_replication(
    loads: torch.Tensor,
    phy2log: torch.Tensor,
    peak: torch.Tensor,
    num_gpus: int,
    *,
    effort: SearchEffort | None = None,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hill-climb the copies of the rows whose max GPU load exceeds their lower bound.

    loads [P, E] float64, phy2log [P, R], peak [P] (its max GPU load) -> the improved (phy2log, peak).
    Each round moves one copy per open row (the best of the refined trials among width^2 x G moves); a
    row leaves the search once no move lowers its peak or it reaches the bound, or `target` [P] (a max
    GPU load that is good enough: the migration stops there, so it ships no more copies than it must).
    On a GPU every row runs the fixed number of rounds, masked, so the host never waits. `effort`
    defaults by layer size.
    """
    num_rows, num_replicas = phy2log.shape
    slots = num_replicas // num_gpus
    effort = effort or search_effort(num_replicas)
    slack = effort.slack
    bound = best_lower_bound(loads, num_replicas, num_gpus)
    if target is not None:
        bound = torch.maximum(bound, target / (1.0 + slack))
    open_rows = peak > bound * (1.0 + slack)
    on_cpu = loads.device.type == "cpu"
    if on_cpu:
        rows = open_rows.nonzero().squeeze(1)
        if rows.numel() == 0:
            return phy2log, peak
    else:
        rows = torch.arange(num_rows, device=loads.device)
    phy2log, peak = phy2log.clone(), peak.clone()
    active, sub_loads, sub_bound = rows, loads[rows], bound[rows]
    sub_gpu_experts = phy2log[rows].view(-1, num_gpus, slots)
    sub_peak = torch.where(open_rows[rows], peak[rows], torch.zeros_like(peak[rows]))  # closed rows never move
    for _ in range(effort.rounds):
        checkpoint()
        trial, trial_peak = _improve_round(
            sub_loads, sub_gpu_experts, sub_bound, effort.width, effort.trials, effort.fresh_trials
        )
        better = trial_peak < sub_peak * (1.0 - MIN_GAIN)
        sub_gpu_experts = torch.where(better.view(-1, 1, 1), trial, sub_gpu_experts)
        sub_peak = torch.where(better, trial_peak, sub_peak)
        if not on_cpu:
            continue
        going = better & (sub_peak > sub_bound * (1.0 + slack))
        if not bool(going.all()):
            done = ~going
            phy2log[active[done]] = sub_gpu_experts[done].view(-1, num_replicas)
            peak[active[done]] = sub_peak[done]
            active, sub_loads, sub_bound = active[going], sub_loads[going], sub_bound[going]
            sub_gpu_experts, sub_peak = sub_gpu_experts[going], sub_peak[going]
            if active.numel() == 0:
                return phy2log, peak
    keep = open_rows[active]
    phy2log[active] = torch.where(keep.unsqueeze(1), sub_gpu_experts.view(-1, num_replicas), phy2log[active])
    peak[active] = torch.where(keep, sub_peak, peak[active])
    return phy2log, peak
