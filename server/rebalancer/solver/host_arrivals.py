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

from .host_swaps import layer_state
from .jit import compiled


@compiled()
def _layer(new, before, on_node, node_of_gpu, copy_load, slots_per_gpu, max_partners, max_passes):
    num_slots = new.shape[0]
    # An expert a GPU holds now (copies) or held before cannot arrive there again.
    load, holds, held_before = layer_state(new, before, copy_load, slots_per_gpu)
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


@compiled()
def _held(row, first, slots_per_gpu, expert):
    """Whether the GPU whose slots start at `first` holds `expert` in `row`."""
    for slot in range(first, first + slots_per_gpu):  # noqa: SIM110 (Numba compiles loops, not generators)
        if row[slot] == expert:
            return True
    return False


@compiled()
def _balance(new, before, on_node, node_of_gpu, copy_load, active, slots_per_gpu, max_steps):
    """Each step, the GPU that receives most copies over the NIC (no source on its node), summed over the
    layers, trades one such arrival with an arrival of another GPU whose count stays below it: the pair's
    larger count falls, no copy loses a same-node source, both loads stay under the layer's peak, and
    neither GPU held or holds the other's expert. Stops when the busiest GPU has no such trade."""
    num_layers, num_slots = new.shape
    num_gpus = num_slots // slots_per_gpu
    load = np.zeros((num_layers, num_gpus))
    peak = np.zeros(num_layers)
    arrival = np.zeros((num_layers, num_slots), dtype=np.bool_)
    inter = np.zeros(num_gpus, dtype=np.int64)
    for layer in range(num_layers):
        for slot in range(num_slots):
            gpu = slot // slots_per_gpu
            expert = new[layer, slot]
            load[layer, gpu] += copy_load[layer, expert]
            if not _held(before[layer], gpu * slots_per_gpu, slots_per_gpu, expert):
                arrival[layer, slot] = True
                if not on_node[layer, node_of_gpu[gpu], expert]:
                    inter[gpu] += 1
        peak[layer] = load[layer].max() * (1.0 + 1e-12)
    steps = 0
    for _ in range(max_steps):
        x = np.argmax(inter)
        node_x = node_of_gpu[x]
        best_max, best_layer, best_a, best_b = inter[x], -1, -1, -1
        for layer in range(num_layers):
            if not active[layer]:
                continue
            row, old = new[layer], before[layer]
            for a in range(x * slots_per_gpu, (x + 1) * slots_per_gpu):
                expert_a = row[a]
                if not arrival[layer, a] or on_node[layer, node_x, expert_a]:
                    continue
                for b in range(num_slots):
                    y = b // slots_per_gpu
                    if y == x or not arrival[layer, b] or inter[y] + 1 >= best_max:
                        continue
                    expert_b = row[b]
                    node_y = node_of_gpu[y]
                    b_inter_x = int(not on_node[layer, node_x, expert_b])
                    a_inter_y = int(not on_node[layer, node_y, expert_a])
                    b_inter_y = int(not on_node[layer, node_y, expert_b])
                    # x's count falls only if b finds a source on x's node; then the pair loses no
                    # same-node source (y gains at most the one x sheds).
                    pair_max = max(inter[x] - 1 + b_inter_x, inter[y] - b_inter_y + a_inter_y)
                    if pair_max >= best_max:
                        continue
                    delta = copy_load[layer, expert_b] - copy_load[layer, expert_a]
                    if load[layer, x] + delta > peak[layer] or load[layer, y] - delta > peak[layer]:
                        continue
                    first_x, first_y = x * slots_per_gpu, y * slots_per_gpu
                    if _held(row, first_y, slots_per_gpu, expert_a) or _held(old, first_y, slots_per_gpu, expert_a):
                        continue
                    if _held(row, first_x, slots_per_gpu, expert_b) or _held(old, first_x, slots_per_gpu, expert_b):
                        continue
                    best_max, best_layer, best_a, best_b = pair_max, layer, a, b
        if best_layer < 0:
            break
        row = new[best_layer]
        expert_a, expert_b = row[best_a], row[best_b]
        y = best_b // slots_per_gpu
        node_y = node_of_gpu[y]
        inter[x] += int(not on_node[best_layer, node_x, expert_b]) - 1
        inter[y] += int(not on_node[best_layer, node_y, expert_a]) - int(not on_node[best_layer, node_y, expert_b])
        delta = copy_load[best_layer, expert_b] - copy_load[best_layer, expert_a]
        load[best_layer, x] += delta
        load[best_layer, y] -= delta
        row[best_a], row[best_b] = expert_b, expert_a
        steps += 1
    return steps


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


def balance(
    new: np.ndarray,
    before: np.ndarray,
    on_node: np.ndarray,
    node_of_gpu: np.ndarray,
    copy_load: np.ndarray,
    active: np.ndarray,
    slots_per_gpu: int,
    max_steps: int,
) -> int:
    """Trade arrivals in `new` [L, R] in place so that the busiest NIC receiver over all layers receives
    fewer (`_balance`; the arguments as for `exchange`), at most `max_steps` trades -> trades made."""
    return int(_balance(new, before, on_node, node_of_gpu, copy_load, active, slots_per_gpu, max_steps))


def warm_up() -> None:
    """Compile (or load from the disk cache) the loop, so that no request pays the first compilation."""
    new = np.array([[0, 1, 1, 0]], dtype=np.int64)
    before = np.array([[1, 2, 0, 3]], dtype=np.int64)
    on_node = np.ones((1, 2, 4), dtype=np.bool_)
    exchange(new, before, on_node, np.array([0, 1]), np.ones((1, 4)), np.ones(1, dtype=np.bool_), 2, 8, 1)
    balance(new, before, on_node, np.array([0, 1]), np.ones((1, 4)), np.ones(1, dtype=np.bool_), 2, 4)
