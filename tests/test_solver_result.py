"""`solve` returns the placement at once and works out its maps and figures when they are first read."""

from __future__ import annotations

import torch
from rebalancer.solver import maps, solve


def _loads() -> torch.Tensor:
    return torch.rand(3, 12, generator=torch.Generator().manual_seed(3)) * 100


def test_figures_wait_for_their_first_read_and_then_describe_the_placement() -> None:
    loads = _loads()
    result = solve(loads, 16, 4, 2, 8, device="cpu")
    lazy = ("log2phy", "logcnt", "balancedness", "stats")
    assert not any(name in vars(result) for name in lazy)
    logcnt = maps.logcnt_from_phy2log(result.phy2log, 12)
    assert torch.equal(result.logcnt, logcnt)
    assert torch.equal(result.log2phy, maps.log2phy_from_phy2log(result.phy2log, logcnt))
    torch.testing.assert_close(result.balancedness, maps.balancedness(loads.double(), result.phy2log, logcnt, 8))
    assert result.balancedness_before is None and torch.equal(result.moved_copies, torch.zeros(3, dtype=torch.int64))
    assert set(result.stats) >= {"path", "group_node_span", "off_node_share"}
    assert all(name in vars(result) for name in lazy)  # computed once, then kept


def test_figures_against_a_placement_in_force_are_those_of_the_maps() -> None:
    loads = _loads()
    prev = solve(loads.flip(1), 16, 4, 2, 8, device="cpu").phy2log
    result = solve(loads, 16, 4, 2, 8, device="cpu", prev_phy2log=prev)
    logcnt_prev = maps.logcnt_from_phy2log(prev, 12)
    torch.testing.assert_close(result.balancedness_before, maps.balancedness(loads.double(), prev, logcnt_prev, 8))
    assert torch.equal(result.moved_copies, maps.moved_copies(prev, result.phy2log, 12, 8))
    assert "moved_bytes" in result.stats


def test_the_kernel_path_is_read_without_scoring_the_locality() -> None:
    result = solve(_loads(), 16, 4, 2, 8, device="cpu")
    path = result.path
    assert "stats" not in vars(result)
    assert path in ("torch", "triton") and result.stats["path"] == path


def test_log2phy_lists_each_experts_slots_in_slot_order_in_any_id_type() -> None:
    phy2log = torch.randint(0, 40, (5, 300), generator=torch.Generator().manual_seed(1))
    phy2log[:, :40] = torch.arange(40)  # every expert hosted
    logcnt = maps.logcnt_from_phy2log(phy2log, 40)
    expected = torch.full((5, 40, int(logcnt.max())), -1, dtype=torch.int64)
    for layer in range(5):
        for expert in range(40):
            slots = (phy2log[layer] == expert).nonzero().flatten()
            expected[layer, expert, : slots.numel()] = slots
    for dtype in (torch.int64, torch.int32, torch.int16):
        log2phy = maps.log2phy_from_phy2log(phy2log, logcnt, dtype=dtype)
        assert log2phy.dtype == dtype and torch.equal(log2phy.long(), expected)


def test_log2phy_in_a_narrow_type_is_the_same_map() -> None:
    for policy in ("auto", "deepseek"):
        fresh, read = solve(_loads(), 16, 4, 2, 8, policy=policy), solve(_loads(), 16, 4, 2, 8, policy=policy)
        narrow = fresh.log2phy_as(torch.int16)
        assert "log2phy" not in vars(fresh) and narrow.dtype == torch.int16
        assert torch.equal(narrow.long(), read.log2phy) and torch.equal(read.log2phy_as(torch.int16), narrow)
