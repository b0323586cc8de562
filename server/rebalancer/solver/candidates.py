"""Per-layer, per-seed randomness for the C candidates of each layer.

Noise comes from a counter-based hash of (layer seed, candidate, item), so a layer draws the same
numbers whether it is solved alone or in a batch, on the CPU or on a GPU, without a generator object.
"""

from __future__ import annotations

import torch

MAX_NOISE_SCALE = 0.2
_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform(layer_seeds: torch.Tensor, candidates: torch.Tensor, num_items: int, stream: int) -> torch.Tensor:
    """Uniform numbers in [-1, 1): [L, C, N] for the candidate indices `candidates` [C], a pure function
    of (seed, candidate, item, stream)."""
    device = layer_seeds.device
    seeds = _mix32((layer_seeds.to(torch.int64) & _MASK32) ^ (stream * 0x9E3779B9 & _MASK32))
    cand = candidates.to(device=device, dtype=torch.int64)
    item = torch.arange(num_items, dtype=torch.int64, device=device)
    x = _mix32(seeds.view(-1, 1, 1) ^ _mix32(cand.view(1, -1, 1) * 0x01000193 + 0x5BD1E995))
    x = _mix32(x ^ _mix32(item.view(1, 1, -1) + 0x68E31DA4))
    return x.to(torch.float32) * (2.0 / 2**32) - 1.0


def noise_scales(num_candidates: int, device: torch.device) -> torch.Tensor:
    """Scale per candidate, 0 for candidate 0 (plain LPT) rising linearly to MAX_NOISE_SCALE: [C]."""
    if num_candidates == 1:
        return torch.zeros(1, device=device)
    return torch.linspace(0.0, MAX_NOISE_SCALE, num_candidates, device=device)


def multiplicative_noise(
    layer_seeds: torch.Tensor, num_candidates: int, num_items: int, stream: int, candidates: slice = slice(None)
) -> torch.Tensor:
    """Factors 1 + scale_c * u, u uniform in [-1, 1): [L, C', N] for the candidates `candidates` of the
    C = `num_candidates` (all by default); exactly 1 for candidate 0."""
    device = layer_seeds.device
    chosen = torch.arange(num_candidates, device=device)[candidates]
    scales = noise_scales(num_candidates, device)[candidates].view(1, -1, 1)
    return 1.0 + scales * uniform(layer_seeds, chosen, num_items, stream)
