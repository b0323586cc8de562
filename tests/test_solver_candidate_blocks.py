"""Candidates are built and packed in blocks of bounded size: on huge layers memory and the stretch between
cancellation checkpoints stay small, and no layer's result depends on the batch it is solved in."""

from __future__ import annotations

import pytest
import torch
from rebalancer.solver import planner, solve
from rebalancer.solver.cancel import SolveCancelled, stop_when
from rebalancer.solver.candidates import multiplicative_noise
from rebalancer.solver.maps import logcnt_from_phy2log


def test_noise_of_a_candidate_slice_is_that_slice_of_the_full_noise():
    seeds = torch.tensor([3, 11, 40])
    full = multiplicative_noise(seeds, 9, 17, stream=2)
    assert torch.equal(multiplicative_noise(seeds, 9, 17, 2, slice(4, 7)), full[:, 4:7])
    assert torch.equal(full[:, 0], torch.ones(3, 17))  # candidate 0 is the plain plan


def small_blocks(monkeypatch, items: int) -> None:
    monkeypatch.setattr(planner, "CANDIDATE_BLOCK_ITEMS", items)


@pytest.mark.parametrize("items", [40, 100, 2**21])
def test_a_layer_plans_the_same_alone_and_in_a_batch_whatever_the_block(monkeypatch, items):
    small_blocks(monkeypatch, items)  # 40: one candidate of one row per block; 100: two candidates
    weight = torch.rand(5, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64) ** 3
    batch = solve(weight, 40, 4, 2, 8, policy="global", num_candidates=6, device="cpu")
    for layer in range(weight.shape[0]):
        alone = solve(
            weight[layer : layer + 1],
            40,
            4,
            2,
            8,
            policy="global",
            num_candidates=6,
            device="cpu",
            layer_seeds=batch.request.options.layer_seeds(weight)[layer : layer + 1],
        )
        assert torch.equal(alone.phy2log[0], batch.phy2log[layer])
    assert (logcnt_from_phy2log(batch.phy2log, 32) >= 1).all()


def record_blocks(monkeypatch) -> list[tuple[int, slice]]:
    """(rows, candidate slice) of every block `candidate_placements` builds."""
    built = []
    block = planner._candidate_block

    def recorded(loads, *args):
        built.append((loads.shape[0], args[-1]))
        return block(loads, *args)

    monkeypatch.setattr(planner, "_candidate_block", recorded)
    return built


def test_every_block_holds_at_most_the_block_size_in_copies(monkeypatch):
    small_blocks(monkeypatch, 100)  # R = 40: two candidates of one row per block
    built = record_blocks(monkeypatch)
    weight = torch.rand(3, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    solve(weight, 40, 4, 2, 8, policy="global", num_candidates=5, device="cpu")
    assert built == [(1, slice(0, 2)), (1, slice(2, 4)), (1, slice(4, 5))] * 3


def test_a_stop_between_blocks_ends_the_solve(monkeypatch):
    small_blocks(monkeypatch, 40)
    built = record_blocks(monkeypatch)
    weight = torch.rand(2, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with pytest.raises(SolveCancelled), stop_when(lambda: len(built) >= 2):
        solve(weight, 40, 4, 2, 8, policy="global", num_candidates=8, device="cpu")
    assert len(built) == 2  # of the 16 blocks
