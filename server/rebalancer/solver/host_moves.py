"""`joint.move_peaks` on the CPU, compiled with Numba.

Scoring every in-place copy move (donor y's copy on GPU h becomes a copy of receiver x) is ~15 torch ops
over [P, M, G] float64 tensors plus a per-GPU histogram: ~5 ms a solve on 58 x 256 -> 288 slots on 96
GPUs, a sixth of it. Compiled, each move is one pass over the GPUs' slots. The float steps are the torch
path's IEEE operations in its order (no fused multiply-add), so both give the same peaks bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from .jit import compiled


def move_peaks(
    loads: torch.Tensor,
    counts: torch.Tensor,
    gpu_experts: torch.Tensor,
    gpu_loads: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """`joint.move_peaks` for CPU tensors: loads, counts [P, E], gpu_experts [P, G, S], gpu_loads [P, G]
    float64, moves x, y, valid [P, M] -> max GPU load after each move on each GPU h [P, M, G]."""
    num_rows, num_gpus, _ = gpu_experts.shape
    peaks = np.empty((num_rows, x.shape[1], num_gpus), dtype=np.float64)
    arrays = (loads, counts, gpu_experts, gpu_loads, x, y, valid)
    _move_peaks(*(np.ascontiguousarray(array.numpy()) for array in arrays), peaks)
    return torch.from_numpy(peaks)


@compiled(error_model="numpy")
def _move_peaks(loads, counts, gpu_experts, gpu_loads, x, y, valid, peaks):
    """Fill peaks [P, M, G]: every copy of x lighter, every copy of y heavier, GPU h's copy of y turned
    into x; +inf where the move is invalid or h hosts no y."""
    num_rows, num_gpus, slots = gpu_experts.shape
    after = np.empty(num_gpus)
    hosts_y = np.empty(num_gpus, dtype=np.bool_)
    for row in range(num_rows):
        for move in range(x.shape[1]):
            receiver, donor = x[row, move], y[row, move]
            load_x, load_y = loads[row, receiver], loads[row, donor]
            count_x, count_y = np.float64(counts[row, receiver]), np.float64(counts[row, donor])
            new_x, new_y = load_x / (count_x + 1), load_y / max(count_y - 1, 1.0)
            step_x, step_y = new_x - load_x / count_x, new_y - load_y / count_y
            first, first_at = -np.inf, 0
            for gpu in range(num_gpus):
                copies_x, copies_y = 0, 0
                for slot in range(slots):
                    expert = gpu_experts[row, gpu, slot]
                    copies_x += expert == receiver
                    copies_y += expert == donor
                after[gpu] = gpu_loads[row, gpu] + np.float64(copies_x) * step_x + np.float64(copies_y) * step_y
                hosts_y[gpu] = copies_y > 0
                if after[gpu] > first:
                    first, first_at = after[gpu], gpu
            # The max over the other GPUs: the largest, or on the largest's GPU the second largest (equal
            # top loads give the same value whichever index is taken first).
            second = -np.inf
            for gpu in range(num_gpus):
                if gpu != first_at:
                    second = max(second, after[gpu])
            if num_gpus == 1:
                second = first
            swap = new_x - new_y
            for gpu in range(num_gpus):
                others = second if gpu == first_at else first
                peak = max(others, after[gpu] + swap)
                peaks[row, move, gpu] = peak if valid[row, move] and hosts_y[gpu] else np.inf
