"""Dispatcher from policy name to algorithm; every policy maps loads [L, E] to phy2log [L, R].

`deepseek` is the published algorithm (the baseline); `global` and `hierarchical` run the
multi-candidate solver over all GPUs or node by node; `auto` solves both and keeps, per layer, the
hierarchical plan only when its max GPU load is within `locality_tolerance` of the global one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rebalancer_wire.options import BY_NAME

from . import small
from .deepseek import rebalance_deepseek
from .hierarchical import plan_hierarchical
from .history import scenarios
from .maps import gpu_loads, logcnt_from_phy2log, moved_copies
from .migration import migrate
from .planner import plan

# Candidates per layer when the caller does not say: 64 on a GPU (they run in parallel), fewer on a
# CPU where each costs time; quality on the public and unseen workloads holds at this count.
DEFAULT_CANDIDATES = {"cuda": 64, "cpu": 4}


@dataclass
class SolveOptions:
    """Topology and knobs shared by every policy (already validated by the API)."""

    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int
    num_candidates: int | None
    seed: int
    given_layer_seeds: torch.Tensor | None  # [L] on the solve device; None: seed + layer index
    prev_phy2log: torch.Tensor | None
    history: torch.Tensor | None
    max_moves_per_layer: int | None
    balance_tolerance: float
    locality_tolerance: float

    scenario_loads: torch.Tensor | None = None  # [L, S, E], from the history

    def candidates(self, device: torch.device) -> int:
        if self.num_candidates is not None:
            return self.num_candidates
        return DEFAULT_CANDIDATES.get(device.type, DEFAULT_CANDIDATES["cuda"])

    def layer_seeds(self, loads: torch.Tensor) -> torch.Tensor:
        """Each layer's seed [L] on the loads' device, made only where a candidate path asks (the host-side
        small plans take none, and a torch op costs them 15-25 us on a cold cache)."""
        if self.given_layer_seeds is not None:
            return self.given_layer_seeds
        num_layers = loads.shape[0]
        if self.seed + num_layers <= torch.iinfo(torch.int64).max:
            return torch.arange(self.seed, self.seed + num_layers, dtype=torch.int64, device=loads.device)
        return (self.seed + torch.arange(num_layers, dtype=torch.int64)).to(loads.device)  # int64 wraps past the top

    @property
    def hierarchy_applies(self) -> bool:
        """Groups can be kept on nodes only when they divide evenly over more than one node."""
        return self.num_nodes > 1 and self.num_groups % self.num_nodes == 0


PolicyResult = tuple[torch.Tensor, list[str], dict]


def _deepseek(loads: torch.Tensor, opts: SolveOptions) -> PolicyResult:
    # The published algorithm runs on the CPU in float32; running it there keeps it bit for bit,
    # including the order of each expert's copies in log2phy (by replica rank, not by slot).
    phy2log, phy_rank = rebalance_deepseek(
        loads.float().cpu(), opts.num_replicas, opts.num_groups, opts.num_nodes, opts.num_gpus
    )
    return phy2log.to(loads.device), ["deepseek"] * loads.shape[0], {"phy_rank": phy_rank.to(loads.device)}


def _global(loads: torch.Tensor, opts: SolveOptions) -> PolicyResult:
    phy2log, _ = plan(
        loads,
        opts.num_replicas,
        opts.num_gpus,
        opts.layer_seeds(loads),
        opts.candidates(loads.device),
        opts.scenario_loads,
    )
    return phy2log, ["global"] * loads.shape[0], {}


def _hierarchical(loads: torch.Tensor, opts: SolveOptions) -> PolicyResult:
    if not opts.hierarchy_applies:
        return _global(loads, opts)
    phy2log, _ = _plan_local(loads, opts)
    return phy2log, ["hierarchical"] * loads.shape[0], {}


def _plan_local(loads: torch.Tensor, opts: SolveOptions, ceiling: torch.Tensor | None = None):
    """The hierarchical plan (groups kept on one node): (phy2log [L, R], max GPU load [L])."""
    num_experts = loads.shape[1]
    scenarios = opts.scenario_loads is not None
    if small.applies(loads.device, num_experts, opts.num_replicas, opts.num_nodes, opts.num_gpus, scenarios):
        return small.plan_hierarchical(
            loads, opts.num_replicas, opts.num_groups, opts.num_nodes, opts.num_gpus, ceiling
        )
    return plan_hierarchical(
        loads,
        opts.num_replicas,
        opts.num_groups,
        opts.num_nodes,
        opts.num_gpus,
        opts.layer_seeds(loads),
        opts.candidates(loads.device),
        ceiling,
        scenario_loads=opts.scenario_loads,
    )


def _auto(loads: torch.Tensor, opts: SolveOptions) -> PolicyResult:
    candidates = opts.candidates(loads.device)
    scenarios = opts.scenario_loads is not None
    shape = (loads.shape[1], opts.num_replicas, opts.num_nodes, opts.num_gpus)
    if opts.hierarchy_applies and small.serves_auto(loads.device, *shape, candidates, scenarios):
        phy2log, names = small.plan_auto(
            loads, opts.num_replicas, opts.num_groups, opts.num_nodes, opts.num_gpus, opts.locality_tolerance
        )
        return phy2log, names, {}
    flat, flat_peak = plan(
        loads, opts.num_replicas, opts.num_gpus, opts.layer_seeds(loads), candidates, opts.scenario_loads
    )
    if not opts.hierarchy_applies:
        return flat, ["global"] * loads.shape[0], {}
    ceiling = flat_peak * (1.0 + opts.locality_tolerance)
    local, local_peak = _plan_local(loads, opts, ceiling)
    keep_local = local_peak <= ceiling
    phy2log = torch.where(keep_local.unsqueeze(1), local, flat)
    names = ["hierarchical" if local else "global" for local in keep_local.tolist()]
    return phy2log, names, {}


POLICIES = {"auto": _auto, "deepseek": _deepseek, "global": _global, "hierarchical": _hierarchical}
if set(POLICIES) != set(BY_NAME["policy"].choices):
    raise ImportError(f"solver policies {sorted(POLICIES)} differ from the declared {BY_NAME['policy'].choices}")


def run_policy(name: str, loads: torch.Tensor, opts: SolveOptions) -> PolicyResult:
    """Plan with the named policy; with a placement in force, trade a sliver of balance for few moves."""
    # History steers fresh plans only: with a placement in force it measured slightly worse on the next
    # window (-0.0007 +- 0.0003 balancedness, benchmarks/RESULTS.md), as it loosens the incremental target.
    if opts.history is not None and opts.scenario_loads is None and opts.prev_phy2log is None:
        opts.scenario_loads = scenarios(loads, opts.history)
    phy2log, names, stats = POLICIES[name](loads, opts)
    if opts.prev_phy2log is None:
        return phy2log, names, stats
    if name == "deepseek":
        if opts.max_moves_per_layer is not None:
            # The published plan ignores the placement in force, but the cap holds: a layer it would move
            # more copies than allowed keeps its placement.
            moved = moved_copies(opts.prev_phy2log, phy2log, loads.shape[1], opts.num_gpus)
            over = moved > opts.max_moves_per_layer
            phy2log = torch.where(over.unsqueeze(1), opts.prev_phy2log, phy2log)
            names = [f"{policy}/kept" if kept else policy for policy, kept in zip(names, over.tolist(), strict=True)]
        return phy2log, names, stats
    peak = gpu_loads(loads, phy2log, logcnt_from_phy2log(phy2log, loads.shape[1]), opts.num_gpus).max(-1).values
    local_layers = torch.tensor([policy == "hierarchical" for policy in names], device=loads.device)
    phy2log, origins = migrate(
        loads,
        opts.prev_phy2log,
        phy2log,
        peak,
        opts.num_gpus,
        opts.balance_tolerance,
        opts.max_moves_per_layer,
        local_layers,
        opts.num_groups,
        opts.num_nodes,
    )
    names = [f"{policy}/{origin}" for policy, origin in zip(names, origins, strict=True)]
    return phy2log, names, stats
