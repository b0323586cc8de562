"""How many redundant slots a deployment needs: the balancedness each slots-per-GPU count would reach.

On wide expert parallelism balancedness is capped by replication, not by the planner (144 GPUs with
2 slots each: about 0.45 for every planner on zipf loads), and operators pick the number of redundant
experts by guesswork. `advise_slots` plans the same loads at S, S + 1, ... slots per GPU with the
solver (every layer at once per count) and reports what each count reaches and the lower-bound
ceiling no planner can pass, so the choice is a reading of a table. The ceiling never falls with more
slots; the solver's figure may dip by a hair from one count to the next where both counts are within
the refinement slack (5e-4) of their bounds, since refinement stops there (measured: 1e-4 at most).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .api import solve
from .joint import best_lower_bound
from .maps import ratio

# Counts tried past the smallest feasible one when the caller names none.
DEFAULT_EXTRA_SLOTS_PER_GPU = 4


@dataclass
class SlotAdvice:
    """Per slots-per-GPU count k (ascending): what the solver reaches on the given loads.

    slots_per_gpu [K] and num_replicas [K] (= slots x GPUs) as ints; balancedness [K] (mean over layers
    of mean / max GPU load) and balancedness_per_layer [K, L]; max_over_bound [K] (mean over layers of
    max GPU load / lower bound); ceiling [K] (mean over layers of mean / lower bound: no placement with
    that many slots does better).
    """

    slots_per_gpu: list[int]
    num_replicas: list[int]
    balancedness: torch.Tensor
    balancedness_per_layer: torch.Tensor
    max_over_bound: torch.Tensor
    ceiling: torch.Tensor

    def rows(self) -> list[dict[str, float | int]]:
        """One plain record per count, for tables and JSON."""
        return [
            {
                "slots_per_gpu": slots,
                "num_replicas": replicas,
                "balancedness": float(self.balancedness[i]),
                "max_over_bound": float(self.max_over_bound[i]),
                "ceiling": float(self.ceiling[i]),
            }
            for i, (slots, replicas) in enumerate(zip(self.slots_per_gpu, self.num_replicas, strict=True))
        ]


def slot_counts(num_experts: int, num_gpus: int, extra: int = DEFAULT_EXTRA_SLOTS_PER_GPU) -> list[int]:
    """The smallest feasible slots per GPU (every expert hosted: ceil(E / G)) and the `extra` after it."""
    first = math.ceil(num_experts / num_gpus)
    return list(range(first, first + extra + 1))


def advise_slots(
    weight: torch.Tensor,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    slots_per_gpu: Sequence[int] | None = None,
    policy: str = "auto",
    **options: object,
) -> SlotAdvice:
    """Balancedness the solver reaches at each slots-per-GPU count, on loads [L, E] or a window [T, L, E]
    (summed over T, as the service plans on its window).

    `slots_per_gpu`: the counts to try (default: the smallest feasible one and the four after it); each
    must host every expert (count x num_gpus >= E). Other keyword options go to `solve` (num_candidates,
    seed, device, ...), so every row is exactly what `solve` returns at that count.
    """
    loads = torch.as_tensor(weight)
    if loads.dim() == 3:
        loads = loads.sum(0)
    if loads.dim() != 2:
        raise ValueError(f"weight must be [layers, experts] or a window [T, layers, experts], got {tuple(loads.shape)}")
    num_experts = loads.shape[1]
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"num_gpus must be an integer >= 1, got {num_gpus!r}")
    counts = sorted(set(slot_counts(num_experts, num_gpus) if slots_per_gpu is None else slots_per_gpu))
    if not counts or any(isinstance(s, bool) or not isinstance(s, int) or s * num_gpus < num_experts for s in counts):
        raise ValueError(
            f"slots_per_gpu must be integers with slots x num_gpus >= {num_experts} experts, got {slots_per_gpu!r}"
        )
    per_layer, over_bound, ceiling = [], [], []
    for slots in counts:
        replicas = slots * num_gpus
        result = solve(loads, replicas, num_groups, num_nodes, num_gpus, policy=policy, **options)
        planning = loads.to(result.phy2log.device, torch.float64)
        bound = best_lower_bound(planning, replicas, num_gpus)
        mean = planning.sum(-1) / num_gpus
        balance = result.balancedness.to(torch.float64)
        per_layer.append(balance)
        # An all-zero layer is perfectly balanced and at its bound.
        over_bound.append(ratio(mean / balance, bound, 1.0))  # mean / balancedness: the max GPU load
        ceiling.append(ratio(mean, bound, 1.0))
    per_layer_balance = torch.stack(per_layer)  # [K, L]
    return SlotAdvice(
        slots_per_gpu=counts,
        num_replicas=[slots * num_gpus for slots in counts],
        balancedness=per_layer_balance.mean(-1),
        balancedness_per_layer=per_layer_balance,
        max_over_bound=torch.stack(over_bound).mean(-1),
        ceiling=torch.stack(ceiling).mean(-1),
    )
