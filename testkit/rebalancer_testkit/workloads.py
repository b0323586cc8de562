"""Synthetic expert loads (routing traces are not shipped) and placement scores, shared by benchmarks and tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from rebalancer.solver import maps
from rebalancer.solver.joint import best_lower_bound


def zipf(layers: int, experts: int, s: float, rng: np.random.Generator, tokens: float = 1e6) -> np.ndarray:
    """Popularity rank^-s in a random expert order per layer, log-space noise 0.3, scaled to `tokens`: [L, E]."""
    base = np.arange(1, experts + 1, dtype=np.float64) ** -s
    order = np.argsort(rng.random((layers, experts)), axis=1)
    loads = base[order] * np.exp(0.3 * rng.standard_normal((layers, experts)))
    return loads / loads.sum(1, keepdims=True) * tokens


def lognormal(layers: int, experts: int, rng: np.random.Generator, sigma: float = 1.0) -> np.ndarray:
    """exp(N(0, sigma)) * 1000: heavy-tailed loads without a rank structure. [L, E]."""
    return np.exp(sigma * rng.standard_normal((layers, experts))) * 1000.0


def hot_experts(layers: int, experts: int, rng: np.random.Generator, hot: int = 4, factor: float = 20.0) -> np.ndarray:
    """Uniform 0.5-1.5 loads with `hot` random experts per layer `factor` times heavier: replication decides. [L, E]."""
    loads = rng.random((layers, experts)) + 0.5
    picks = np.argsort(rng.random((layers, experts)), axis=1)[:, : min(hot, experts)]
    np.put_along_axis(loads, picks, np.take_along_axis(loads, picks, 1) * factor, 1)
    return loads * 1000.0


# Every load kind, in the order the tables list them: (layers, experts, rng) -> loads [L, E].
GENERATORS: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "zipf": lambda layers, experts, rng: zipf(layers, experts, 1.0, rng),
    "lognormal": lognormal,
    "hot": hot_experts,
    "zipf_mild": lambda layers, experts, rng: zipf(layers, experts, 0.5, rng),
    "uniformish": lambda layers, experts, rng: (rng.random((layers, experts)) * 0.2 + 1.0) * 1000.0,
}
KINDS: tuple[str, ...] = tuple(GENERATORS)


def make(kind: str, layers: int, experts: int, seed: int = 0) -> torch.Tensor:
    """Loads [L, E] float32 of one kind, reproducible from `seed`."""
    return torch.from_numpy(GENERATORS[kind](layers, experts, np.random.default_rng(seed))).float()


@dataclass(frozen=True)
class Shape:
    """One deployment: L MoE layers of E experts served by R slots on G GPUs in N nodes, E split in groups."""

    name: str
    layers: int
    experts: int
    replicas: int
    groups: int
    nodes: int
    gpus: int

    def args(self, flat: bool = False) -> tuple[int, int, int, int]:
        """The solver's arguments after the weight: (num_replicas, num_groups, num_nodes, num_gpus); `flat` plans
        as if there were one group on one node."""
        return self.replicas, *((1, 1) if flat else (self.groups, self.nodes)), self.gpus

    def loads(self, kind: str, seed: int = 0) -> torch.Tensor:
        return make(kind, self.layers, self.experts, seed)

    def describe(self) -> str:
        where = f"{self.groups} groups, {self.nodes} nodes, {self.gpus} GPUs"
        return f"{self.layers}x{self.experts} -> {self.replicas} slots, {where}"


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape("tiny", 2, 12, 16, 4, 2, 8),  # the DeepSeek EPLB README example
        Shape("tiny_ep16", 2, 16, 32, 4, 2, 16),  # README-sized, two slots per GPU
        Shape("dsv3_prefill", 58, 256, 288, 8, 4, 32),  # DeepSeek-V3, 32 redundant slots, 4 nodes x 8 GPUs
        Shape("dsv3_ep64", 58, 256, 320, 8, 8, 64),  # one group per node: hierarchical packing collapses
        Shape("dsv3_ep72", 58, 256, 288, 8, 1, 72),  # wide-EP decode on one NVL72 domain, 4 slots per GPU
        Shape("dsv3_ep144", 58, 256, 288, 8, 2, 144),  # two NVL72 domains, 2 slots per GPU
        Shape("qwen3_30b", 48, 128, 144, 1, 1, 8),  # no expert groups
        Shape("qwen3_235b", 94, 128, 160, 1, 2, 16),
        Shape("qwen3_235b_ep32", 94, 128, 160, 1, 4, 32),  # 5 slots per GPU
        Shape("mixtral", 32, 8, 16, 1, 1, 8),  # few experts, two slots per GPU
        Shape("kimi_k2", 61, 384, 416, 1, 4, 32),
        Shape("kimi_k2_ep72", 61, 384, 432, 1, 1, 72),  # wide-EP decode, 6 slots per GPU
    )
}

# The DeepSeek EPLB README example (the "tiny" shape) and the placement the published algorithm gives it.
README_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
README_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def drift_series(layers: int, experts: int, windows: int, *, seed: int = 0) -> torch.Tensor:
    """Window sums [T, L, E] of a drifting router: zipf 1.1, N(0, 0.15) log steps, a topic shift every 4th."""
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((layers, experts)), axis=1)
    logp = (-1.1 * np.log(np.arange(1, experts + 1)))[order] + 0.3 * rng.standard_normal((layers, experts))
    out = np.empty((windows, layers, experts))
    for window in range(windows):
        logp = logp + 0.15 * rng.standard_normal((layers, experts))
        if window % 4 == 3:
            hot = np.argsort(rng.random((layers, experts)), axis=1)[:, : min(3, experts)]
            logp[np.arange(layers)[:, None], hot] += 1.5
        probs = np.exp(logp - logp.max(1, keepdims=True))
        out[window] = rng.multinomial(200_000, probs / probs.sum(1, keepdims=True))
    return torch.from_numpy(out).float()


def lower_bound(weight: torch.Tensor, num_replicas: int, num_gpus: int) -> torch.Tensor:
    """The solver's bound on any placement's max GPU load [L]: max(total / G, best max per-copy load)."""
    return best_lower_bound(torch.as_tensor(weight, dtype=torch.float64).cpu(), num_replicas, num_gpus)


def placed(weight: torch.Tensor, phy2log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight [L, E] float64, phy2log [L, R] int64, logcnt [L, E]) on the CPU, as the solver's `maps` take them."""
    weight, phy2log = torch.as_tensor(weight, dtype=torch.float64).cpu(), torch.as_tensor(phy2log).long().cpu()
    return weight, phy2log, maps.logcnt_from_phy2log(phy2log, weight.shape[1])


def max_gpu_load(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Max GPU load per layer [L] of placement phy2log [L, R] on loads weight [L, E]."""
    return maps.gpu_loads(*placed(weight, phy2log), num_gpus).max(-1).values


def balancedness(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Mean / max GPU load per layer [L] (1.0 on all-zero layers)."""
    return maps.balancedness(*placed(weight, phy2log), num_gpus)


def max_over_lower_bound(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Max GPU load / lower bound per layer [L] (1.0 = provably optimal; all-zero layers count 1.0)."""
    peak, bound = max_gpu_load(weight, phy2log, num_gpus), lower_bound(weight, phy2log.shape[1], num_gpus)
    return maps.ratio(peak, bound, 1.0)
