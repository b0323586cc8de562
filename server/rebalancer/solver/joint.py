"""Joint replication and placement: move copies between experts when that lowers the max GPU load.

Greedy replication minimises the largest load per copy, which is not what packing needs: loads
[600, 560, 120, 120, 20, 10, 10, 10] on 8 GPUs x 2 slots reach 232 with greedy copies, 196.67 with
copies moved from the 560 expert to the 120 ones. For every layer still above its lower bound, each
round tries the T x T moves "one copy from donor y to receiver x" (receivers: the largest loads per
copy; donors: the experts that lose least by giving one up), packs every neighbour at once with the
batched planner, and keeps the best one when it lowers the max GPU load.
"""

from __future__ import annotations

import torch

from .cancel import checkpoint
from .maps import logcnt_from_phy2log


def lower_bound(loads: torch.Tensor, counts: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """max(total / G, largest load per copy) for given copies: [P]."""
    return torch.maximum(loads.sum(-1) / num_gpus, (loads / counts).max(-1).values)


def copy_moves(loads: torch.Tensor, counts: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    """The T x T candidate moves "donor y gives one copy to receiver x" of each row.

    Receivers have the largest loads per copy; donors are experts with a spare copy that lose least by
    giving it up (smallest load per copy afterwards). loads, counts [P, E] -> (x [P, M], y [P, M],
    valid [P, M]) with M = T * T; a move is invalid when x == y or y has a single copy.
    """
    num_rows, num_experts = counts.shape
    width = min(width, num_experts)
    receivers = (loads / counts).topk(width, dim=-1).indices  # [P, T]
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


def improve_replication(
    loads: torch.Tensor,
    phy2log: torch.Tensor,
    peak: torch.Tensor,
    num_gpus: int,
    pack_counts,
    *,
    rounds: int = 4,
    width: int = 5,
    slack: float = 5e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hill-climb the copies of the layers whose max GPU load exceeds their lower bound.

    loads [P, E] float64, phy2log [P, R], peak [P]; `pack_counts(loads [Q, E], counts [Q, E])` places
    given copies and returns (phy2log [Q, R], peak [Q]). Returns the improved (phy2log, peak).
    """
    num_experts = loads.shape[1]
    counts = logcnt_from_phy2log(phy2log, num_experts)
    bound = lower_bound(loads, counts, num_gpus)
    open_rows = peak > bound * (1.0 + slack)
    if loads.device.type == "cpu":
        rows = open_rows.nonzero().squeeze(1)
        if rows.numel() == 0:
            return phy2log, peak
    else:
        rows = torch.arange(loads.shape[0], device=loads.device)
    sub_loads, sub_counts, sub_phy, sub_peak = loads[rows], counts[rows], phy2log[rows], peak[rows]
    for _ in range(rounds):
        checkpoint()
        trial = moved_counts(sub_counts, *copy_moves(sub_loads, sub_counts, width))  # [Q, M, E]
        num_moves = trial.shape[1]
        trial_loads = sub_loads.unsqueeze(1).expand(-1, num_moves, -1).reshape(-1, num_experts)
        trial_phy, trial_peak = pack_counts(trial_loads, trial.view(-1, num_experts))
        trial_peak = trial_peak.view(-1, num_moves)
        best_peak, best = trial_peak.min(1)
        better = best_peak < sub_peak * (1.0 - 1e-9)
        chosen_phy = trial_phy.view(-1, num_moves, trial_phy.shape[-1]).gather(
            1, best.view(-1, 1, 1).expand(-1, 1, trial_phy.shape[-1])
        )
        sub_phy = torch.where(better.unsqueeze(1), chosen_phy.squeeze(1), sub_phy)
        sub_peak = torch.where(better, best_peak, sub_peak)
        sub_counts = logcnt_from_phy2log(sub_phy, num_experts)
    phy2log, peak = phy2log.clone(), peak.clone()
    keep = open_rows[rows]
    phy2log[rows] = torch.where(keep.unsqueeze(1), sub_phy, phy2log[rows])
    peak[rows] = torch.where(keep, sub_peak, peak[rows])
    return phy2log, peak
