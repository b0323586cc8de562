"""Public entry points: `rebalance_experts` (the DeepSeek/vLLM drop-in) and `solve` (a rich result).

All argument checking happens here, once, with a `ValueError` naming the argument; the policies below
trust their inputs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rebalancer_wire.options import BY_NAME, ArgumentError
from rebalancer_wire.options import check as check_options
from rebalancer_wire.topology import planning_layout, topology_violations

from . import maps
from .arrivals import near_sources, tradeable_layers
from .elastic import elastic_gpu_ids, elastic_moves, plan_elastic, refused_caps_reason
from .locality import group_locality
from .migration import keep_old_slots
from .policies import SolveOptions, run_policy
from .rearrangement import Rearrangement, rearrange, usable_gpus
from .transfers import CostModel, old_content


@dataclass
class SolveResult:
    """A placement plus what a controller wants to know about it. Tensors live on the solver's device.

    phy2log [L, R] int64. log2phy [L, E, X], logcnt [L, E] (int64) and the per-layer figures [L] on the
    planning loads (balancedness; balancedness before and moved copies against the placement in force;
    the group locality in `stats`) are computed on first read: on small problems (2 x 12 -> 16 slots)
    they cost as much as the plan, and many callers (a drop-in planner, a benchmark) read phy2log only.
    """

    phy2log: torch.Tensor
    policy_per_layer: list[str]
    device: str
    solve_seconds: float
    # With a placement in force: the copies to ship, [T, 5] rows (layer, expert, destination GPU,
    # destination slot, source GPU), see transfers.py, and their cost under the cost model.
    transfers: torch.Tensor | None = None
    moved_bytes: float = 0.0
    intra_node_share: float = 1.0
    estimated_transfer_seconds: float = 0.0
    # The GPU ids of the layout phy2log describes, [G_new]: the identity unless the GPU set changed.
    gpu_ids: torch.Tensor | None = None
    # Layers a transfer budget held back on the placement in force (their plan follows next time).
    deferred_layers: int = 0
    # What the figures are computed from: the checked request and the planner's own stats.
    request: _Request | None = field(default=None, repr=False)
    plan_stats: dict = field(default_factory=dict, repr=False)

    def triple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.phy2log, self.log2phy, self.logcnt

    @functools.cached_property
    def logcnt(self) -> torch.Tensor:
        return maps.logcnt_from_phy2log(self.phy2log, self.request.loads.shape[1])

    @functools.cached_property
    def log2phy(self) -> torch.Tensor:
        return self.log2phy_as(torch.int64)

    def log2phy_as(self, dtype: torch.dtype) -> torch.Tensor:
        """log2phy [L, E, X] of `dtype` (slot ids must fit; not kept): built narrow, a wire answer in int16
        writes and encodes a quarter of the int64 bytes."""
        if "log2phy" in vars(self):
            return self.log2phy.to(dtype)
        with cpu_threads(self.phy2log.device):
            return maps.log2phy_from_phy2log(self.phy2log, self.logcnt, self.plan_stats.get("phy_rank"), dtype)

    @functools.cached_property
    def balancedness(self) -> torch.Tensor:
        request = self.request
        num_gpus = request.options.num_gpus if request.gpu_ids is None else request.gpu_ids.numel()
        # Scoring runs under the solve's thread setting: on tiny tensors a 2-thread reduction waits for a
        # descheduled worker on a busy host (measured: `max` at 1-2 ms per call).
        with cpu_threads(self.phy2log.device):
            return maps.balancedness(request.loads, self.phy2log, self.logcnt, num_gpus)

    @property
    def moved_copies(self) -> torch.Tensor:
        return self._against_placement_in_force[0]

    @property
    def balancedness_before(self) -> torch.Tensor | None:
        return self._against_placement_in_force[1]

    @functools.cached_property
    def _against_placement_in_force(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        with cpu_threads(self.phy2log.device):
            return _against_placement_in_force(self.request, self.phy2log)

    @property
    def path(self) -> str:
        """Which implementation ran the hot loops, "triton" or "torch": what a caller labels its metrics
        with, without the locality scoring reading `stats` costs (~0.7 ms on 58 x 256 -> 288 slots)."""
        return str(self.plan_stats.get("path", solver_path(self.request.device)))

    @functools.cached_property
    def stats(self) -> dict:
        """The planner's figures, the kernel path and, with groups kept on nodes, their locality [L]."""
        request = self.request
        stats = {name: value for name, value in self.plan_stats.items() if name != "phy_rank"}
        if request.gpu_ids is None and request.options.hierarchy_applies:
            options = request.options
            with cpu_threads(self.phy2log.device):
                locality = group_locality(
                    request.loads, self.phy2log, self.logcnt, options.num_groups, options.num_nodes
                )
            stats.update(locality)
        stats.setdefault("path", self.path)
        return stats


DEFAULT_BALANCE_TOLERANCE: float = BY_NAME["balance_tolerance"].default
DEFAULT_LOCALITY_TOLERANCE: float = BY_NAME["locality_tolerance"].default
_DEFAULT_COST = CostModel().validate()


@functools.cache
def wanted_cpu_threads() -> int:
    """REBALANCER_CPU_THREADS (default 1; 0 or less leaves torch's setting alone), read once per process:
    the environment lookup costs ~10 us on a cold cache, where a README-sized solve takes ~0.2 ms."""
    return int(os.environ.get("REBALANCER_CPU_THREADS", "1"))


class cpu_threads(contextlib.AbstractContextManager):  # noqa: N801 - used like a function
    """Run a CPU solve on REBALANCER_CPU_THREADS intra-op threads (default 1), restoring the setting after.

    The solver issues thousands of small tensor ops; OpenMP fork/join on them gains nothing and, on a
    busy host, one descheduled worker stalls every op (measured: a 2-thread solve 5-30x slower than a
    1-thread one while other processes load the two cores here). A class, not a generator: entered
    several times per solve, and on README-sized problems a solve takes ~0.1 ms.
    """

    def __init__(self, device: torch.device) -> None:
        self.restore = None
        wanted = wanted_cpu_threads()
        if device.type == "cpu" and wanted > 0 and wanted != (current := torch.get_num_threads()):
            self.wanted, self.restore = wanted, current

    def __enter__(self) -> None:
        if self.restore is not None:
            torch.set_num_threads(self.wanted)

    def __exit__(self, *_: object) -> None:
        if self.restore is not None:
            torch.set_num_threads(self.restore)


def per_layer_scale(loads: torch.Tensor) -> torch.Tensor:
    """The largest load of each layer, 1 for an all-zero layer: [L, 1]."""
    peak = loads.amax(-1, keepdim=True)
    return torch.where(peak > 0, peak, torch.ones_like(peak))


def scaled_to_unit_peak(loads: torch.Tensor) -> torch.Tensor:
    """loads [L, E] / `per_layer_scale`; on the CPU in NumPy (the same float64 division, half the time)."""
    if loads.device.type != "cpu":
        return loads / per_layer_scale(loads)
    values = loads.numpy()
    peak = values.max(-1, keepdims=True)
    return torch.from_numpy(values / np.where(peak > 0, peak, 1.0))


# Plans and per-layer figures are scale-free, so layers with peaks beyond these powers of two are scaled
# (exactly, by a power of two): below 2**960 float64 sums of up to 2**60 loads stay finite; the published
# algorithm's float32 sums of up to 2**40 loads need peaks within 2**+-64.
FLOAT64_SAFE_EXPONENT = 960
FLOAT32_SAFE_EXPONENT = 64


def within_exponent(loads: torch.Tensor, limit: int) -> torch.Tensor:
    """loads [L, E] with each layer whose peak lies outside 2**+-limit scaled by a power of two to a peak
    near 1 (float sums would overflow to inf, or float32 values underflow to zeros). A power of two
    scales exactly, so the values and their ties are those of the same loads given in range."""
    peak = loads.amax(-1, keepdim=True)
    exponent = torch.frexp(peak).exponent
    outside = (peak > 0) & (exponent.abs() > limit)
    if not bool(outside.any()):
        return loads
    return torch.ldexp(loads, torch.where(outside, -exponent, 0))


def solver_path(device: torch.device) -> str:
    """Which implementation ran the hot loops: "triton" kernels or plain "torch" ops."""
    from .kernels import active_path

    return active_path(device)


def resolve_device(weight: torch.Tensor, device: str | torch.device | None) -> torch.device:
    """Where to solve: the explicit `device`, else the weight's own device."""
    if device is None or device == "auto":
        return weight.device
    return torch.device(device)


def host_array(tensor: torch.Tensor) -> np.ndarray | None:
    """A NumPy view of a CPU tensor, or None (another device, autograd, or a dtype NumPy lacks)."""
    if tensor.device.type != "cpu" or tensor.requires_grad or tensor.dtype in (torch.bfloat16, torch.bool):
        return None
    return tensor.numpy()


def validate(weight: object, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """Check every argument of the published signature; returns the weight as a tensor.

    Accepts what the published function accepts: the group and node rules apply only on its hierarchical
    path (groups % nodes == 0); otherwise it plans globally and so do the policies here.
    """
    if not isinstance(weight, torch.Tensor):
        try:
            weight = torch.as_tensor(weight)
        except Exception as exc:
            raise ArgumentError("weight", f"must be a 2-D tensor of loads: {exc}") from exc
    if weight.dim() != 2:
        raise ArgumentError("weight", f"must be 2-D [layers, experts], got shape {tuple(weight.shape)}")
    if weight.dtype == torch.bool or weight.is_complex():
        raise ArgumentError("weight", f"must hold real numbers, got dtype {weight.dtype}")
    num_layers, num_experts = weight.shape
    if num_layers == 0 or num_experts == 0:
        raise ArgumentError("weight", f"must have at least one layer and one expert, got shape {tuple(weight.shape)}")
    violations = topology_violations(num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus)
    if violations:
        raise ArgumentError(*violations[0])
    # One reduction and one host read for valid loads (min and max propagate NaN); which rule a bad
    # weight breaks is worked out only then. On the CPU in NumPy: each torch op costs 15-25 us on a cold
    # cache, where a README-sized solve takes ~0.2 ms.
    host = host_array(weight)
    if host is not None:
        low, high = float(host.min()), float(host.max())
    else:
        low, high = (float(value) for value in torch.stack(torch.aminmax(weight)).tolist())
    if low >= 0 and high < math.inf:
        return weight
    if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):
        raise ArgumentError("weight", "must be finite: found NaN or inf loads")
    raise ArgumentError("weight", "must be non-negative: found negative loads")


def solve(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = BY_NAME["policy"].default,
    num_candidates: int | None = BY_NAME["num_candidates"].default,
    seed: int = BY_NAME["seed"].default,
    layer_seeds: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    prev_phy2log: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    max_moves_per_layer: int | None = BY_NAME["max_moves_per_layer"].default,
    balance_tolerance: float = DEFAULT_BALANCE_TOLERANCE,
    locality_tolerance: float = DEFAULT_LOCALITY_TOLERANCE,
    max_transfer_seconds: float | None = None,
    max_incoming_copies_per_gpu: int | None = None,
    new_num_gpus: int | None = None,
    unavailable_gpus: Sequence[int] | None = None,
    cost_model: CostModel | None = None,
    plan_transfers: bool = True,
) -> SolveResult:
    """Plan a placement for every layer of `weight` [L, E] and describe it.

    `layer_seeds` [L] fixes each layer's randomness (default `seed + layer index`), so a layer solved
    inside a batch gets the result it gets alone. `prev_phy2log` [L, R] is the placement in force:
    the result then moves few copies (within `balance_tolerance` of the best balancedness, and at most
    `max_moves_per_layer` moved copies per layer when given). `history` [T, L, E] holds window sums,
    newest last; it steers the choice among candidates of a fresh plan (ignored with `prev_phy2log`).
    `locality_tolerance` is the max-load increase `policy="auto"` accepts per layer to keep groups on
    their node. Every bad argument raises `ArgumentError` (a ValueError) naming it.

    With `prev_phy2log` the result also carries the transfer plan and its cost under `cost_model`;
    `max_transfer_seconds` / `max_incoming_copies_per_gpu` cap it (budget.py). `unavailable_gpus` (failed
    GPU ids) or `new_num_gpus` (a multiple of the GPUs per node) plan on a changed GPU set from the
    placement in force (elastic.py): phy2log then has slots_per_gpu x G_new columns, GPU k of it being
    `gpu_ids[k]`. `plan_transfers=False` leaves the transfer plan to the caller (the service plans it per
    request of a batch, where budgets apply); the placement is then the plan before any budget.
    """
    started = time.perf_counter()
    request = _checked_request(
        weight,
        num_replicas,
        num_groups,
        num_nodes,
        num_gpus,
        policy=policy,
        num_candidates=num_candidates,
        seed=seed,
        layer_seeds=layer_seeds,
        device=device,
        prev_phy2log=prev_phy2log,
        history=history,
        max_moves_per_layer=max_moves_per_layer,
        balance_tolerance=balance_tolerance,
        locality_tolerance=locality_tolerance,
        max_transfer_seconds=max_transfer_seconds,
        max_incoming_copies_per_gpu=max_incoming_copies_per_gpu,
        new_num_gpus=new_num_gpus,
        unavailable_gpus=unavailable_gpus,
        cost_model=cost_model,
    )
    with cpu_threads(request.device):
        phy2log, policy_per_layer, stats = _plan(request)
        rearranged = _rearranged(request, phy2log) if request.prev_phy2log is not None and plan_transfers else None
        if rearranged is not None:
            phy2log = rearranged.phy2log
            kept = zip(policy_per_layer, rearranged.chosen, strict=True)
            policy_per_layer = [name if chosen else "kept" for name, chosen in kept]
    result = SolveResult(phy2log, policy_per_layer, str(request.device), 0.0, request=request, plan_stats=stats)
    if rearranged is not None:
        rearranged.fill(result)
    elif request.gpu_ids is not None:
        result.gpu_ids = request.gpu_ids
    result.solve_seconds = time.perf_counter() - started
    return result


@dataclass
class _Request:
    """A checked solve request: loads [L, E] float64 on the solve device, the policy options, and what
    the steps after planning need (the placement in force, a changed GPU set, the transfer settings)."""

    loads: torch.Tensor
    settings: Any
    options: SolveOptions
    cost: CostModel
    gpu_ids: torch.Tensor | None
    unavailable_gpus: Sequence[int] | None
    # The deployment's nodes, where copies travel and which whole nodes scale, even when the plan itself
    # ignores them (`options.num_nodes` is 1 when the groups do not split over the nodes).
    num_nodes: int

    @property
    def device(self) -> torch.device:
        return self.loads.device

    @property
    def prev_phy2log(self) -> torch.Tensor | None:
        return self.options.prev_phy2log


def _checked_request(
    weight: object,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    device: str | torch.device | None = None,
    layer_seeds: torch.Tensor | None = None,
    prev_phy2log: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    unavailable_gpus: Sequence[int] | None = None,
    cost_model: CostModel | None = None,
    **option_values: object,
) -> _Request:
    """Every argument of `solve` checked (ArgumentError names the first bad one) -> a `_Request`."""
    weight = validate(weight, num_replicas, num_groups, num_nodes, num_gpus)
    num_groups, planned_nodes = planning_layout(num_groups, num_nodes)
    settings = check_options(**option_values)
    cost = _DEFAULT_COST if cost_model is None else cost_model.validate()
    num_layers, num_experts = weight.shape
    target = resolve_device(weight, device)
    if prev_phy2log is not None:
        prev_phy2log = _checked_placement(prev_phy2log, num_experts, num_replicas, num_layers, target)
    if history is not None:
        history = _checked_history(history, num_layers, num_experts, target)
    gpu_ids = _checked_gpu_change(
        settings, unavailable_gpus, prev_phy2log, num_replicas, num_experts, num_nodes, num_gpus
    )
    options = SolveOptions(
        num_replicas=num_replicas,
        num_groups=num_groups,
        num_nodes=planned_nodes,
        num_gpus=num_gpus,
        num_candidates=settings.num_candidates,
        seed=settings.seed,
        given_layer_seeds=_checked_layer_seeds(layer_seeds, num_layers, target),
        prev_phy2log=prev_phy2log,
        history=history,
        max_moves_per_layer=settings.max_moves_per_layer,
        balance_tolerance=settings.balance_tolerance,
        locality_tolerance=settings.locality_tolerance,
    )
    host = host_array(weight) if target.type == "cpu" else None
    loads = (
        weight.detach().to(target, torch.float64)
        if host is None
        else torch.from_numpy(host.astype(np.float64, copy=False))
    )
    # The figures' float64 sums overflow only near float64's top: one host read (NumPy's max on the CPU).
    high = float(host.max()) if host is not None else float(loads.amax())
    if high > 2.0**FLOAT64_SAFE_EXPONENT:
        loads = within_exponent(loads, FLOAT64_SAFE_EXPONENT)
    return _Request(loads, settings, options, cost, gpu_ids, unavailable_gpus, num_nodes)


def _plan(request: _Request) -> tuple[torch.Tensor, list[str], dict]:
    """Dispatch: the elastic plan when the GPU set changes, else the policy -> (phy2log, names, stats)."""
    loads, options, policy = request.loads, request.options, request.settings.policy
    if request.gpu_ids is not None:
        phy2log, origins = plan_elastic(
            scaled_to_unit_peak(loads),
            options.prev_phy2log,
            options.num_replicas // options.num_gpus,
            request.gpu_ids.to(loads.device),
            options.layer_seeds(loads),
            options.candidates(loads.device),
            options.balance_tolerance,
        )
        in_place = old_content(options.prev_phy2log, options.num_replicas // options.num_gpus, request.gpu_ids)
        phy2log = keep_old_slots(in_place.to(phy2log.device), phy2log, request.gpu_ids.numel())
        return _near_sources(request, phy2log), [f"elastic/{origin}" for origin in origins], {}
    # Planning is scale-free; per-layer scaling to a max of 1 keeps float32 sums of huge loads finite.
    # The published algorithm sees the loads as given, unless float32 cannot hold them.
    planning_loads = (
        within_exponent(loads, FLOAT32_SAFE_EXPONENT) if policy == "deepseek" else scaled_to_unit_peak(loads)
    )
    phy2log, policy_per_layer, stats = run_policy(policy, planning_loads, options)
    if options.prev_phy2log is not None:
        # Plans order each GPU's slots their own way (the published one by replica rank, the refinements
        # as they swap); keeping old slots makes the same placement ship no local shuffles, which would
        # also overwrite slots other shuffles read. The published replica ranks then no longer match.
        phy2log = keep_old_slots(options.prev_phy2log, phy2log, options.num_gpus)
        stats.pop("phy_rank", None)
        phy2log = _near_sources(request, phy2log)
    return phy2log, policy_per_layer, stats


def _tradeable(request: _Request, phy2log: torch.Tensor) -> torch.Tensor:
    """The layers of `phy2log` whose arrivals may trade (arrivals.tradeable_layers) [L] bool."""
    options = request.options
    return tradeable_layers(
        phy2log,
        request.loads.shape[1],
        request.settings.policy,
        options.num_groups,
        options.num_nodes,
        request.gpu_ids is not None,
    )


def _near_sources(request: _Request, phy2log: torch.Tensor) -> torch.Tensor:
    """`phy2log` with arrivals traded between nodes for same-node sources (arrivals.py) on the layers that
    may trade; failed GPUs send nothing."""
    active = _tradeable(request, phy2log)
    if not bool(active.any()):
        return phy2log
    options = request.options
    return near_sources(
        request.loads,
        options.prev_phy2log,
        phy2log,
        options.num_replicas // options.num_gpus,
        options.num_gpus // request.num_nodes,
        gpu_ids=request.gpu_ids,
        usable_sources=usable_gpus(options.num_gpus, request.unavailable_gpus, torch.device("cpu")),
        active=active,
    )


def _rearranged(request: _Request, phy2log: torch.Tensor) -> Rearrangement:
    """The transfers from the placement in force to `phy2log`, under the request's budget."""
    options, settings = request.options, request.settings
    return rearrange(
        request.loads,
        options.prev_phy2log,
        phy2log,
        options.num_gpus,
        request.num_nodes,
        request.cost,
        gpu_ids=request.gpu_ids,
        unavailable_gpus=request.unavailable_gpus,
        max_transfer_seconds=settings.max_transfer_seconds,
        max_incoming_copies_per_gpu=settings.max_incoming_copies_per_gpu,
        balance_layers=None if request.gpu_ids is not None else _tradeable(request, phy2log),
    )


def _checked_gpu_change(
    settings,
    unavailable_gpus: Sequence[int] | None,
    prev_phy2log: torch.Tensor | None,
    num_replicas: int,
    num_experts: int,
    num_nodes: int,
    num_gpus: int,
) -> torch.Tensor | None:
    """The new layout's GPU ids [G_new] when the GPU set changes (failed GPUs or a new count), else None."""
    new_num_gpus = settings.new_num_gpus
    unavailable_gpus = list(unavailable_gpus) if unavailable_gpus else None
    if unavailable_gpus is None and new_num_gpus is None:
        return None
    name = "new_num_gpus" if new_num_gpus is not None else "unavailable_gpus"
    gpu_ids = elastic_gpu_ids(num_gpus, num_nodes, unavailable_gpus, new_num_gpus)
    if prev_phy2log is None:
        raise ArgumentError(name, "needs prev_phy2log, the placement in force")
    slots = (num_replicas // num_gpus) * gpu_ids.numel()
    if slots < num_experts:
        raise ArgumentError(name, f"leaves {slots} slots for {num_experts} experts")
    reason = refused_caps_reason(settings)
    if reason:
        raise ArgumentError(name, reason)
    return gpu_ids


def _checked_layer_seeds(
    layer_seeds: torch.Tensor | None, num_layers: int, device: torch.device
) -> torch.Tensor | None:
    """Given per-layer seeds [L] as int64 on `device`, or None (each layer then takes seed + its index)."""
    if layer_seeds is None:
        return None
    layer_seeds = torch.as_tensor(layer_seeds, dtype=torch.int64)
    if layer_seeds.shape != (num_layers,):
        raise ArgumentError("layer_seeds", f"must have shape [{num_layers}], got {tuple(layer_seeds.shape)}")
    return layer_seeds.to(device)


def _checked_placement(
    prev_phy2log: object, num_experts: int, num_replicas: int, num_layers: int, device: torch.device
) -> torch.Tensor:
    """The placement in force [L, R] as int64 on `device`: expert ids in range, every expert hosted."""
    prev_phy2log = torch.as_tensor(prev_phy2log)
    if prev_phy2log.shape != (num_layers, num_replicas):
        raise ArgumentError(
            "prev_phy2log", f"must have shape [{num_layers}, {num_replicas}], got {tuple(prev_phy2log.shape)}"
        )
    prev_phy2log = prev_phy2log.to(device, torch.int64)
    if bool(((prev_phy2log < 0) | (prev_phy2log >= num_experts)).any()):
        raise ArgumentError("prev_phy2log", f"entries must be expert ids in [0, {num_experts})")
    if bool((maps.logcnt_from_phy2log(prev_phy2log, num_experts) == 0).any()):
        raise ArgumentError("prev_phy2log", "must host every expert at least once per layer")
    return prev_phy2log


def _checked_history(history: object, num_layers: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """Window sums [T, L, E], finite and non-negative, as float64 on `device`."""
    history = torch.as_tensor(history)
    if history.dim() != 3 or tuple(history.shape[1:]) != (num_layers, num_experts):
        raise ArgumentError("history", f"must have shape [T, {num_layers}, {num_experts}], got {tuple(history.shape)}")
    if history.is_floating_point() and not bool(torch.isfinite(history).all()):
        raise ArgumentError("history", "must be finite: found NaN or inf loads")
    if bool((history < 0).any()):
        raise ArgumentError("history", "must be non-negative: found negative loads")
    return history.to(device, torch.float64)


def _against_placement_in_force(request: _Request, phy2log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(moved copies [L], balancedness of the placement in force [L] or None without one)."""
    loads, prev_phy2log, num_gpus = request.loads, request.prev_phy2log, request.options.num_gpus
    num_layers, num_experts = loads.shape
    if prev_phy2log is None:
        return torch.zeros(num_layers, dtype=torch.int64, device=loads.device), None
    if request.gpu_ids is not None:
        slots_per_gpu = num_replicas_per_gpu(prev_phy2log, num_gpus)
        moved, _ = elastic_moves(prev_phy2log, phy2log, num_experts, slots_per_gpu, request.gpu_ids)
    else:
        moved = maps.moved_copies(prev_phy2log, phy2log, num_experts, num_gpus)
    before = maps.balancedness(loads, prev_phy2log, maps.logcnt_from_phy2log(prev_phy2log, num_experts), num_gpus)
    return moved, before


def num_replicas_per_gpu(phy2log: torch.Tensor, num_gpus: int) -> int:
    """Slots per GPU of a placement [L, R] on `num_gpus` GPUs."""
    return phy2log.shape[1] // num_gpus


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
