"""Synthetic expert loads for the solver benchmarks: the shapes of SPEC §8 and the load kinds routers show.

The benchmarks need loads that look like production routing without shipping traces, and they must not
depend on `../shared` (that tree measures the project; this one must stand alone). So the shapes and the
generator ideas of the shared checks are replicated here, with fixed seeds: zipf skew with a different hot
set per layer, log-normal loads, a few very hot experts, mild skew, near-uniform loads, and a drifting
series of window sums for the migration benchmark (plan on window i, score on window i + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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

    def args(self) -> tuple[int, int, int, int]:
        """The solver's positional arguments after the weight: (num_replicas, num_groups, num_nodes, num_gpus)."""
        return self.replicas, self.groups, self.nodes, self.gpus

    def describe(self) -> str:
        return (
            f"{self.layers}x{self.experts} -> {self.replicas} slots, {self.groups} groups, "
            f"{self.nodes} nodes, {self.gpus} GPUs"
        )


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape("tiny", 2, 12, 16, 4, 2, 8),  # the DeepSeek EPLB README example
        Shape("dsv3_prefill", 58, 256, 288, 8, 4, 32),  # DeepSeek-V3, 32 redundant slots, 4 nodes x 8 GPUs
        Shape("dsv3_ep64", 58, 256, 320, 8, 8, 64),  # one group per node: hierarchical packing collapses
        Shape("qwen3_30b", 48, 128, 144, 1, 1, 8),  # no expert groups
        Shape("qwen3_235b", 94, 128, 160, 1, 2, 16),
        Shape("mixtral", 32, 8, 16, 1, 1, 8),  # few experts, two slots per GPU
        Shape("kimi_k2", 61, 384, 416, 1, 4, 32),  # not in the shared checks: stands in for unseen shapes
    )
}

KINDS: tuple[str, ...] = ("zipf", "lognormal", "hot", "zipf_mild", "uniformish")


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


def make(kind: str, layers: int, experts: int, seed: int = 0) -> torch.Tensor:
    """Loads [L, E] float32 of one kind, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    if kind == "zipf":
        loads = zipf(layers, experts, 1.0, rng)
    elif kind == "zipf_mild":
        loads = zipf(layers, experts, 0.5, rng)
    elif kind == "lognormal":
        loads = lognormal(layers, experts, rng)
    elif kind == "hot":
        loads = hot_experts(layers, experts, rng)
    elif kind == "uniformish":
        loads = (rng.random((layers, experts)) * 0.2 + 1.0) * 1000.0
    else:
        raise ValueError(f"unknown load kind {kind!r}; expected one of {KINDS}")
    return torch.from_numpy(loads).float()


def shape_loads(shape: Shape | str, kind: str, seed: int = 0) -> torch.Tensor:
    """Loads [L, E] for a named or given shape."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    return make(kind, shape.layers, shape.experts, seed)


def drift_series(
    layers: int,
    experts: int,
    windows: int,
    *,
    s: float = 1.1,
    drift: float = 0.15,
    shift_every: int = 4,
    boosted: int = 3,
    boost: float = 1.5,
    tokens: int = 200_000,
    seed: int = 0,
) -> torch.Tensor:
    """Window-summed loads [T, L, E] float32 of a slowly drifting router.

    A stable zipf skew (permuted per layer, 0.3 log-space noise); each window every expert's log popularity
    takes a N(0, drift) step; every `shift_every`-th window `boosted` random experts per layer gain `boost`
    in log space (a topic shift); each window's counts are a multinomial sample of `tokens` per layer.
    A plan made on window i is scored on window i + 1, which is what a controller experiences.
    """
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, experts + 1, dtype=np.float64)
    order = np.argsort(rng.random((layers, experts)), axis=1)
    logp = (-s * np.log(ranks))[order] + 0.3 * rng.standard_normal((layers, experts))
    rows = np.arange(layers)[:, None]
    out = np.empty((windows, layers, experts))
    for window in range(windows):
        logp = logp + drift * rng.standard_normal((layers, experts))
        if shift_every and window % shift_every == shift_every - 1:
            hot = np.argsort(rng.random((layers, experts)), axis=1)[:, : min(boosted, experts)]
            logp[rows, hot] += boost
        probs = np.exp(logp - logp.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        out[window] = rng.multinomial(tokens, probs)
    return torch.from_numpy(out).float()
