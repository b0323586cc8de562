"""Request checks: every bad input becomes a field violation naming the exact field.

The rules are the solver's `validate` rules (so a request that passes here does not fail in the solver
worker), plus the codec's byte-level checks and the server's size limits, which are applied to the
declared shape before anything is allocated. Checks are numpy only: they run on the event loop.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
from rebalancer_wire.codec import TensorDecodeError, decode
from rebalancer_wire.v1 import rebalancer_pb2 as pb

from ..solver.api import DEFAULT_BALANCE_TOLERANCE, DEFAULT_LOCALITY_TOLERANCE
from .errors import InvalidArgument
from .model import Topology

# Largest load accepted: windows sum reports in float32 and placements are scored in float64, so real
# token counts (far below this) can never overflow into inf or NaN.
MAX_LOAD = 1e30
DEPLOYMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
MAX_CANDIDATES = 4096
POLICY_NAMES = {
    pb.POLICY_UNSPECIFIED: "auto",
    pb.POLICY_AUTO: "auto",
    pb.POLICY_DEEPSEEK: "deepseek",
    pb.POLICY_GLOBAL: "global",
    pb.POLICY_HIERARCHICAL: "hierarchical",
}
# Solver argument names (the first word of its ValueError messages) -> request fields.
SOLVER_ARGUMENT_FIELDS = {
    "weight": "loads.data",
    "num_replicas": "topology.num_replicas",
    "num_groups": "topology.num_groups",
    "num_nodes": "topology.num_nodes",
    "num_gpus": "topology.num_gpus",
    "num_candidates": "options.num_candidates",
    "policy": "options.policy",
    "seed": "options.seed",
    "balance_tolerance": "options.balance_tolerance",
    "locality_tolerance": "options.locality_tolerance",
    "max_moves_per_layer": "options.max_moves_per_layer",
    "prev_phy2log": "prev_phy2log",
}


@dataclass(frozen=True)
class SolveSettings:
    """Validated SolveOptions, in the solver's terms."""

    policy: str = "auto"
    num_candidates: int | None = None
    seed: int = 0
    dry_run: bool = False
    max_moves_per_layer: int | None = None
    balance_tolerance: float = DEFAULT_BALANCE_TOLERANCE
    locality_tolerance: float = DEFAULT_LOCALITY_TOLERANCE
    fresh: bool = False


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
    """The solver's `validate` rules on a topology, plus the size limit on L x R."""
    violations = [
        (f"{field}.{name}", "must be >= 1")
        for name in ("num_layers", "num_experts", "num_replicas", "num_groups", "num_nodes", "num_gpus")
        if getattr(topology, name) < 1
    ]
    if violations:
        return violations
    t = topology
    if t.num_replicas < t.num_experts:
        violations.append((f"{field}.num_replicas", f"{t.num_replicas} must be >= num_experts ({t.num_experts})"))
    if t.num_replicas % t.num_gpus:
        violations.append((f"{field}.num_gpus", f"must divide num_replicas ({t.num_replicas}), got {t.num_gpus}"))
    if t.num_experts % t.num_groups:
        violations.append((f"{field}.num_groups", f"must divide num_experts ({t.num_experts}), got {t.num_groups}"))
    if t.num_gpus % t.num_nodes:
        violations.append((f"{field}.num_nodes", f"must divide num_gpus ({t.num_gpus}), got {t.num_nodes}"))
    if t.num_layers * max(t.num_replicas, t.num_experts) > max_elements:
        violations.append(
            (
                f"{field}.num_layers",
                f"{t.num_layers} layers x {t.num_replicas} slots exceed {max_elements} elements",
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
    """SolveOptions -> SolveSettings; 0 candidates means the device's default."""
    violations = []
    if message.policy not in POLICY_NAMES:
        violations.append((f"{field}.policy", f"unknown policy {message.policy}"))
    if message.num_candidates > MAX_CANDIDATES:
        violations.append((f"{field}.num_candidates", f"{message.num_candidates} exceeds {MAX_CANDIDATES}"))
    tolerances = {}
    for name, default in (
        ("balance_tolerance", DEFAULT_BALANCE_TOLERANCE),
        ("locality_tolerance", DEFAULT_LOCALITY_TOLERANCE),
    ):
        value = getattr(message, name) if message.HasField(name) else default
        if not (0.0 <= value < 1.0) or math.isnan(value):
            violations.append((f"{field}.{name}", f"must be in [0, 1), got {value}"))
        tolerances[name] = value
    if violations:
        raise InvalidArgument(violations)
    return SolveSettings(
        policy=POLICY_NAMES[message.policy],
        num_candidates=message.num_candidates or None,
        seed=message.seed,
        dry_run=message.dry_run,
        max_moves_per_layer=message.max_moves_per_layer if message.HasField("max_moves_per_layer") else None,
        fresh=message.fresh,
        **tolerances,
    )


def solver_error_field(message: str) -> str:
    """The request field a solver ValueError is about (its message starts with the argument name)."""
    return SOLVER_ARGUMENT_FIELDS.get(message.split(" ", 1)[0], "loads")
