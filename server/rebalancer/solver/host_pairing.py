"""The [P, M, R] step of `joint.paired_moves` on the CPU, compiled with Numba.

Scoring every copy move of a two-slot layer reads the new sorted copy list off the old one by index
arithmetic: vectorised, ~20 elementwise passes over [P, M, R] arrays (NumPy: ~2 ms a call on 58 x 16 moves
x 288 slots). Compiled, each move's list is read once, position by position, and only its pairing peak is
kept unless the slots are asked for (the one move a round applies). The integer steps are exact and the
float steps the same IEEE operations as the torch path's, so both give the same peaks bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from .jit import compiled

RUNS = ("above_high", "len_high", "above_low", "len_low", "start_a", "len_a", "start_b", "len_b")


@compiled()
def _position(index, bounds, num_replicas):
    """Where position `index` of a move's new list comes from: (position in the old list, clipped to it;
    1 in the heavier inserted run, 2 in the lighter one, 0 kept from the old list). bounds: the move's RUNS."""
    above_high, len_high, above_low, len_low, start_a, len_a, start_b, len_b = bounds
    low_start = above_low + len_high
    run = 2 if low_start <= index < low_start + len_low else (1 if above_high <= index < above_high + len_high else 0)
    # Index among the copies left, then its position in the old list (skipping the removed runs).
    kept = index - len_high * (index >= above_high) - len_low * (index >= low_start)
    kept += len_a * (kept >= start_a)
    kept += len_b * (kept >= start_b)
    return min(max(kept, 0), num_replicas - 1), run


@compiled()
def _paired(ordered, high, low, runs, peaks, kept, in_high, in_low):
    """Fill peaks [P, M] (max pair load of each move's list); with non-empty kept / in_high / in_low
    [P, M, R], also each position's source."""
    num_rows, num_replicas = ordered.shape
    with_slots = kept.shape[0] > 0
    for row in range(num_rows):
        for move in range(high.shape[1]):
            bounds = runs[row, move]
            values = (0.0, high[row, move], low[row, move])
            peak = -np.inf
            for index in range(num_replicas // 2):
                total = 0.0
                for position in (index, num_replicas - 1 - index):
                    source, run = _position(position, bounds, num_replicas)
                    total += ordered[row, source] if run == 0 else values[run]
                peak = max(peak, total)
            peaks[row, move] = peak
            if with_slots:
                for position in range(num_replicas):
                    kept[row, move, position], run = _position(position, bounds, num_replicas)
                    in_high[row, move, position], in_low[row, move, position] = run == 1, run == 2


def paired_peaks(
    ordered: torch.Tensor, high: torch.Tensor, low: torch.Tensor, runs: dict[str, torch.Tensor], with_slots: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`joint.paired_peaks` compiled: ordered [P, R] copy loads heaviest first, high / low [P, M] the
    inserted per-copy loads, `runs` the [P, M] run bounds -> (max pair load [P, M], and with `with_slots`
    the positions in the old list [P, M, R] int64, in the heavier inserted run [P, M, R] bool, in the
    lighter one; else None)."""
    num_rows, num_replicas = ordered.shape
    shape = (num_rows, high.shape[1], num_replicas) if with_slots else (0, 0, 0)
    bounds = np.ascontiguousarray(torch.stack([runs[name] for name in RUNS], 2).numpy(), dtype=np.int64)
    peaks = np.empty((num_rows, high.shape[1]), dtype=np.float64)
    kept, in_high, in_low = np.empty(shape, np.int64), np.empty(shape, np.bool_), np.empty(shape, np.bool_)
    source = (ordered.double().contiguous().numpy(), high.double().contiguous().numpy(), low.double().numpy())
    _paired(*source, bounds, peaks, kept, in_high, in_low)
    peaks_out = torch.from_numpy(peaks).to(ordered.dtype)
    if not with_slots:
        return peaks_out, None, None, None
    return peaks_out, torch.from_numpy(kept), torch.from_numpy(in_high), torch.from_numpy(in_low)
