"""`arrivals.near_sources`, compiled with Numba: per layer, exchange arriving copies between GPUs of
different nodes so that more of them find a source on their own node.

Exchanges are pairwise and sequential (each sees the GPU loads the earlier ones left), so the loop runs
here for every solve device; it reads one layer's slots at a time. An arrival is a slot whose expert
its GPU did not hold before. Two arrivals trade places only when it raises the number of the pair with
a same-node source, neither GPU held (before or now) the other's expert, and both GPU loads stay at or
under the layer's peak: the peak, every GPU's count of arrivals, and the moved copies stay as they were.
"""

from __future__ import annotations

import numpy as np

from .jit import compiled


@compiled()
def _layer(new, before, on_node, node_of_gpu, copy_load, slots_per_gpu, max_partners, max_passes):
    num_slots, num_experts = new.shape[0], copy_load.shape[0]
    num_gpus = num_slots // slots_per_gpu
    load = np.zeros(num_gpus, dtype=np.float64)
    # An expert a GPU holds now (copies) or held before cannot arrive there again.
    holds = np.zeros((num_gpus, num_experts), dtype=np.int64)
    held_before = np.zeros((num_gpus, num_experts), dtype=np.bool_)
    for slot in range(num_slots):
        gpu = slot // slots_per_gpu
        load[gpu] += copy_load[new[slot]]
        holds[gpu, new[slot]] += 1
        if before[slot] >= 0:
            held_before[gpu, before[slot]] = True
    # Float sums in another order may differ in the last bits: the cap keeps the peak as it is.
    peak = load.max() * (1.0 + 1e-12)
    arrivals = np.empty(num_slots, dtype=np.int64)
    count = 0
    for slot in range(num_slots):
        if not held_before[slot // slots_per_gpu, new[slot]]:
            arrivals[count] = slot
            count += 1
    swaps = 0
    for _ in range(max_passes):
        swapped = False
        for i in range(count):
            a = arrivals[i]
            gpu_a, expert_a = a // slots_per_gpu, new[a]
            node_a = node_of_gpu[gpu_a]
            if on_node[node_a, expert_a]:
                continue
            best_gain, best = 0, -1
            for step in range(min(count - 1, max_partners)):
                b = arrivals[(i + 1 + step) % count]
                gpu_b, expert_b = b // slots_per_gpu, new[b]
                node_b = node_of_gpu[gpu_b]
                if node_b == node_a:
                    continue
                gain = int(on_node[node_b, expert_a]) + int(on_node[node_a, expert_b]) - int(on_node[node_b, expert_b])
                if gain <= best_gain or holds[gpu_b, expert_a] or holds[gpu_a, expert_b]:
                    continue
                if held_before[gpu_b, expert_a] or held_before[gpu_a, expert_b]:
                    continue
                delta = copy_load[expert_b] - copy_load[expert_a]
                if load[gpu_a] + delta > peak or load[gpu_b] - delta > peak:
                    continue
                best_gain, best = gain, b
                if gain == 2:  # the most one exchange can gain
                    break
            if best >= 0:
                gpu_b, expert_b = best // slots_per_gpu, new[best]
                delta = copy_load[expert_b] - copy_load[expert_a]
                load[gpu_a] += delta
                load[gpu_b] -= delta
                new[a], new[best] = expert_b, expert_a
                holds[gpu_a, expert_a] -= 1
                holds[gpu_b, expert_b] -= 1
                holds[gpu_a, expert_b] += 1
                holds[gpu_b, expert_a] += 1
                swaps += 1
                swapped = True
        if not swapped:
            break
    return swaps


@compiled()
def _exchange(new, before, on_node, node_of_gpu, copy_load, active, slots_per_gpu, max_partners, max_passes):
    swaps = 0
    for layer in range(new.shape[0]):
        if active[layer]:
            swaps += _layer(
                new[layer],
                before[layer],
                on_node[layer],
                node_of_gpu,
                copy_load[layer],
                slots_per_gpu,
                max_partners,
                max_passes,
            )
    return swaps


def exchange(
    new: np.ndarray,
    before: np.ndarray,
    on_node: np.ndarray,
    node_of_gpu: np.ndarray,
    copy_load: np.ndarray,
    active: np.ndarray,
    slots_per_gpu: int,
    max_partners: int,
    max_passes: int,
) -> int:
    """Exchange arrivals in `new` [L, R] int64 in place (layers where `active` [L]); -> exchanges made.

    before [L, R]: each slot's expert in the placement in force (-1: a new GPU); on_node [L, N, E]: the
    node holds the expert on a GPU that can send; node_of_gpu [G]; copy_load [L, E]: one copy's load."""
    return int(_exchange(new, before, on_node, node_of_gpu, copy_load, active, slots_per_gpu, max_partners, max_passes))


def warm_up() -> None:
    """Compile (or load from the disk cache) the loop, so that no request pays the first compilation."""
    new = np.array([[0, 1, 1, 0]], dtype=np.int64)
    before = np.array([[1, 2, 0, 3]], dtype=np.int64)
    on_node = np.ones((1, 2, 4), dtype=np.bool_)
    exchange(new, before, on_node, np.array([0, 1]), np.ones((1, 4)), np.ones(1, dtype=np.bool_), 2, 8, 1)
