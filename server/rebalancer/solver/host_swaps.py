"""`swaps.cheapest_swaps`, compiled with Numba: the incremental plan's swaps, each chosen for the copies it
ships as well as the load it moves.

A swap of two copies between GPUs ships two copies, one, or none: a copy that lands on a GPU that hosted
its expert in the placement in force (and lost that copy) ships nothing. Each round the heaviest GPU
above its target swaps one copy with a copy of another GPU: among the swaps that bring both GPUs to or
under the target, the one shipping fewest copies, then the lower of the two loads; when none does, the
one that lowers the larger load the most (levelling, ships what it ships). Never onto a GPU that already
hosts the expert. Rounds are sequential, each seeing the loads the earlier one left, so the loop runs
here for every solve device; it reads one layer at a time (memory O(G x E) for the copy counts).
"""

from __future__ import annotations

import numpy as np

from .jit import compiled


@compiled()
def _shipped(now, before):
    """Copies a GPU ships in for one expert: the copies it hosts beyond those it hosted before."""
    return max(0, now - before)


@compiled()
def _swap_cost(holds, held, gpu_h, gpu_p, expert_a, expert_b):
    """Change in shipped copies when `expert_a` leaves `gpu_h` for `gpu_p` and `expert_b` goes back."""
    cost = 0
    for gpu, expert, step in ((gpu_h, expert_a, -1), (gpu_p, expert_b, -1), (gpu_p, expert_a, 1), (gpu_h, expert_b, 1)):
        now, before = holds[gpu, expert], held[gpu, expert]
        cost += _shipped(now + step, before) - _shipped(now, before)
    return cost


@compiled()
def _best_swap(row, load, holds, held, copy_load, slots_per_gpu, heavy, partners, target, reaching):
    """The heaviest GPU's best swap -> (its slot, the partner's slot), (-1, -1) if none: with `reaching`,
    among the swaps that leave both GPUs at or under the target, fewest copies shipped, then the lower
    load (a partner without room for one is skipped whole); else the one levelling the pair best."""
    need = load[heavy] - target  # what a reaching swap must move off the heavy GPU, at least
    best_cost, best_level, best_s, best_t = 1 << 30, np.inf, -1, -1
    for s in range(heavy * slots_per_gpu, (heavy + 1) * slots_per_gpu):
        expert_a = row[s]
        for partner in partners:
            if partner == heavy or holds[partner, expert_a] > 0:
                continue
            if reaching and target - load[partner] < need:
                continue
            for t in range(partner * slots_per_gpu, (partner + 1) * slots_per_gpu):
                expert_b = row[t]
                moved = copy_load[expert_a] - copy_load[expert_b]
                if moved <= 0.0 or holds[heavy, expert_b] > 0:
                    continue
                level = max(load[heavy] - moved, load[partner] + moved)
                if level >= load[heavy] or (reaching and level > target):
                    continue
                cost = _swap_cost(holds, held, heavy, partner, expert_a, expert_b) if reaching else 0
                if cost < best_cost or (cost == best_cost and level < best_level):
                    best_cost, best_level, best_s, best_t = cost, level, s, t
    return best_s, best_t


@compiled()
def layer_state(row, prev_row, copy_load, slots_per_gpu):
    """One layer's GPU loads [G] and copies of each expert per GPU now and before, [G, E] each (the state
    the swaps and the arrival trades keep); prev_row -1 marks a slot of a new GPU, empty before."""
    num_slots, num_experts = row.shape[0], copy_load.shape[0]
    num_gpus = num_slots // slots_per_gpu
    load = np.zeros(num_gpus, dtype=np.float64)
    holds = np.zeros((num_gpus, num_experts), dtype=np.int64)
    held = np.zeros((num_gpus, num_experts), dtype=np.int64)
    for slot in range(num_slots):
        gpu = slot // slots_per_gpu
        load[gpu] += copy_load[row[slot]]
        holds[gpu, row[slot]] += 1
        if prev_row[slot] >= 0:
            held[gpu, prev_row[slot]] += 1
    return load, holds, held


@compiled()
def _layer(row, prev_row, copy_load, slots_per_gpu, target, max_swaps, max_partners):
    load, holds, held = layer_state(row, prev_row, copy_load, slots_per_gpu)
    for _ in range(max_swaps):
        heavy = np.argmax(load)
        if load[heavy] <= target:
            break
        partners = np.argsort(load, kind="mergesort")[:max_partners]
        args = (row, load, holds, held, copy_load, slots_per_gpu, heavy, partners, target)
        best_s, best_t = _best_swap(*args, True)
        if best_s < 0:
            best_s, best_t = _best_swap(*args, False)
        if best_s < 0:
            break
        expert_a, expert_b, partner = row[best_s], row[best_t], best_t // slots_per_gpu
        moved = copy_load[expert_a] - copy_load[expert_b]
        load[heavy] -= moved
        load[partner] += moved
        holds[heavy, expert_a] -= 1
        holds[partner, expert_b] -= 1
        holds[partner, expert_a] += 1
        holds[heavy, expert_b] += 1
        row[best_s], row[best_t] = expert_b, expert_a
    return load.max()


@compiled()
def _layers(rows, prev_rows, copy_loads, slots_per_gpu, targets, max_swaps, max_partners, peaks):
    for layer in range(rows.shape[0]):
        peaks[layer] = _layer(
            rows[layer], prev_rows[layer], copy_loads[layer], slots_per_gpu, targets[layer], max_swaps, max_partners
        )


def cheapest_swaps(
    rows: np.ndarray,
    prev_rows: np.ndarray,
    copy_loads: np.ndarray,
    slots_per_gpu: int,
    targets: np.ndarray,
    max_swaps: int,
    max_partners: int,
) -> np.ndarray:
    """Swap copies in `rows` [L, R] int64 in place (see the module doc) -> each layer's max GPU load [L].

    prev_rows [L, R]: the placement in force; copy_loads [L, E] float64: one copy's load (copy counts do
    not change); targets [L]; at most `max_swaps` swaps per layer, each with the `max_partners` lightest GPUs."""
    peaks = np.empty(rows.shape[0], dtype=np.float64)
    _layers(rows, prev_rows, copy_loads, slots_per_gpu, targets, max_swaps, max_partners, peaks)
    return peaks


def warm_up() -> None:
    """Compile (or load from the disk cache) the loop, so that no request pays the first compilation."""
    rows = np.array([[0, 1, 2, 3]], dtype=np.int64)
    cheapest_swaps(rows, rows.copy(), np.array([[4.0, 3.0, 1.0, 0.5]]), 2, np.array([4.5]), 4, 8)
