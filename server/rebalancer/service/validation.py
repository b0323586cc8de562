"""Request checks: every bad input becomes a field violation naming the exact field.

The rules are the solver's `validate` rules (so a request that passes here does not fail in the solver
worker), plus the codec's byte-level checks and the server's size limits, which are applied to the
declared shape before anything is allocated. Checks are numpy only: they run on the event loop.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
from rebalancer_wire.codec import TensorDecodeError, decode
from rebalancer_wire.options import BY_NAME, ArgumentError, SolveSettings
from rebalancer_wire.options import read_message as read_options
from rebalancer_wire.topology import FIELDS as TOPOLOGY_FIELDS
from rebalancer_wire.topology import Topology
from rebalancer_wire.v1 import rebalancer_pb2 as pb

from rebalancer.solver import CostModel
from rebalancer.solver.elastic import refused_caps_reason

from .errors import InvalidArgument

__all__ = ["SolveSettings"]

# Largest load accepted: windows sum reports in float32 and placements are scored in float64, so real
# token counts (far below this) can never overflow into inf or NaN.
MAX_LOAD = 1e30
DEPLOYMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
# Solver arguments that are not options, -> the request field they come from.
SOLVER_ARGUMENT_FIELDS = {
    "weight": "loads.data",
    "prev_phy2log": "prev_phy2log",
    "history": "loads",
    "unavailable_gpus": "unavailable_gpus",
    "cost_model": "cost_model",
}


def deployment_id_violations(value: str, field: str = "deployment_id") -> list[tuple[str, str]]:
    if not DEPLOYMENT_ID.fullmatch(value):
        return [(field, "must be 1-128 characters of [A-Za-z0-9._:/-], starting with a letter or digit")]
    return []


def check_topology(
    message: pb.Topology, max_elements: int, *, shape: tuple[int, int] | None = None, field: str = "topology"
) -> Topology:
    """Topology message -> Topology. `shape` ([L, E] of inline loads) fills num_layers/num_experts when 0."""
    topology = Topology.from_proto(message)
    if shape is not None:
        layers, experts = shape
        violations = [
            (f"{field}.{name}", f"is {declared} but loads have {actual}")
            for name, declared, actual in (
                ("num_layers", topology.num_layers, layers),
                ("num_experts", topology.num_experts, experts),
            )
            if declared not in (0, actual)
        ]
        if violations:
            raise InvalidArgument(violations)
        topology = replace(topology, num_layers=layers, num_experts=experts)
    violations = topology_violations(topology, max_elements, field)
    if violations:
        raise InvalidArgument(violations)
    return topology


def topology_violations(topology: Topology, max_elements: int, field: str = "topology") -> list[tuple[str, str]]:
    """The layout rules every side shares, plus the size limit on L x R."""
    violations = [(f"{field}.{name}", reason) for name, reason in topology.violations()]
    if not violations and topology.num_layers * max(topology.num_replicas, topology.num_experts) > max_elements:
        violations.append(
            (
                f"{field}.num_layers",
                f"{topology.num_layers} layers x {topology.num_replicas} slots exceed {max_elements} elements",
            )
        )
    return violations


def _decode_violation(field: str, error: TensorDecodeError) -> tuple[str, str]:
    reason = error.reason
    if reason.startswith("unsupported dtype"):
        return f"{field}.dtype", reason
    if reason.startswith("data holds"):
        return f"{field}.data", reason
    return f"{field}.shape", reason


def decode_tensor(message: pb.Tensor, field: str, max_elements: int) -> np.ndarray:
    """Tensor message -> ndarray, refusing sizes past `max_elements` before allocating."""
    try:
        return decode(message, max_elements=max_elements)
    except TensorDecodeError as error:
        raise InvalidArgument([_decode_violation(field, error)]) from None


def load_violations(loads: np.ndarray, field: str) -> list[tuple[str, str]]:
    """Finite, non-negative, real loads (the solver's rules) of at most MAX_LOAD, with the first offending
    index."""
    if loads.dtype.kind not in "fiu":
        return [(f"{field}.dtype", f"loads must be real numbers, got {loads.dtype}")]
    # Valid loads take two reductions (min and max propagate NaN); the rule a bad one breaks, and where,
    # is worked out only then.
    if loads.size and loads.min() >= 0 and loads.max() <= MAX_LOAD:
        return []
    if loads.dtype.kind == "f":
        bad = ~np.isfinite(loads)
        if bad.any():
            return [(f"{field}.data", f"NaN or inf load at index {np.argwhere(bad)[0].tolist()}")]
    negative = loads < 0
    if negative.any():
        return [(f"{field}.data", f"negative load at index {np.argwhere(negative)[0].tolist()}")]
    huge = loads > MAX_LOAD
    if huge.any():
        return [(f"{field}.data", f"load above {MAX_LOAD:g} at index {np.argwhere(huge)[0].tolist()}")]
    return []


def check_loads(message: pb.Tensor, max_elements: int, field: str = "loads") -> np.ndarray:
    """Inline loads [L, E] -> ndarray (L, E >= 1; finite; non-negative)."""
    loads = decode_tensor(message, field, max_elements)
    if loads.ndim != 2 or 0 in loads.shape:
        raise InvalidArgument(
            [(f"{field}.shape", f"must be [layers, experts] with both >= 1, got {list(loads.shape)}")]
        )
    violations = load_violations(loads, field)
    if violations:
        raise InvalidArgument(violations)
    return loads


def check_phy2log(message: pb.Tensor, topology: Topology, max_elements: int, field: str = "prev_phy2log") -> np.ndarray:
    """A placement in force [L, R]: integer expert ids in [0, E), every expert hosted at least once."""
    phy2log = decode_tensor(message, field, max_elements)
    expected = (topology.num_layers, topology.num_replicas)
    if phy2log.shape != expected:
        raise InvalidArgument([(f"{field}.shape", f"must be {list(expected)}, got {list(phy2log.shape)}")])
    if phy2log.dtype.kind not in "iu":
        raise InvalidArgument([(f"{field}.dtype", f"must be an integer type, got {phy2log.dtype}")])
    if ((phy2log < 0) | (phy2log >= topology.num_experts)).any():
        raise InvalidArgument([(f"{field}.data", f"entries must be expert ids in [0, {topology.num_experts})")])
    phy2log = phy2log.astype(np.int64)
    offsets = np.arange(topology.num_layers, dtype=np.int64)[:, None] * topology.num_experts
    counts = np.bincount((phy2log + offsets).ravel(), minlength=topology.num_layers * topology.num_experts)
    if (counts == 0).any():
        raise InvalidArgument([(f"{field}.data", "every expert must be hosted at least once per layer")])
    return phy2log


def check_options(message: pb.SolveOptions, field: str = "options") -> SolveSettings:
    """SolveOptions -> SolveSettings by the one option declaration; 0 candidates means the device's default."""
    settings, violations = read_options(message)
    if violations:
        raise InvalidArgument([(f"{field}.{name}", reason) for name, reason in violations])
    return settings


def check_cost_model(message: pb.TransferCost, base: CostModel, field: str = "cost_model") -> CostModel:
    """TransferCost -> CostModel: the fields set override `base` (the deployment's), and must be positive
    and finite."""
    cost = base.overridden(message)
    violations = [(f"{field}.{name}", reason) for name, reason in cost.violations()]
    if violations:
        raise InvalidArgument(violations)
    return cost


def check_unavailable_gpus(values, topology: Topology, field: str = "unavailable_gpus") -> tuple[int, ...]:
    """Failed GPU ids: known (< num_gpus), distinct, and some GPU left."""
    ids = [int(g) for g in values]
    unknown = sorted({g for g in ids if g >= topology.num_gpus})
    if unknown:
        raise InvalidArgument([(field, f"names unknown GPU ids {unknown}: ids are in [0, {topology.num_gpus})")])
    if len(set(ids)) != len(ids):
        raise InvalidArgument([(field, f"repeats GPU ids: {ids}")])
    if len(ids) >= topology.num_gpus:
        raise InvalidArgument([(field, "leaves no GPU to plan on")])
    return tuple(ids)


def check_gpu_change_alone(settings: SolveSettings, unavailable: tuple[int, ...]) -> None:
    """A change of the GPU set (failed GPUs or a new count) takes no move or transfer cap (the library's
    rule, `elastic.REFUSED_CAPS`): checked here, where the transfer caps stay with the request."""
    if not unavailable and settings.new_num_gpus is None:
        return
    reason = refused_caps_reason(settings)
    if reason:
        raise InvalidArgument([("unavailable_gpus" if unavailable else "options.new_num_gpus", reason)])


def solver_error_field(error: ArgumentError) -> str:
    """The request field a solver ArgumentError is about (the error names its argument)."""
    if error.argument in BY_NAME:
        return f"options.{error.argument}"
    if error.argument in TOPOLOGY_FIELDS:
        return f"topology.{error.argument}"
    return SOLVER_ARGUMENT_FIELDS.get(error.argument, "loads")
