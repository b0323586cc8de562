"""What a solve and a deployment cost before they exist, and the limits derived from those estimates.

The solver's memory and time grow with the problem's shape in ways a request's byte size does not show:
a 30-byte request for the published DeepSeek loops on one expert with 2**16 slots of 2,048 GPUs is 2**17
sequential steps (~5 s here), and
layers x candidates x the replication table (replication.table_cost) is memory too. So every job is costed from
(L, E, R, G, nodes, C, T, prev) before it is queued, and the same model sets the validation limits: a
topology is refused when even its cheapest solve (one candidate) or its largest possible placement
message could never pass.

The model follows the solver's own tensors (see planner.py, packing.py, joint.py, migration.py):
* multi-candidate plan of P rows: B = P x C problems; replication table B x table_cost(E, R); greedy LPT and
  its bookkeeping B x R; swap refinement [B, M, K, M x K] with M <= 8 partners and K = R / G slots per
  GPU; the joint-replication rounds re-pack up to T x T = 25 variants of every row; history scenarios
  [P, C, S, R].
* small layers: every count vector one more candidate (when at most planner.MAX_TABLE_CANDIDATES), and
  with 3+ slots per GPU the three-GPU repartition, ROUNDS x its neighbourhood per row.
* `auto` runs the global plan and the hierarchical one (L x nodes rows of R / nodes slots) in turn.
* a placement in force adds the migration step: [L, 25, R] trial maps, [L, G, K, K] slot matching and
  the cheapest swaps, each round K x K pairs per partner GPU (swaps.swap_partners).
* failed GPUs add the elastic repair (elastic.py): L x 5 weightings of re-hosting and shedding, up to
  8 x G rounds each, on top of a flat plan and the migration.
Time is sequential steps x a per-step cost (each step is a handful of small tensor ops) plus touched
elements x a per-element cost, per device kind. Both are upper bounds in spirit (refinement rounds are
counted as typical, replication tables as full), calibrated on the development CPU so that the shipped
workload shapes estimate at 1-4x their quiet-machine time and adversarial shapes (hundreds of slots per
GPU) far above it; benchmarks/hostile_bench.py prints estimates against measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from rebalancer_wire.codec import narrowest_ids
from rebalancer_wire.topology import FIELDS as LAYOUT_FIELDS

from ..solver import exact, repartition
from ..solver.elastic import ELASTIC_MOVES_PER_GPU, REPAIR_ROWS, REPAIR_WEIGHTS
from ..solver.joint import search_effort
from ..solver.planner import MAX_TABLE_CANDIDATES
from ..solver.policies import DEFAULT_CANDIDATES
from ..solver.replication import table_cost
from ..solver.shedding import FREED_SLOTS
from ..solver.swaps import swap_partners
from .errors import ResourceExhausted
from .model import Topology

REFINE_ROUNDS = 16 + 64  # pair rounds + heaviest rounds of one swap_refine: their memory is per round
# Rounds a refinement runs in practice: problems leave as soon as their heaviest pack cannot improve
# (measured: 3-10 on the workload shapes); time is estimated with this, memory does not depend on it.
REFINE_ROUNDS_TYPICAL = 10
REFINE_OPS = 12  # tensor ops of one refinement round
JOINT_ROUNDS = 4  # improve_replication rounds, each re-packing every move variant
MAX_PARTNERS = 8  # swap partners per heavy pack
MOVE_WIDTH = 5  # receivers x donors of one joint round: up to 25 variants per row
MAX_SCENARIOS = 8
# The three-GPU repartition of small layers: tensor ops per scored element (gathers, sums, max, min) and
# bytes per element of one block's tables. 4,000 layers of 12 experts on 8 GPUs x 3 slots ran 28 s when
# admitted at an estimated 0.18 s; measured 3.4 ms a layer, estimated 3.4.
REPARTITION_OPS = 16
REPARTITION_BYTES = 40
# Elements per copy of each move a small layer's joint round packs afresh (sort, LPT by rounds, trials
# refined): 2,000 layers of 24 experts on 12 GPUs x 3 slots measured 0.31 s, estimated 0.13 s without it.
FRESH_PACK_OPS = 64
# Elements an elastic shedding round touches per slot of each repair row (moves scored around the source
# GPUs, chains through freed slots). One GPU lost, random loads, on the development CPU: DeepSeek-V3
# prefill (58-580 layers) measured 34-37 ms per layer, estimated 61; 16 x 64 -> 96 on 8 GPUs 119 ms,
# estimated 116; 8 x 64 -> 128 on 16 GPUs 84 ms, estimated 147.
ELASTIC_ELEMENTS_PER_SLOT = 320
ID_BYTES = 8
# Sequential steps each slot of the published DeepSeek loops is costed at: a packing step and a replication
# step, each a handful of small tensor ops (~40 us a slot here). Costed as 2 steps, shapes from 16 x 64 -> 96
# to one expert on 2**16 slots estimated at 0.28-0.32x their time on the development CPU; as 8, 1.1-1.3x
# (DeepSeek-V3 hierarchical on 32 GPUs: 3x).
DEEPSEEK_STEPS_PER_SLOT = 8
# Host bytes of one greedy step's bookkeeping (a small tensor per placed item, kept until the pack ends).
STEP_OBJECT_BYTES = 512
# Bytes a deployment costs besides its tensors: dataclasses, metric series, the store's row and caches.
DEPLOYMENT_OVERHEAD_BYTES = 64 * 1024
# Room the stats and envelope of a placement message take besides the three maps (per layer and fixed).
PLACEMENT_STATS_BYTES_PER_LAYER = 16
PLACEMENT_ENVELOPE_BYTES = 64 * 1024


@dataclass(frozen=True)
class DeviceSpeed:
    """Seconds per sequential solver step and per touched tensor element on one kind of device."""

    step_seconds: float
    element_seconds: float


# cpu: fitted on the 2-core development machine when the CPU loops ran in torch, rounded up; LPT and
# refinement now run compiled (Numba), the rest partly in NumPy, so CPU estimates err high (DeepSeek-V3
# prefill: 155 ms for ~15 ms; one expert on 2**19 slots of 2,048 GPUs: ~30 s for ~0.8 s). cuda:
# per-step launch cost and element throughput assumed from the GPU solver figures (sub-millisecond
# DeepSeek-V3 solves), not fitted.
SPEEDS = {"cpu": DeviceSpeed(10e-6, 0.5e-9), "cuda": DeviceSpeed(20e-6, 2.5e-11)}


@dataclass(frozen=True)
class SolveCost:
    """Estimated peak memory (bytes) and solver time (seconds) of one solver call."""

    peak_bytes: int
    work_seconds: float


@dataclass(frozen=True)
class Shape:
    """What a solver call's cost depends on: the topology with the call's layer count, and its options."""

    num_layers: int
    num_experts: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int
    candidates: int
    history_intervals: int = 0
    has_prev: bool = False
    policy: str = "auto"
    elastic: bool = False  # a changed GPU set (failed GPUs): the elastic plan, not the policy


def _plan(rows: int, experts: int, replicas: int, gpus: int, candidates: int, scenarios: int) -> tuple[int, int, int]:
    """(bytes, sequential steps, touched elements) of `planner.plan` on [rows, experts] loads."""
    few = exact.few_count_vectors(experts, replicas, MAX_TABLE_CANDIDATES)  # one more candidate each, then
    problems = rows * (candidates + (exact.num_count_vectors(experts, replicas) if few else 0))
    slots_per_gpu = replicas // gpus
    partners = min(MAX_PARTNERS, max(gpus - 1, 0))
    variants = rows * min(MOVE_WIDTH, experts) ** 2
    table = problems * table_cost(experts, replicas)
    refine = problems * partners * slots_per_gpu**2
    refine_variants = variants * partners * slots_per_gpu**2
    memory = (
        8 * table  # the replication table's shares and the top-k over them
        + 64 * problems * replicas  # noise, item experts and loads, the LPT order, greedy bookkeeping
        + 8 * refine  # two [B, M, K, M * K] float32 swap tables
        + 16 * problems * scenarios * (experts + replicas)  # scenario loads per candidate and slot
        + 64 * variants * replicas
        + 8 * refine_variants
        + STEP_OBJECT_BYTES * replicas
    )
    steps = (1 + JOINT_ROUNDS) * (replicas + REFINE_ROUNDS_TYPICAL * REFINE_OPS)
    elements = (
        problems * gpus * replicas
        + REFINE_ROUNDS_TYPICAL * refine
        + table
        + problems * scenarios * replicas
        + JOINT_ROUNDS * (variants * gpus * replicas + REFINE_ROUNDS_TYPICAL * refine_variants)
    )
    effort = search_effort(replicas)
    if effort.fresh_trials:  # small layers: every move of every joint round also packed afresh
        elements += effort.rounds * rows * effort.width**2 * replicas * FRESH_PACK_OPS
    if repartition.applies(replicas, gpus):  # every open row, ROUNDS rounds over its neighbourhood
        scored = rows * repartition.neighbourhood(replicas, gpus)
        memory += REPARTITION_BYTES * min(scored, repartition.BLOCK_ELEMENTS)
        steps += repartition.ROUNDS * REFINE_OPS
        elements += repartition.ROUNDS * REPARTITION_OPS * scored
    return memory, steps, elements


def _elastic(layers: int, replicas: int, gpus: int) -> tuple[int, int, int]:
    """(bytes, steps, elements) of `elastic.plan_elastic` beyond its fresh plan and migration: the
    re-hosting and shedding rounds (up to the move budget) of every repair weighting of every layer."""
    rows = layers * len(REPAIR_WEIGHTS)
    rounds = ELASTIC_MOVES_PER_GPU * gpus
    memory = 64 * rows * replicas + 8 * REPAIR_ROWS * FREED_SLOTS * replicas
    return memory, rounds * REFINE_OPS, rows * rounds * replicas * ELASTIC_ELEMENTS_PER_SLOT


def _migration(layers: int, experts: int, replicas: int, gpus: int) -> tuple[int, int, int]:
    """(bytes, steps, elements) of `migration.migrate` against a placement in force."""
    slots_per_gpu = replicas // gpus
    variants = layers * min(MOVE_WIDTH, experts) ** 2
    memory = 48 * variants * replicas + layers * replicas * slots_per_gpu + 32 * layers * gpus * (gpus + experts)
    steps = 2 * gpus + 8 + 2 * REFINE_ROUNDS_TYPICAL * REFINE_OPS
    elements = (
        8 * variants * replicas
        + layers * gpus**3
        + 2 * REFINE_ROUNDS_TYPICAL * layers * swap_partners(gpus, slots_per_gpu) * slots_per_gpu**2
    )
    return memory, steps, elements


def solve_cost(shape: Shape, device_type: str) -> SolveCost:
    """Estimated peak bytes and seconds of `solver.solve` on `shape` (layers of the whole call)."""
    s = shape
    speed = SPEEDS.get(device_type, SPEEDS["cuda"])
    base = 8 * s.num_layers * (s.num_experts * (3 + s.history_intervals) + 6 * s.num_replicas)
    log2phy = ID_BYTES * s.num_layers * s.num_experts * (s.num_replicas - s.num_experts + 1)
    if s.policy == "deepseek" and not s.elastic:  # the published loops: one step per slot and per extra copy
        steps = DEEPSEEK_STEPS_PER_SLOT * s.num_replicas
        memory, elements = 48 * s.num_layers * s.num_replicas, 2 * s.num_replicas * s.num_layers * s.num_gpus
    else:
        scenarios = min(MAX_SCENARIOS, 2 * (s.history_intervals - 1)) if s.history_intervals > 1 else 0
        scenarios = 0 if s.has_prev else scenarios
        plans = [_plan(s.num_layers, s.num_experts, s.num_replicas, s.num_gpus, s.candidates, scenarios)]
        hierarchical = s.policy != "global" and s.num_nodes > 1 and s.num_groups % s.num_nodes == 0
        if hierarchical and not s.elastic:  # the elastic plan is flat
            nodes = s.num_nodes
            rows, experts = s.num_layers * nodes, s.num_experts // nodes
            plans.append(_plan(rows, experts, s.num_replicas // nodes, s.num_gpus // nodes, s.candidates, scenarios))
            groups_to_nodes = (0, nodes + REFINE_ROUNDS_TYPICAL * REFINE_OPS, s.num_layers * s.num_groups * nodes)
            plans.append(groups_to_nodes)
        if s.has_prev:
            plans.append(_migration(s.num_layers, s.num_experts, s.num_replicas, s.num_gpus))
        if s.elastic:
            plans.append(_elastic(s.num_layers, s.num_replicas, s.num_gpus))
        memory = max(plan[0] for plan in plans)
        steps = sum(plan[1] for plan in plans)
        elements = sum(plan[2] for plan in plans)
    seconds = steps * speed.step_seconds + elements * speed.element_seconds
    return SolveCost(peak_bytes=base + log2phy + memory, work_seconds=seconds)


def candidates_for(requested: int | None, device_type: str) -> int:
    """The candidate count a solve will use: the request's, else the device's default."""
    return requested if requested is not None else DEFAULT_CANDIDATES.get(device_type, DEFAULT_CANDIDATES["cuda"])


def placement_message_bound(topology: Topology) -> int:
    """Largest possible encoded placement of `topology`: phy2log [L, R], logcnt [L, E] and log2phy
    [L, E, X] padded to X = R - E + 1 (one expert may hold every spare copy), in the narrowest id type
    that holds R, plus stats and envelope."""
    t = topology
    id_bytes = narrowest_ids(t.num_replicas).itemsize
    maps = t.num_layers * (t.num_replicas + t.num_experts * (t.num_replicas - t.num_experts + 2))
    return id_bytes * maps + PLACEMENT_STATS_BYTES_PER_LAYER * t.num_layers + PLACEMENT_ENVELOPE_BYTES


def window_bytes(topology: Topology, capacity: int, intervals: int) -> int:
    """A telemetry window: the ring [W, L, E] float32 and the interval history [T, L, E] float64."""
    return topology.num_layers * topology.num_experts * (4 * capacity + 8 * intervals)


def deployment_bytes(topology: Topology) -> int:
    """A registered deployment without its window: the placement in force (record and window copies of
    phy2log [L, R] and logcnt [L, E] int64, and the record's log2phy [L, E, X] at its widest, X = R - E + 1
    copies of one expert) and the fixed bookkeeping."""
    t = topology
    maps = 2 * (t.num_replicas + t.num_experts) + t.num_experts * (t.num_replicas - t.num_experts + 1)
    return DEPLOYMENT_OVERHEAD_BYTES + 8 * t.num_layers * maps


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


@dataclass(frozen=True)
class JobLimits:
    """What one solver call may cost, and where the small-job lane ends."""

    max_job_bytes: int
    max_job_seconds: float
    small_job_bytes: int
    small_job_seconds: float
    device_type: str

    def cost(self, shape: Shape) -> SolveCost:
        return solve_cost(shape, self.device_type)

    def admits(self, cost: SolveCost) -> bool:
        return cost.peak_bytes <= self.max_job_bytes and cost.work_seconds <= self.max_job_seconds

    def is_small(self, cost: SolveCost) -> bool:
        return cost.peak_bytes <= self.small_job_bytes and cost.work_seconds <= self.small_job_seconds

    def check(self, shape: Shape) -> SolveCost:
        """The job's cost; ResourceExhausted naming what to lower when it exceeds the per-job limits."""
        cost = solve_cost(shape, self.device_type)
        if self.admits(cost):
            return cost
        raise ResourceExhausted(
            f"this solve would need about {mib(cost.peak_bytes)} and {cost.work_seconds:.1f} s of solver time, "
            f"over the per-job limit of {mib(self.max_job_bytes)} and {self.max_job_seconds:.1f} s: "
            + self._advice(shape)
        )

    def _advice(self, shape: Shape) -> str:
        if shape.policy != "deepseek" and shape.candidates > 1:
            fitting = self._most_candidates(shape)
            if fitting:
                return f"lower options.num_candidates to at most {fitting}"
        layers = self._most_layers(shape)
        if layers:
            return f"send at most {layers} layers per request, or lower options.num_candidates"
        return "lower topology.num_replicas (slots per GPU) or topology.num_experts"

    def _largest(self, shape: Shape, field: str, upper: int) -> int:
        """Largest value of `field` in [1, upper) the limits admit (costs grow with it); 0 if none."""
        low, high = 0, upper
        while high - low > 1:
            middle = (low + high) // 2
            trial = Shape(**{**shape.__dict__, field: middle})
            if self.admits(solve_cost(trial, self.device_type)):
                low = middle
            else:
                high = middle
        return low

    def _most_candidates(self, shape: Shape) -> int:
        return self._largest(shape, "candidates", shape.candidates)

    def _most_layers(self, shape: Shape) -> int:
        return self._largest(shape, "num_layers", shape.num_layers)

    def topology_violations(
        self, topology: Topology, max_message_bytes: int, field: str = "topology"
    ) -> list[tuple[str, str]]:
        """Limits on a topology itself: its cheapest solve must be admissible and its largest placement
        must fit in one message."""
        violations = []
        bound = placement_message_bound(topology)
        if bound > max_message_bytes:
            violations.append(
                (
                    f"{field}.num_replicas",
                    f"a placement of {topology.num_layers} layers x {topology.num_experts} experts on "
                    f"{topology.num_replicas} slots may take {mib(bound)}, over the {mib(max_message_bytes)} "
                    "message limit: lower num_layers per deployment, num_experts or spare slots (R - E)",
                )
            )
        cheapest = Shape(**{name: getattr(topology, name) for name in LAYOUT_FIELDS}, candidates=1)
        cost = solve_cost(cheapest, self.device_type)
        if not self.admits(cost):
            violations.append(
                (
                    f"{field}.num_replicas",
                    f"even one candidate would need about {mib(cost.peak_bytes)} and {cost.work_seconds:.1f} s "
                    f"of solver time, over the per-job limit of {mib(self.max_job_bytes)} and "
                    f"{self.max_job_seconds:.1f} s: lower num_replicas (slots per GPU), num_experts or num_layers",
                )
            )
        return violations
