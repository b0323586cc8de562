"""The multi-candidate solver for one flat problem per row: copies, noisy LPT, swaps, best candidate,
then joint replication moves on the rows still above their lower bound, and on small layers with three
or more slots per GPU three-GPU repartitions (repartition.py). With two slots per GPU the packing step
is the optimal pairing, and small such rows are solved exactly (exact.py) or, on the CPU where their
count table is too large, by a climb over copy counts and a bounded branch and bound (pair_search.py).

Every row of `loads` is an independent problem (a layer, or a layer's node in the hierarchical policy);
all rows and all C candidates run together as B = rows x C batched problems.
"""

from __future__ import annotations

import torch

from . import exact, pair_search, repartition
from .cancel import checkpoint
from .candidates import multiplicative_noise
from .history import scenario_imbalance
from .joint import improve_replication
from .packing import greedy_pack, grouped_limits, round_pack, swap_refine
from .replication import replica_counts, slots_from_counts

REPLICATION_STREAM, ORDER_STREAM = 1, 2
# A candidate whose max GPU load is within this fraction of its lower bound cannot usefully improve.
TARGET_SLACK = 5e-4
MIN_EXPONENT_DROP = 0.5
# Count-vector tables up to this size are candidates in full (12 experts on 16 slots: 1365). On the 82
# small layers with proven optima of benchmarks/optimality_bench.py, with the three-GPU repartition, the
# mean gap to the optimum falls from 0.17 % to 0.007 %, the worst from 2.6 % to 0.17 %.
MAX_TABLE_CANDIDATES = 1365
# Copies (rows x candidates x R) built and packed at once by `candidate_placements`: a sort of 25M
# copies takes about 1 s on a CPU, one of 2M about 0.1 s.
CANDIDATE_BLOCK_ITEMS = 2**21
# Max GPU loads this close (relative) count as equal when choosing among candidates: float64 rounding.
TIE_TOLERANCE = 1e-12


def place_copies(
    loads: torch.Tensor,
    counts: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    order_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack given copies onto GPUs, C variants per row.

    loads [P, E] float64, counts [P, C, E] (each row summing to R), order_noise [P, C, R] factors on the
    copies' loads for the LPT order (None: plain LPT) -> (phy2log [P, C, R], gpu_loads [P, C, G] float64).
    Greedy LPT then swap refinement; with two slots per GPU the optimal pairing instead.
    """
    num_rows, num_candidates, _ = counts.shape
    batch = num_rows * num_candidates
    item_expert = slots_from_counts(counts, num_replicas)  # [P, C, R]
    item_loads = (loads.to(torch.float32).unsqueeze(1) / counts).gather(-1, item_expert)
    if num_replicas == 2 * num_gpus:
        # Two slots per GPU: heaviest with lightest is optimal for the copies; no order or swap can beat it.
        slot_items = round_pack(item_loads.view(batch, -1), num_gpus)
    else:
        order_keys = item_loads if order_noise is None else item_loads * order_noise
        order = order_keys.view(batch, -1).sort(dim=-1, descending=True, stable=True).indices
        slot_items = greedy_pack(item_loads.view(batch, -1), order, num_gpus)
        slot_loads = item_loads.view(batch, -1).gather(1, slot_items.view(batch, -1)).view_as(slot_items)
        bound = torch.maximum(item_loads.sum(-1) / num_gpus, item_loads.max(-1).values)  # [P, C]
        targets = (bound * (1.0 + TARGET_SLACK)).view(batch)
        limits = grouped_limits(slot_loads, num_candidates)
        slot_loads, slot_items = swap_refine(slot_loads, slot_items, targets, limits)
    phy2log = item_expert.view(batch, -1).gather(1, slot_items.view(batch, -1))
    phy2log = phy2log.view(num_rows, num_candidates, num_replicas)
    exact = (loads.unsqueeze(1) / counts).gather(-1, phy2log)
    return phy2log, exact.view(num_rows, num_candidates, num_gpus, -1).sum(-1)


def candidate_placements(
    loads: torch.Tensor, num_replicas: int, num_gpus: int, seeds: torch.Tensor, num_candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """C refined placements per row: loads [P, E] -> (phy2log [P, C, R], gpu_loads [P, C, G]).

    Candidate c replicates on loads (raised to a power below 1 for odd c, which spreads copies to
    lighter experts) scaled by noise of scale 0.2 c / (C - 1), and orders the copies for LPT by their
    loads under a second such noise; candidate 0 is plain greedy replication + LPT. Where the vectors
    of copy counts are few (MAX_TABLE_CANDIDATES), each of them is one more candidate.
    """
    num_rows, num_experts = loads.shape
    table = None
    if exact.few_count_vectors(num_experts, num_replicas, MAX_TABLE_CANDIDATES):
        table = exact.count_vectors(num_experts, num_replicas, loads.device)  # [T, E]
    # Blocks of candidates (then of rows) hold at most CANDIDATE_BLOCK_ITEMS copies: memory and the time
    # between cancellation checkpoints stay bounded on huge layers. The candidate block (the group whose
    # refinement stops together) depends on R and C alone, and rows are independent problems, so a
    # layer's result never depends on the batch it is solved in.
    candidate_step = max(1, min(num_candidates, CANDIDATE_BLOCK_ITEMS // num_replicas))
    per_row = (candidate_step + (0 if table is None else table.shape[0])) * num_replicas
    row_step = max(1, CANDIDATE_BLOCK_ITEMS // per_row)
    blocks = [
        _row_block(loads[rows], num_replicas, num_gpus, seeds[rows], num_candidates, candidate_step, table)
        for rows in (slice(first, first + row_step) for first in range(0, num_rows, row_step))
    ]
    phy2log, gpu_loads = (_joined(parts, 0) for parts in zip(*blocks, strict=True))
    return phy2log, gpu_loads


def _row_block(
    loads: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    seeds: torch.Tensor,
    num_candidates: int,
    candidate_step: int,
    table: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every candidate of a block of rows, `candidate_step` at a time, then the count-vector table's:
    loads [P, E] -> (phy2log [P, C + T, R], gpu_loads [P, C + T, G])."""
    parts = []
    for first in range(0, num_candidates, candidate_step):
        checkpoint()
        candidates = slice(first, min(num_candidates, first + candidate_step))
        parts.append(_candidate_block(loads, num_replicas, num_gpus, seeds, num_candidates, candidates))
    if table is not None:  # few count vectors: every one of them is a candidate too, packed by plain LPT
        checkpoint()
        parts.append(place_copies(loads, table.expand(loads.shape[0], -1, -1), num_replicas, num_gpus))
    phy2log, gpu_loads = (_joined(columns, 1) for columns in zip(*parts, strict=True))
    return phy2log, gpu_loads


def _joined(parts: tuple[torch.Tensor, ...], dim: int) -> torch.Tensor:
    """torch.cat, without the copy of a lone part (one block: every usual shape)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _candidate_block(
    loads: torch.Tensor, num_replicas: int, num_gpus: int, seeds: torch.Tensor, num_candidates: int, candidates: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """The placements of candidates `candidates` of the C = `num_candidates` of each row (see
    `candidate_placements`): loads [P, E] -> (phy2log [P, C', R], gpu_loads [P, C', G])."""
    num_experts = loads.shape[1]
    exponents = replication_exponents(num_candidates, loads.device)[candidates]
    noisy = loads.to(torch.float32).unsqueeze(1).pow(exponents)
    noisy = noisy * multiplicative_noise(seeds, num_candidates, num_experts, REPLICATION_STREAM, candidates)
    counts = replica_counts(noisy, num_replicas)  # [P, C', E]
    # With two slots per GPU the packing is the optimal pairing, which takes no order.
    if num_replicas == 2 * num_gpus:
        return place_copies(loads, counts, num_replicas, num_gpus)
    order_noise = multiplicative_noise(seeds, num_candidates, num_replicas, ORDER_STREAM, candidates)
    return place_copies(loads, counts, num_replicas, num_gpus, order_noise)


def replication_exponents(num_candidates: int, device: torch.device) -> torch.Tensor:
    """Exponent applied to the loads before replication, per candidate: [C, 1].

    1 for even candidates; odd ones fall linearly towards 0.5 (copies drift from the hottest experts
    to the mid-sized ones, which packs better when GPUs have few slots).
    """
    index = torch.arange(num_candidates, device=device, dtype=torch.float32)
    spread = 1.0 - MIN_EXPONENT_DROP * index / max(num_candidates - 1, 1)
    return torch.where(index % 2 == 1, spread, torch.ones_like(spread)).view(-1, 1)


def best_candidate(
    phy2log: torch.Tensor,
    gpu_loads: torch.Tensor,
    scenario_loads: torch.Tensor | None = None,
    loads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the candidate with the lowest max GPU load; with scenarios, the lowest mean of the
    max/mean ratio on the last window and on the scenarios' average.

    Given `loads` [P, E], candidates tied on the max GPU load go to the one whose heaviest copy is the
    lightest (`tie_break`), else to the lowest index. phy2log [P, C, R], gpu_loads [P, C, G],
    scenario_loads [P, S, E] -> (phy2log [P, R], max load [P]).
    """
    peaks = gpu_loads.max(-1).values
    if scenario_loads is not None:
        now = peaks / gpu_loads.mean(-1).clamp_min(1e-300)
        winner = (now + scenario_imbalance(phy2log, scenario_loads, gpu_loads.shape[-1])).argmin(-1)
    elif loads is not None:
        winner = tie_break(peaks, loads, phy2log)
    else:
        winner = peaks.argmin(-1)
    peak = peaks.gather(1, winner.unsqueeze(1)).squeeze(1)
    chosen = phy2log.gather(1, winner.view(-1, 1, 1).expand(-1, 1, phy2log.shape[-1])).squeeze(1)
    return chosen, peak


def copy_peaks(loads: torch.Tensor, phy2log: torch.Tensor) -> torch.Tensor:
    """The load of the heaviest copy of each candidate: loads [P, E], phy2log [P, C, R] -> [P, C]."""
    num_rows, num_candidates, _ = phy2log.shape
    counts = torch.zeros(num_rows, num_candidates, loads.shape[1], dtype=loads.dtype, device=loads.device)
    counts.scatter_add_(2, phy2log, torch.ones_like(phy2log, dtype=loads.dtype))
    return (loads.unsqueeze(1) / counts.clamp_min(1)).amax(-1)


def tie_break(peaks: torch.Tensor, loads: torch.Tensor, phy2log: torch.Tensor) -> torch.Tensor:
    """peaks [P, C], loads [P, E], phy2log [P, C, R] -> per row the index [P] of the lowest peak; among peaks
    equal to it (up to float64 rounding) the one whose heaviest copy is lightest, then the lowest index.

    Many count vectors often reach the same max GPU load (integer loads, layers at their lower bound);
    the one that spreads the hottest experts widest replicates where the load is, as operators and the
    engines' own tests expect, rather than giving spare copies to cold experts. On the CPU only rows
    with a tie are scored (the copy loads cost ~2 ms on the DeepSeek-V3 shape, and ties are rare on
    measured loads); on a GPU every row is, with no host sync.
    """
    num_rows, num_candidates = peaks.shape
    tied = peaks <= peaks.min(-1, keepdim=True).values * (1.0 + TIE_TOLERANCE)
    winner = tied.to(torch.int8).argmax(-1)  # the first tied candidate: the lowest index
    if peaks.device.type == "cpu":
        rows = (tied.sum(-1) > 1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return winner
    else:
        rows = torch.arange(num_rows, device=peaks.device)
    index = torch.arange(num_candidates, device=peaks.device).unsqueeze(0)
    heaviest = copy_peaks(loads[rows], phy2log[rows])
    return winner.index_copy(0, rows, exact.tie_winner(peaks[rows], heaviest, index, TIE_TOLERANCE))


def plan(
    loads: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    seeds: torch.Tensor,
    num_candidates: int,
    scenario_loads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """loads [P, E] float64 -> (phy2log [P, R], max GPU load [P]) over all GPUs of each row.

    scenario_loads [P, S, E] (see history.py) make the choice among candidates favour placements that
    stay balanced when the loads move as they have been moving. Without them, small rows with two
    slots per GPU are solved exactly (exact.py), or on the CPU by a climb over copy counts
    (pair_search.py) where the count table is too large.
    """
    if scenario_loads is None and exact.applies(loads.shape[1], num_replicas, num_gpus):
        return exact.pair_optimum(loads, num_replicas, num_gpus)
    scenarios = scenario_loads is not None
    if pair_search.applies(loads.device, loads.shape[1], num_replicas, num_gpus, num_candidates, scenarios):
        return pair_search.pair_plan(loads, num_replicas, num_gpus)
    phy2log_c, gpu_loads_c = candidate_placements(loads, num_replicas, num_gpus, seeds, num_candidates)
    phy2log, peak = best_candidate(phy2log_c, gpu_loads_c, loads=loads)
    improved, improved_peak = improve_replication(loads, phy2log, peak, num_gpus)
    if repartition.applies(num_replicas, num_gpus):
        improved, improved_peak = repartition.repartition(loads, improved, improved_peak, num_gpus)
    if scenario_loads is None:
        return improved, improved_peak
    # Where moving copies between experts lowered the peak the layer is hard and that wins; elsewhere
    # the candidate that stays balanced across the scenarios does.
    robust, robust_peak = best_candidate(phy2log_c, gpu_loads_c, scenario_loads)
    joint_won = improved_peak < peak
    return torch.where(joint_won.unsqueeze(1), improved, robust), torch.where(joint_won, improved_peak, robust_peak)
