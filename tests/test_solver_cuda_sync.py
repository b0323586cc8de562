"""On a GPU the planner's loops never wait for the host (no host synchronisation inside its
loops). CUDA's sync debug mode turns any device-to-host copy inside the planner into an error."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_planner_loops_do_not_synchronise_with_the_host(monkeypatch, path):
    from rebalancer.solver.planner import plan

    monkeypatch.setenv("REBALANCER_SOLVER_PATH", path)
    generator = torch.Generator().manual_seed(0)
    loads = (torch.rand(8, 64, generator=generator) ** 4 * 1000).double().cuda()
    seeds = torch.arange(8, device="cuda")
    plan(loads, 72, 8, seeds, 16)  # warm-up: kernel compilation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        phy2log, peak = plan(loads, 72, 8, seeds, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert phy2log.shape == (8, 72) and phy2log.is_cuda and peak.is_cuda
