"""Three-GPU repartition on small layers: it escapes placements that one- and two-GPU moves leave stuck,
keeps the copies, and only applies where its neighbourhood is small."""

from __future__ import annotations

import pytest
import torch
from rebalancer.solver import maps, repartition

# 16 experts on 6 GPUs x 3 slots (the two heaviest with two copies): swaps and re-splits of the heaviest
# GPU with any one other stay at 278.5; the optimum of these copies (and of the layer) is 271.5.
LOADS = [37.0, 74.0, 311.0, 17.0, 62.0, 54.0, 56.0, 29.0, 106.0, 97.0, 97.0, 86.0, 56.0, 3.0, 72.0, 443.0]
STUCK = [[15, 5, 13], [15, 0, 3], [2, 1, 7], [2, 6, 12], [8, 11, 4], [9, 10, 14]]


def _peak(loads: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    logcnt = maps.logcnt_from_phy2log(phy2log, loads.shape[1])
    return maps.gpu_loads(loads, phy2log, logcnt, num_gpus).max(-1).values


def test_repartition_escapes_a_placement_pair_moves_leave_stuck() -> None:
    loads = torch.tensor([LOADS], dtype=torch.float64)
    phy2log = torch.tensor([sum(STUCK, [])])
    assert float(_peak(loads, phy2log, 6)) == 278.5
    improved, peak = repartition.repartition(loads, phy2log, _peak(loads, phy2log, 6), 6)
    assert float(peak) == pytest.approx(271.5, rel=1e-12)
    assert torch.equal(_peak(loads, improved, 6), peak)
    counts = maps.logcnt_from_phy2log
    assert torch.equal(counts(improved, 16), counts(phy2log, 16))


def test_repartition_is_batch_independent_and_leaves_optimal_rows() -> None:
    stuck = torch.tensor([LOADS], dtype=torch.float64)
    even = torch.ones(1, 16, dtype=torch.float64)  # every copy 1, every GPU 3: at the bound, left as it is
    even[0, :2] = 2.0
    loads = torch.cat([stuck, even, stuck.flip(1)])
    phy2log = torch.tensor([sum(STUCK, []), list(range(16)) + [0, 1], [15 - e for e in sum(STUCK, [])]])
    peak = _peak(loads, phy2log, 6)
    both, both_peak = repartition.repartition(loads, phy2log, peak, 6)
    for row in range(3):
        alone, alone_peak = repartition.repartition(
            loads[row : row + 1], phy2log[row : row + 1], peak[row : row + 1], 6
        )
        assert torch.equal(both[row : row + 1], alone) and torch.equal(both_peak[row : row + 1], alone_peak)
    assert torch.equal(both[1], phy2log[1])


@pytest.mark.parametrize(
    ("num_replicas", "num_gpus", "expected"),
    [(18, 6, True), (24, 8, True), (16, 8, False), (30, 10, False), (288, 72, False), (9, 3, True)],
)
def test_repartition_applies_to_small_layers_of_three_or_more_slots(
    num_replicas: int, num_gpus: int, expected: bool
) -> None:
    assert repartition.applies(num_replicas, num_gpus) is expected


def test_row_blocks_leave_every_layer_as_all_at_once(monkeypatch) -> None:
    """Layers are independent problems: blocks of one row (which bound the [P, T, W, 3S] tables and the
    time between cancellation checkpoints) plan what one block of every row plans."""
    from rebalancer.solver import solve

    weight = torch.rand(6, 12, generator=torch.Generator().manual_seed(8), dtype=torch.float64) ** 3
    calls = []
    rows = repartition._repartition_rows
    monkeypatch.setattr(repartition, "_repartition_rows", lambda p, *a: calls.append(p.shape[0]) or rows(p, *a))
    whole = solve(weight, 24, 1, 1, 8, device="cpu").phy2log
    assert calls and max(calls) > 1
    calls.clear()
    monkeypatch.setattr(repartition, "BLOCK_ELEMENTS", 1)
    assert torch.equal(solve(weight, 24, 1, 1, 8, device="cpu").phy2log, whole)
    assert calls and max(calls) == 1


def test_applies_is_the_neighbourhood_rule_and_cheap_on_huge_shapes() -> None:
    import math

    for gpus in range(1, 12):
        for slots in range(1, 7):
            hood = math.comb(gpus - 1, 2) * repartition.num_ways(slots) * 3 * slots if gpus >= 1 else 0
            expected = slots >= 3 and gpus >= 3 and hood <= repartition.MAX_NEIGHBOURHOOD
            assert repartition.applies(slots * gpus, gpus) == expected, (slots, gpus)
    # 2**17 slots per GPU: (3S)! would take seconds; the admission model asks this on the event loop.
    assert not repartition.applies(2**19, 4)
