"""Public entry points: `rebalance_experts` (the DeepSeek/vLLM drop-in) and `solve` (a rich result).

All argument checking happens here, once, with a `ValueError` naming the argument; the policies below
trust their inputs.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from . import maps
from .locality import group_locality
from .policies import POLICIES, SolveOptions, run_policy


@dataclass
class SolveResult:
    """A placement plus what a controller wants to know about it. Tensors live on the solver's device.

    phy2log [L, R], log2phy [L, E, X], logcnt [L, E] (int64); per-layer figures [L] on the planning loads.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    balancedness: torch.Tensor
    balancedness_before: torch.Tensor | None
    moved_copies: torch.Tensor
    policy_per_layer: list[str]
    device: str
    solve_seconds: float
    stats: dict = field(default_factory=dict)

    def triple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.phy2log, self.log2phy, self.logcnt


# Balancedness a plan may give up to ship fewer copies from the placement in force. Planning to the
# last window's noise is wasted work: on the drift series, 0.01 moves 0.15x the copies of a fresh plan
# and is *more* balanced on the next window than tighter settings (benchmarks/RESULTS.md).
DEFAULT_BALANCE_TOLERANCE = 0.01
# Max-load increase `auto` accepts per layer to keep every expert group on one node. 0 keeps `auto` never
# worse than the better reference policy (a 0.001 default lost 3e-5 balancedness on near-uniform loads);
# groups still stay local whenever that is free, and callers who value node-limited routing raise it.
DEFAULT_LOCALITY_TOLERANCE = 0.0


@contextlib.contextmanager
def cpu_threads(device: torch.device) -> Iterator[None]:
    """Run a CPU solve on REBALANCER_CPU_THREADS intra-op threads (default 1), restoring the setting after.

    The solver issues thousands of small tensor ops; OpenMP fork/join on them gains nothing and, on a
    busy host, one descheduled worker stalls every op (measured: a 2-thread solve 5-30x slower than a
    1-thread one while other processes load the two cores here).
    """
    wanted = int(os.environ.get("REBALANCER_CPU_THREADS", "1"))
    current = torch.get_num_threads()
    if device.type != "cpu" or wanted <= 0 or wanted == current:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(current)


def per_layer_scale(loads: torch.Tensor) -> torch.Tensor:
    """The largest load of each layer, 1 for an all-zero layer: [L, 1]."""
    peak = loads.amax(-1, keepdim=True)
    return torch.where(peak > 0, peak, torch.ones_like(peak))


def solver_path(device: torch.device) -> str:
    """Which implementation ran the hot loops: "triton" kernels or plain "torch" ops."""
    try:
        from .kernels import active_path
    except ImportError:
        return "torch"
    return active_path(device)


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def resolve_device(weight: torch.Tensor, device: str | torch.device | None) -> torch.device:
    """Where to solve: the explicit `device`, else the weight's own device."""
    if device is None or device == "auto":
        return weight.device
    return torch.device(device)


def validate(weight: object, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """Check every argument of the published signature; returns the weight as a tensor."""
    if not isinstance(weight, torch.Tensor):
        try:
            weight = torch.as_tensor(weight)
        except Exception as exc:
            raise ValueError(f"weight must be a 2-D tensor of loads: {exc}") from exc
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [layers, experts], got shape {tuple(weight.shape)}")
    if weight.dtype == torch.bool or weight.is_complex():
        raise ValueError(f"weight must hold real numbers, got dtype {weight.dtype}")
    num_layers, num_experts = weight.shape
    if num_layers == 0 or num_experts == 0:
        raise ValueError(f"weight must have at least one layer and one expert, got shape {tuple(weight.shape)}")
    _check_int("num_replicas", num_replicas)
    _check_int("num_groups", num_groups)
    _check_int("num_nodes", num_nodes)
    _check_int("num_gpus", num_gpus)
    if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite: found NaN or inf loads")
    if bool((weight < 0).any()):
        raise ValueError("weight must be non-negative: found negative loads")
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas ({num_replicas}) must be >= the number of experts ({num_experts})")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be divisible by num_gpus ({num_gpus})")
    if num_experts % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of experts ({num_experts})")
    if num_gpus % num_nodes:
        raise ValueError(f"num_nodes ({num_nodes}) must divide num_gpus ({num_gpus})")
    return weight


def solve(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = "auto",
    num_candidates: int | None = None,
    seed: int = 0,
    layer_seeds: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    prev_phy2log: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    max_moves_per_layer: int | None = None,
    balance_tolerance: float = DEFAULT_BALANCE_TOLERANCE,
    locality_tolerance: float = DEFAULT_LOCALITY_TOLERANCE,
) -> SolveResult:
    """Plan a placement for every layer of `weight` [L, E] and describe it.

    `layer_seeds` [L] fixes each layer's randomness (default `seed + layer index`), so a layer solved
    inside a batch gets the result it gets alone. `prev_phy2log` [L, R] is the placement in force:
    the result then moves few copies (within `balance_tolerance` of the best balancedness, and at most
    `max_moves_per_layer` moved copies per layer when given). `history` [T, L, E] holds window sums,
    newest last; it steers the choice among candidates of a fresh plan (ignored with `prev_phy2log`).
    `locality_tolerance` is the max-load increase `policy="auto"` accepts per layer to keep groups on
    their node.
    """
    weight = validate(weight, num_replicas, num_groups, num_nodes, num_gpus)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
    if num_candidates is not None:
        _check_int("num_candidates", num_candidates)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not (0.0 <= balance_tolerance < 1.0) or math.isnan(balance_tolerance):
        raise ValueError(f"balance_tolerance must be in [0, 1), got {balance_tolerance!r}")
    if not (0.0 <= locality_tolerance < 1.0) or math.isnan(locality_tolerance):
        raise ValueError(f"locality_tolerance must be in [0, 1), got {locality_tolerance!r}")
    if max_moves_per_layer is not None:
        _check_int("max_moves_per_layer", max_moves_per_layer, minimum=0)
    num_layers, num_experts = weight.shape
    target = resolve_device(weight, device)
    started = time.perf_counter()
    loads = weight.to(target, torch.float64)
    if layer_seeds is None:
        layer_seeds = seed + torch.arange(num_layers, dtype=torch.int64)
    else:
        layer_seeds = torch.as_tensor(layer_seeds, dtype=torch.int64)
        if layer_seeds.shape != (num_layers,):
            raise ValueError(f"layer_seeds must have shape [{num_layers}], got {tuple(layer_seeds.shape)}")
    layer_seeds = layer_seeds.to(target)
    if prev_phy2log is not None:
        prev_phy2log = torch.as_tensor(prev_phy2log)
        if prev_phy2log.shape != (num_layers, num_replicas):
            raise ValueError(
                f"prev_phy2log must have shape [{num_layers}, {num_replicas}], got {tuple(prev_phy2log.shape)}"
            )
        prev_phy2log = prev_phy2log.to(target, torch.int64)
        if bool(((prev_phy2log < 0) | (prev_phy2log >= num_experts)).any()):
            raise ValueError(f"prev_phy2log entries must be expert ids in [0, {num_experts})")
        if bool((maps.logcnt_from_phy2log(prev_phy2log, num_experts) == 0).any()):
            raise ValueError("prev_phy2log must host every expert at least once per layer")
    if history is not None:
        history = torch.as_tensor(history)
        if history.dim() != 3 or tuple(history.shape[1:]) != (num_layers, num_experts):
            raise ValueError(f"history must have shape [T, {num_layers}, {num_experts}], got {tuple(history.shape)}")
        if history.is_floating_point() and not bool(torch.isfinite(history).all()):
            raise ValueError("history must be finite: found NaN or inf loads")
        if bool((history < 0).any()):
            raise ValueError("history must be non-negative: found negative loads")
        history = history.to(target, torch.float64)

    options = SolveOptions(
        num_replicas=num_replicas,
        num_groups=num_groups,
        num_nodes=num_nodes,
        num_gpus=num_gpus,
        num_candidates=num_candidates,
        layer_seeds=layer_seeds,
        prev_phy2log=prev_phy2log,
        history=history,
        max_moves_per_layer=max_moves_per_layer,
        balance_tolerance=balance_tolerance,
        locality_tolerance=locality_tolerance,
    )
    # Planning is scale-free; per-layer scaling to a max of 1 keeps float32 sums of huge loads finite.
    # The published algorithm is left to see the loads exactly as given.
    planning_loads = loads if policy == "deepseek" else loads / per_layer_scale(loads)
    # The scoring below runs under the same thread setting: on tiny tensors a 2-thread reduction waits
    # for a descheduled worker on a busy host (measured: `max` at 1-2 ms per call).
    with cpu_threads(target):
        phy2log, policy_per_layer, stats = run_policy(policy, planning_loads, options)
        logcnt = maps.logcnt_from_phy2log(phy2log, num_experts)
        log2phy = maps.log2phy_from_phy2log(phy2log, logcnt, stats.pop("phy_rank", None))
        if prev_phy2log is None:
            moved = torch.zeros(num_layers, dtype=torch.int64, device=target)
            before = None
        else:
            moved = maps.moved_copies(prev_phy2log, phy2log, num_experts, num_gpus)
            prev_logcnt = maps.logcnt_from_phy2log(prev_phy2log, num_experts)
            before = maps.balancedness(loads, prev_phy2log, prev_logcnt, num_gpus)
        if num_groups > 1 and num_nodes > 1 and num_groups % num_nodes == 0:
            stats.update(group_locality(loads, phy2log, logcnt, num_groups, num_nodes))
        stats.setdefault("path", solver_path(target))
        balance = maps.balancedness(loads, phy2log, logcnt, num_gpus)
    return SolveResult(
        phy2log=phy2log,
        log2phy=log2phy,
        logcnt=logcnt,
        balancedness=balance,
        balancedness_before=before,
        moved_copies=moved,
        policy_per_layer=policy_per_layer,
        device=str(target),
        solve_seconds=time.perf_counter() - started,
        stats=stats,
    )


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for DeepSeek/vLLM `rebalance_experts`: returns (phy2log [L, R], log2phy [L, E, X], logcnt [L, E]).

    Keyword options are those of `solve` (policy, num_candidates, seed, device, prev_phy2log, history, ...).
    """
    return solve(weight, num_replicas, num_groups, num_nodes, num_gpus, **options).triple()
