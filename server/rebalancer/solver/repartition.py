"""Three-GPU repartition: a larger local move for small layers with three or more slots per GPU.

Swap refinement and joint copy moves change one or two GPUs at a time; a placement can be stuck
there several % above the optimum (16 experts, 6 GPUs x 3 slots: 278.5 where 271.5 exists, and no
re-split of the heaviest GPU with any one other lowers it). Each round here re-splits the copies of
the heaviest GPU and two others in the best of all ways (9 copies into 3 GPUs of 3: 280 ways, for each
of the C(G - 1, 2) pairs of other GPUs) and keeps it when the largest of the three falls. Every kept
round lowers the sorted GPU loads lexicographically, so the search cannot cycle. It runs only where
the whole neighbourhood is small (a property of the shape, so a layer's result does not depend on its
batch).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from .cancel import checkpoint
from .maps import logcnt_from_phy2log

# Largest neighbourhood, pairs of other GPUs x ways x copies, scored per layer and round (float64):
# 6 GPUs x 3 slots is 10 x 280 x 9; 10 GPUs x 3 slots (36 x 280 x 9) is already past it.
MAX_NEIGHBOURHOOD = 1 << 16
ROUNDS = 8
# Scored elements of one block of rows (its [P, T, W, 3S] tables): memory and the time between
# cancellation checkpoints stay bounded (4,000 layers of 12 experts on 8 GPUs x 3 slots at once: ~5 GB).
BLOCK_ELEMENTS = 1 << 21
# A kept re-split lowers the largest of its three GPUs by at least this relative amount.
MIN_GAIN = 1e-9


def num_ways(slots_per_gpu: int) -> int:
    """Ways to split 3 S copies into 3 unlabelled groups of S: (3S)! / (S!^3 3!)."""
    return math.factorial(3 * slots_per_gpu) // (math.factorial(slots_per_gpu) ** 3 * 6)


def neighbourhood(num_replicas: int, num_gpus: int) -> int:
    """Elements one row's round scores: pairs of other GPUs x ways x copies."""
    slots = num_replicas // num_gpus
    return math.comb(num_gpus - 1, 2) * num_ways(slots) * 3 * slots


def applies(num_replicas: int, num_gpus: int) -> bool:
    """Whether layers of R slots on G GPUs get the repartition: 3+ slots per GPU, a small neighbourhood.
    Cheap for any shape (the admission model asks on the service's event loop): past MAX_SLOTS_PER_GPU the
    ways alone are too many, and (3S)! is never computed for them (S = 2**17: 7 s)."""
    slots = num_replicas // num_gpus
    if not 3 <= slots <= MAX_SLOTS_PER_GPU or num_gpus < 3:
        return False
    return neighbourhood(num_replicas, num_gpus) <= MAX_NEIGHBOURHOOD


# The most slots per GPU whose ways fit the neighbourhood with a single pair of other GPUs.
MAX_SLOTS_PER_GPU = next(s for s in itertools.count(3) if 3 * s * num_ways(s) > MAX_NEIGHBOURHOOD) - 1


@functools.cache
def _ways(slots_per_gpu: int) -> torch.Tensor:
    """Every split of positions 0 .. 3S - 1 into three groups of S, group after group: [W, 3S] int64."""
    positions = range(3 * slots_per_gpu)
    splits = []
    for rest_first in itertools.combinations(positions[1:], slots_per_gpu - 1):
        first = (0, *rest_first)
        rest = [p for p in positions if p not in first]
        for rest_second in itertools.combinations(rest[1:], slots_per_gpu - 1):
            second = (rest[0], *rest_second)
            splits.append([*first, *second, *(p for p in rest if p not in second)])
    return torch.tensor(splits, dtype=torch.int64)


@functools.cache
def _partner_pairs(num_gpus: int) -> torch.Tensor:
    """For each GPU h, every pair of other GPUs: [G, C(G - 1, 2), 2] int64."""
    return torch.tensor(
        [list(itertools.combinations([g for g in range(num_gpus) if g != h], 2)) for h in range(num_gpus)],
        dtype=torch.int64,
    )


def repartition(
    loads: torch.Tensor, phy2log: torch.Tensor, peak: torch.Tensor, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """loads [P, E] float64, phy2log [P, R] and its max GPU load [P] -> the improved (phy2log, peak).

    Requires `applies(R, G)`. Copies keep their counts; only which GPU hosts them changes. Rows at the
    lower bound (total / G, or their largest copy) are left alone; on a GPU every row runs ROUNDS rounds,
    masked, so the host never waits.
    """
    num_rows, num_replicas = phy2log.shape
    slots = num_replicas // num_gpus
    per_copy = loads / logcnt_from_phy2log(phy2log, loads.shape[1]).clamp_min(1)  # [P, E]
    bound = torch.maximum(loads.sum(1) / num_gpus, per_copy.max(1).values)
    open_rows = peak > bound * (1.0 + MIN_GAIN)
    on_cpu = loads.device.type == "cpu"
    rows = open_rows.nonzero().squeeze(1) if on_cpu else torch.arange(num_rows, device=loads.device)
    if rows.numel() == 0:
        return phy2log, peak
    phy2log, peak = phy2log.clone(), peak.clone()
    # Rows in blocks of at most BLOCK_ELEMENTS scored elements (layers are independent problems).
    for block in rows.split(max(1, BLOCK_ELEMENTS // neighbourhood(num_replicas, num_gpus))):
        gpu_experts = _repartition_rows(per_copy[block], phy2log[block].view(-1, num_gpus, slots), on_cpu)
        phy2log[block] = gpu_experts.reshape(-1, num_replicas)
        gpu_loads = per_copy[block].gather(1, phy2log[block]).view(-1, num_gpus, slots).sum(-1)
        peak[block] = gpu_loads.max(1).values
    return phy2log, peak


def _repartition_rows(per_copy: torch.Tensor, gpu_experts: torch.Tensor, on_cpu: bool) -> torch.Tensor:
    """The rounds of one block of rows: per_copy [P, E], gpu_experts [P, G, S] -> gpu_experts."""
    for _ in range(ROUNDS):
        checkpoint()
        gpu_experts, improved = _round(per_copy, gpu_experts, gpu_experts.shape[2])
        if on_cpu and not bool(improved.any()):
            break
    return gpu_experts


def _round(per_copy: torch.Tensor, gpu_experts: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One re-split per row: per_copy [P, E], gpu_experts [P, G, S] -> (gpu_experts, improved [P] bool)."""
    num_rows, num_gpus, _ = gpu_experts.shape
    device = gpu_experts.device
    gpu_loads = per_copy.gather(1, gpu_experts.view(num_rows, -1)).view(num_rows, num_gpus, slots).sum(-1)
    heaviest = gpu_loads.argmax(1)  # [P]
    partners = _partner_pairs(num_gpus).to(device)[heaviest]  # [P, T, 2]
    groups = torch.cat([heaviest.view(-1, 1, 1).expand(-1, partners.shape[1], 1), partners], 2)  # [P, T, 3]
    pool = gpu_experts.gather(1, groups.view(num_rows, -1, 1).expand(-1, -1, slots))  # [P, 3T, S]
    pool = pool.view(num_rows, -1, 3 * slots)  # [P, T, 3S] experts
    ways = _ways(slots).to(device)  # [W, 3S]
    arranged = pool[:, :, ways]  # [P, T, W, 3S]
    split_loads = per_copy.gather(1, arranged.view(num_rows, -1)).view(*arranged.shape[:3], 3, slots).sum(-1)
    largest = split_loads.max(-1).values.view(num_rows, -1)  # [P, T * W]
    value, choice = largest.min(1)
    improved = value < gpu_loads.max(1).values * (1.0 - MIN_GAIN)
    chosen = arranged.view(num_rows, -1, 3 * slots).gather(1, choice.view(-1, 1, 1).expand(-1, 1, 3 * slots))
    chosen_groups = groups.gather(1, (choice // ways.shape[0]).view(-1, 1, 1).expand(-1, 1, 3)).squeeze(1)
    updated = gpu_experts.scatter(1, chosen_groups.unsqueeze(2).expand(-1, -1, slots), chosen.view(num_rows, 3, slots))
    return torch.where(improved.view(-1, 1, 1), updated, gpu_experts), improved
