"""Requests -> checked commands: each RPC's message is parsed and checked once, here, before any domain
code runs; what the domain receives (deployments.py) is already valid.

Beyond the field rules of validation.py, topologies are held to the limits of the cost model
(admission.py): a topology whose cheapest solve could never be admitted, or whose largest placement
would not fit in one response message, is refused here as INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from rebalancer_wire.cost import CostModel
from rebalancer_wire.options import SolveSettings
from rebalancer_wire.v1 import rebalancer_pb2 as pb

from rebalancer.solver.advice import slot_counts

from .admission import JobLimits
from .errors import InvalidArgument, NotFound
from .model import Topology
from .validation import (
    check_cost_model,
    check_gpu_change_alone,
    check_loads,
    check_options,
    check_phy2log,
    check_topology,
    check_unavailable_gpus,
    decode_tensor,
    deployment_id_violations,
    load_violations,
)
from .validation import topology_violations as layout_violations


@dataclass(frozen=True)
class PlanCommand:
    """A checked Rebalance: an inline plan (no deployment_id) or a plan for a deployment.

    loads [L, E] (inline loads, or loads replacing the deployment's window); prev_phy2log [L, R] is the
    placement the caller runs (inline: the one to move little from; deployment: replaces the committed one
    as the placement in force for this plan).
    `topology` is the request's (registers the deployment when new); None means the deployment's own.
    """

    deployment_id: str
    topology: Topology | None
    loads: np.ndarray | None
    prev_phy2log: np.ndarray | None
    settings: SolveSettings
    base_version: int
    cost_model: CostModel
    unavailable_gpus: tuple[int, ...] = ()  # failed GPUs: the plan uses the healthy ones
    checked_against: Topology | None = None  # the registered layout the request was checked against

    @property
    def inline(self) -> bool:
        return not self.deployment_id


@dataclass(frozen=True)
class AdviseCommand:
    """A checked AdviseSlots: the layout (a deployment's or inline), loads [L, E] (None: the deployment's
    window) and the slots-per-GPU counts to plan, ascending."""

    deployment_id: str
    topology: Topology
    loads: np.ndarray | None
    slots_per_gpu: tuple[int, ...]
    settings: SolveSettings


@dataclass(frozen=True)
class ReportCommand:
    """A checked telemetry report: loads [k, E] float32 (writable) for `layer_indices` [k] (None: all)."""

    deployment_id: str
    topology: Topology
    loads: np.ndarray
    layer_indices: np.ndarray | None
    step: int


# Slot counts one AdviseSlots may plan (each is a full solve).
MAX_ADVISED_COUNTS = 16


class RequestChecker:
    """The one place requests are checked; `max_elements` bounds every declared tensor shape."""

    def __init__(self, max_elements: int, limits: JobLimits, max_message_bytes: int) -> None:
        self.max_elements = max_elements
        self.limits = limits
        self.max_message_bytes = max_message_bytes

    def deployment_id(self, value: str) -> str:
        violations = deployment_id_violations(value)
        if violations:
            raise InvalidArgument(violations)
        return value

    def topology(self, message: pb.Topology, *, shape: tuple[int, int] | None = None) -> Topology:
        """Field rules, then the limits of the cost model and of the message size."""
        topology = check_topology(message, self.max_elements, shape=shape)
        violations = self.limits.topology_violations(topology, self.max_message_bytes)
        if violations:
            raise InvalidArgument(violations)
        return topology

    def rebalance(self, request: pb.RebalanceRequest, known: Topology | None = None) -> PlanCommand:
        """RebalanceRequest -> PlanCommand. `known` is the named deployment's topology, when registered."""
        settings = check_options(request.options)
        loads = check_loads(request.loads, self.max_elements) if request.HasField("loads") else None
        if not request.deployment_id:
            return self._inline(request, loads, settings)
        self.deployment_id(request.deployment_id)
        topology = None
        if request.HasField("topology"):
            topology = self.topology(request.topology, shape=loads.shape if loads is not None else None)
            if known is not None and topology.conflicts(known):
                raise InvalidArgument([("topology", f"does not match deployment {request.deployment_id!r}: {known}")])
        expected = known or topology
        base_cost = expected.transfer_cost if expected is not None else CostModel()
        cost_model = check_cost_model(request.cost_model, base_cost)
        if loads is not None and expected is not None:
            rows = (expected.num_layers, expected.num_experts)
            if loads.shape != rows:
                raise InvalidArgument(
                    [("loads.shape", f"must be {list(rows)} for this deployment, got {list(loads.shape)}")]
                )
        prev, unavailable = None, ()
        if expected is not None:
            # An engine that says which placement it runs (it may have fallen back to a local plan) plans from it.
            if request.HasField("prev_phy2log"):
                prev = check_phy2log(request.prev_phy2log, expected, self.max_elements)
            unavailable = check_unavailable_gpus(request.unavailable_gpus, expected)
        check_gpu_change_alone(settings, unavailable)
        return PlanCommand(
            request.deployment_id, topology, loads, prev, settings, request.base_version, cost_model, unavailable, known
        )

    def _inline(self, request: pb.RebalanceRequest, loads: np.ndarray | None, settings: SolveSettings) -> PlanCommand:
        violations = []
        if loads is None:
            violations.append(("loads", "required without deployment_id"))
        if not request.HasField("topology"):
            violations.append(("topology", "required without deployment_id"))
        if request.base_version:
            violations.append(("base_version", "only meaningful with deployment_id"))
        if violations:
            raise InvalidArgument(violations)
        topology = self.topology(request.topology, shape=loads.shape)
        cost_model = check_cost_model(request.cost_model, topology.transfer_cost)
        prev = None
        if request.HasField("prev_phy2log"):
            prev = check_phy2log(request.prev_phy2log, topology, self.max_elements)
        unavailable = check_unavailable_gpus(request.unavailable_gpus, topology)
        check_gpu_change_alone(settings, unavailable)
        return PlanCommand("", topology, loads, prev, settings, 0, cost_model, unavailable)

    def advise(self, request: pb.AdviseSlotsRequest, known: Topology | None) -> AdviseCommand:
        """AdviseSlotsRequest -> AdviseCommand; every count is checked as the layout it would make."""
        settings = check_options(request.options)
        loads = check_loads(request.loads, self.max_elements) if request.HasField("loads") else None
        if request.deployment_id:
            self.deployment_id(request.deployment_id)
            if known is None:
                raise NotFound(f"deployment {request.deployment_id!r} is not registered")
            topology = known
            if loads is not None and loads.shape != (known.num_layers, known.num_experts):
                rows = [known.num_layers, known.num_experts]
                raise InvalidArgument([("loads.shape", f"must be {rows} for this deployment, got {list(loads.shape)}")])
        else:
            missing = [
                (name, "required without deployment_id") for name in ("loads", "topology") if not request.HasField(name)
            ]
            if missing:
                raise InvalidArgument(missing)
            topology = self.topology(request.topology, shape=loads.shape)
        counts = tuple(sorted(set(request.slots_per_gpu))) or tuple(
            slot_counts(topology.num_experts, topology.num_gpus)
        )
        if len(counts) > MAX_ADVISED_COUNTS:
            raise InvalidArgument([("slots_per_gpu", f"at most {MAX_ADVISED_COUNTS} counts, got {len(counts)}")])
        for count in counts:
            layout = replace(topology, num_replicas=count * topology.num_gpus)
            violations = layout_violations(layout, self.max_elements) + self.limits.topology_violations(
                layout, self.max_message_bytes
            )
            if violations:
                raise InvalidArgument([("slots_per_gpu", f"{count}: {violations[0][1]}")])
        return AdviseCommand(request.deployment_id, topology, loads, counts, settings)

    def report(self, report: pb.StreamLoadRequest, known: Topology | None) -> ReportCommand:
        """StreamLoadRequest -> ReportCommand; `known` is the deployment's topology when registered."""
        self.deployment_id(report.deployment_id)
        if report.HasField("topology"):
            topology = self.topology(report.topology)
            if known is not None and known != topology:
                raise InvalidArgument([("topology", f"does not match the deployment's {known}")])
        elif known is None:
            raise InvalidArgument(
                [("topology", f"unknown deployment {report.deployment_id!r}: send its topology first")]
            )
        else:
            topology = known
        loads = decode_tensor(report.loads, "loads", self.max_elements)
        indices = None
        rows = topology.num_layers
        if report.layer_indices:
            indices = np.array(report.layer_indices, dtype=np.int64)
            if (indices >= topology.num_layers).any():
                raise InvalidArgument([("layer_indices", f"indices must be < num_layers ({topology.num_layers})")])
            if np.unique(indices).size != indices.size:
                raise InvalidArgument([("layer_indices", "duplicate layer index")])
            rows = indices.size
        if loads.shape != (rows, topology.num_experts):
            raise InvalidArgument([("loads.shape", f"must be {[rows, topology.num_experts]}, got {list(loads.shape)}")])
        violations = load_violations(loads, "loads")
        if violations:
            raise InvalidArgument(violations)
        # A writable float32 copy: torch will not wrap the read-only view of the message bytes.
        return ReportCommand(report.deployment_id, topology, np.array(loads, dtype=np.float32), indices, report.step)
