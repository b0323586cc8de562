"""The placement solver library: no gRPC, no metrics, no storage.

`rebalance_experts` is the drop-in for the DeepSeek EPLB function; `solve` returns a `SolveResult` with
per-layer balancedness, moved copies and the policy each layer used; `advise_slots` reports the
balancedness each slots-per-GPU count would reach.
"""

from .advice import SlotAdvice, advise_slots
from .api import (
    DEFAULT_BALANCE_TOLERANCE,
    DEFAULT_LOCALITY_TOLERANCE,
    SolveResult,
    rebalance_experts,
    solve,
    validate,
)
from .policies import POLICIES
from .transfers import CostModel, apply_transfers

__all__ = [
    "DEFAULT_BALANCE_TOLERANCE",
    "DEFAULT_LOCALITY_TOLERANCE",
    "POLICIES",
    "CostModel",
    "SlotAdvice",
    "SolveResult",
    "advise_slots",
    "apply_transfers",
    "rebalance_experts",
    "solve",
    "validate",
]
