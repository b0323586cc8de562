"""Scenarios of the next window drawn from the observed window-to-window variation.

A placement planned on the last window only is balanced for loads that are already gone. Given the
window sums of the recent past, each scenario applies to the last loads one observed change of every
expert's share between two consecutive windows (and its reverse); candidates are then scored on the
last window and on all scenarios at once.
"""

from __future__ import annotations

import torch

from .maps import ratio

# Smoothing of shares so that experts with no tokens in a window get a finite log-ratio.
SHARE_FLOOR = 1e-6


def scenarios(loads: torch.Tensor, history: torch.Tensor, max_scenarios: int = 8) -> torch.Tensor:
    """loads [L, E], history [T, L, E] (newest last) -> scenario loads [L, S, E], S <= max_scenarios.

    Scenario 2k scales each expert by exp(r) for the k-th most recent observed log-share change r, and
    scenario 2k + 1 by exp(-r); every scenario keeps the layer's total load.
    """
    num_windows = history.shape[0]
    if num_windows < 2:
        return loads.unsqueeze(1)
    shares = ratio(history, history.sum(-1, keepdim=True), 0.0)
    log_shares = (shares + SHARE_FLOOR).log()
    changes = (log_shares[1:] - log_shares[:-1]).flip(0)[: max(1, max_scenarios // 2)]  # [S/2, L, E]
    changes = torch.cat([changes, -changes], 0).permute(1, 0, 2)  # [L, S, E]
    scaled = loads.unsqueeze(1) * changes.exp()
    total = loads.sum(-1, keepdim=True).unsqueeze(1)
    return scaled * ratio(total, scaled.sum(-1, keepdim=True), 0.0)


def scenario_imbalance(phy2log: torch.Tensor, scenario_loads: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Mean over scenarios of max/mean GPU load for each candidate placement.

    phy2log [P, C, R], scenario_loads [P, S, E] -> [P, C] (1.0 is perfect).
    """
    num_rows, num_candidates, num_slots = phy2log.shape
    num_experts = scenario_loads.shape[-1]
    counts = torch.zeros(num_rows, num_candidates, num_experts, dtype=scenario_loads.dtype, device=phy2log.device)
    counts.scatter_add_(2, phy2log, torch.ones_like(phy2log, dtype=scenario_loads.dtype))
    per_copy = scenario_loads.unsqueeze(1) / counts.unsqueeze(2)  # [P, C, S, E]
    slot = per_copy.gather(3, phy2log.unsqueeze(2).expand(-1, -1, scenario_loads.shape[1], -1))  # [P, C, S, R]
    gpu = slot.view(num_rows, num_candidates, -1, num_gpus, num_slots // num_gpus).sum(-1)
    return ratio(gpu.max(-1).values, gpu.mean(-1), 1.0).mean(-1)
