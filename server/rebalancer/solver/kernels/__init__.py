"""Triton versions of the packing hot loops, with the signatures of `solver.packing`.

The torch path of greedy LPT and swap refinement is bound by kernel launches and host synchronisation
on a GPU (one tiny step per item and per swap round). Here each step runs as one Triton launch with one
program per problem, state in registers and the early exit decided on the device.

Selection: `use_triton(tensor)` is true for float32 CUDA tensors when triton imports. The environment
variable `REBALANCER_SOLVER_PATH=torch|triton` forces either path; `triton` on CPU tensors runs only
under the Triton interpreter (`TRITON_INTERPRET=1`, for tests), otherwise the torch path answers.
Triton is imported lazily, so the CPU solver never pays for it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..refinement import RefineLimits

PATH_ENV = "REBALANCER_SOLVER_PATH"
PATHS = ("auto", "torch", "triton")


def _requested_path() -> str:
    """The path the environment asks for: auto (unset or empty), torch or triton."""
    requested = os.environ.get(PATH_ENV, "").strip().lower() or "auto"
    if requested not in PATHS:
        raise ValueError(f"{PATH_ENV} must be one of {', '.join(PATHS)}, got {requested!r}")
    return requested


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported here (checked once per process)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def active_path(device: str | torch.device) -> str:
    """ "triton" or "torch": which path a float32 solve on `device` takes now (a metric label)."""
    requested = _requested_path()
    if requested == "torch" or not triton_available():
        return "torch"
    device = torch.device(device)
    if device.type == "cuda":
        return "triton"
    return "triton" if requested == "triton" and device.type == "cpu" and _interpreting() else "torch"


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the packing step for `tensor` (the float32 loads) should run the Triton kernels."""
    return tensor.dtype == torch.float32 and active_path(tensor.device) == "triton"


def greedy_pack(item_loads: torch.Tensor, order: torch.Tensor, num_packs: int) -> torch.Tensor:
    """Triton `packing.greedy_pack`: item_loads [B, N] float32, order [B, N] -> slot_items [B, G, K]."""
    from .greedy import greedy_pack as launch

    return launch(item_loads, order, num_packs)


def swap_refine(
    slot_loads: torch.Tensor, slot_items: torch.Tensor, targets: torch.Tensor, limits: RefineLimits
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `packing.swap_refine` for groups of one (each problem stops on its own; a larger
    `limits.group_size` is refused, since one program cannot see when another met its target)."""
    from .refine import swap_refine as launch

    return launch(slot_loads, slot_items, targets, limits)


__all__ = ["PATH_ENV", "active_path", "greedy_pack", "swap_refine", "triton_available", "use_triton"]
