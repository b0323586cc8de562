"""Dispatcher from policy name to algorithm; every policy maps loads [L, E] to phy2log [L, R]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .deepseek import rebalance_deepseek


@dataclass
class SolveOptions:
    """Topology and knobs shared by every policy (already validated by the API)."""

    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int
    num_candidates: int | None
    layer_seeds: torch.Tensor
    prev_phy2log: torch.Tensor | None
    history: torch.Tensor | None
    max_moves_per_layer: int | None
    balance_tolerance: float
    locality_tolerance: float


def _deepseek(loads: torch.Tensor, opts: SolveOptions) -> tuple[torch.Tensor, list[str], dict]:
    # The published algorithm runs on the CPU in float32; running it there keeps it bit for bit.
    phy2log = rebalance_deepseek(
        loads.float().cpu(), opts.num_replicas, opts.num_groups, opts.num_nodes, opts.num_gpus
    ).to(loads.device)
    return phy2log, ["deepseek"] * loads.shape[0], {}


POLICIES = {"deepseek": _deepseek, "auto": _deepseek, "global": _deepseek, "hierarchical": _deepseek}


def run_policy(name: str, loads: torch.Tensor, opts: SolveOptions) -> tuple[torch.Tensor, list[str], dict]:
    return POLICIES[name](loads, opts)
