"""The Triton packing kernels give the torch path's results.

Without a GPU the kernels run under the Triton interpreter. `TRITON_INTERPRET` is read when `triton.jit`
decorates a kernel, so setting it here would turn every later import of the kernels in this pytest process
into interpreted code (slow on a GPU machine). Instead one child process (`python tests/test_kernels.py OUT`,
with the variable set) runs every kernel case once and saves inputs and outputs; the tests below rerun the
torch path on the saved inputs and compare.

What is compared:
* greedy LPT: exact `slot_items` on float loads, zero loads and ties (both break ties to the lowest pack);
* swap refinement: exact `slot_items` and `slot_loads` on integral loads (float32 sums are then exact in any
  order) with distinct pack loads; with ties in pack loads the torch `topk` order is unspecified, so only
  the max pack loads are compared, and a valid permutation of the items is required;
* the whole solver forced onto the kernels: valid placements and the torch path's max loads (candidates
  there stop one by one rather than by layer, so some may be refined further).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rebalancer.solver import kernels, packing
from rebalancer.solver.refinement import RefineLimits

ROOT = Path(__file__).resolve().parents[1]
TARGET_SLACK = 5e-4

# name: (problems B, packs G, capacity K, loads)
GREEDY_CASES = {
    "float_g4_k9": (3, 4, 9, "float"),
    "float_g32_k9": (1, 32, 9, "float"),
    "float_g10_k30": (1, 10, 30, "float"),
    "one_pack": (2, 1, 6, "float"),
    "one_slot_per_pack": (2, 6, 1, "float"),
    "zero_loads": (2, 5, 4, "zeros"),
    "tied_loads": (2, 4, 6, "ties"),
}
REFINE_CASES = {
    "integral_g4_k9": (2, 4, 9, "integral"),
    "integral_g16_k3": (2, 16, 3, "integral"),
    "integral_g2_k5": (2, 2, 5, "integral"),
    "integral_g6_k1": (2, 6, 1, "integral"),
    "one_pack": (2, 1, 5, "integral"),
    "float_g8_k4": (2, 8, 4, "float"),
    "tied_loads": (2, 6, 4, "ties"),
    "zero_loads": (2, 5, 3, "zeros"),
}
# Exact maps need float32 sums that do not depend on the summation order and no ties between packs.
EXACT_REFINE = {"integral_g4_k9", "integral_g16_k3", "integral_g2_k5", "integral_g6_k1", "one_pack"}
SOLVER_SHAPE = dict(num_replicas=24, num_groups=1, num_nodes=1, num_gpus=4)


def make_loads(problems: int, packs: int, capacity: int, kind: str, seed: int) -> torch.Tensor:
    """Item loads [B, N] float32 of the given kind; integral ones keep every pack sum below 2^22."""
    gen = torch.Generator().manual_seed(seed)
    shape = (problems, packs * capacity)
    if kind == "float":
        return torch.rand(shape, generator=gen) * 100
    if kind == "integral":
        return torch.randint(1, 2**22 // capacity, shape, generator=gen).float()
    if kind == "ties":
        return torch.randint(1, 4, shape, generator=gen).float()
    loads = torch.randint(1, 1000, shape, generator=gen).float()
    return torch.where(torch.rand(shape, generator=gen) < 0.5, 0.0, loads)


def lpt_order(item_loads: torch.Tensor) -> torch.Tensor:
    return item_loads.sort(dim=1, descending=True, stable=True).indices


def greedy_slot_loads(item_loads: torch.Tensor, slot_items: torch.Tensor) -> torch.Tensor:
    return item_loads.gather(1, slot_items.flatten(1)).view_as(slot_items)


def refine_inputs(problems: int, packs: int, capacity: int, kind: str, seed: int) -> dict[str, torch.Tensor]:
    """A torch greedy packing to refine, with the planner's targets (a lower bound plus a hair).

    The items arrive in a random order, as in noisy candidates, so refinement has work to do."""
    item_loads = make_loads(problems, packs, capacity, kind, seed)
    order = torch.rand(item_loads.shape, generator=torch.Generator().manual_seed(seed)).argsort(1)
    slot_items = packing.greedy_pack(item_loads, order, packs)
    bound = torch.maximum(item_loads.sum(1) / packs, item_loads.max(1).values)
    return {
        "slot_loads": greedy_slot_loads(item_loads, slot_items),
        "slot_items": slot_items,
        "targets": bound * (1.0 + TARGET_SLACK),
    }


def solver_loads() -> torch.Tensor:
    return torch.rand(2, 16, generator=torch.Generator().manual_seed(5)) ** 3 * 1000


def run_kernel_cases(out: Path) -> None:
    """Child process: every kernel case under the interpreter, saved for the parent to compare.

    The inputs to refine come from the torch greedy (no path forced yet), so only the kernels under test
    pay for the interpreter."""
    results = {}
    for seed, (name, (problems, packs, capacity, kind)) in enumerate(GREEDY_CASES.items()):
        item_loads = make_loads(problems, packs, capacity, kind, seed)
        slot_items = kernels.greedy_pack(item_loads, lpt_order(item_loads), packs)
        results[f"greedy/{name}"] = {"item_loads": item_loads, "slot_items": slot_items}
    for seed, (name, (problems, packs, capacity, kind)) in enumerate(REFINE_CASES.items()):
        case = refine_inputs(problems, packs, capacity, kind, seed)
        case["refined"] = kernels.swap_refine(case["slot_loads"], case["slot_items"], case["targets"], RefineLimits())
        few = RefineLimits(num_partners=2, pair_rounds=3, heaviest_rounds=5)
        case["refined_few_partners"] = kernels.swap_refine(case["slot_loads"], case["slot_items"], case["targets"], few)
        results[f"refine/{name}"] = case
    from rebalancer.solver import rebalance_experts

    os.environ[kernels.PATH_ENV] = "triton"
    phy2log, _, logcnt = rebalance_experts(solver_loads(), **SOLVER_SHAPE, policy="global", num_candidates=4)
    results["solver"] = {"phy2log": phy2log, "logcnt": logcnt}
    torch.save(results, out)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """The kernels' outputs on every case, computed once by a child process under the interpreter."""
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("kernels") / "results.pt"
    env = {key: value for key, value in os.environ.items() if key != kernels.PATH_ENV} | {"TRITON_INTERPRET": "1"}
    child = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stdout + child.stderr
    return torch.load(out)


@pytest.mark.parametrize("name", GREEDY_CASES)
def test_greedy_kernel_fills_the_same_slots_as_torch(interpreted, name):
    case = interpreted[f"greedy/{name}"]
    packs = GREEDY_CASES[name][1]
    expected = packing.greedy_pack(case["item_loads"], lpt_order(case["item_loads"]), packs)
    assert torch.equal(case["slot_items"], expected)


@pytest.mark.parametrize("name", REFINE_CASES)
def test_refine_kernel_reaches_the_torch_max_loads(interpreted, name):
    case = interpreted[f"refine/{name}"]
    kernel_loads, kernel_items = case["refined"]
    torch_loads, torch_items = packing.swap_refine(case["slot_loads"], case["slot_items"], case["targets"])
    # The kernel moves whole items: the same multiset per problem, each slot holding its item's load.
    assert torch.equal(kernel_items.flatten(1).sort(1).values, case["slot_items"].flatten(1).sort(1).values)
    item_loads = torch.zeros(kernel_items.shape[0], kernel_items[0].numel())
    item_loads.scatter_(1, case["slot_items"].flatten(1), case["slot_loads"].flatten(1))
    assert torch.equal(kernel_loads, greedy_slot_loads(item_loads, kernel_items))
    torch_peak, kernel_peak = torch_loads.sum(-1).max(-1).values, kernel_loads.sum(-1).max(-1).values
    torch.testing.assert_close(kernel_peak, torch_peak, rtol=1e-6, atol=0.0)
    if name in EXACT_REFINE:
        assert torch.equal(kernel_items, torch_items)
        assert torch.equal(kernel_loads, torch_loads)


@pytest.mark.parametrize("name", sorted(EXACT_REFINE))
def test_refine_kernel_honours_partner_and_round_limits(interpreted, name):
    case = interpreted[f"refine/{name}"]
    few = RefineLimits(num_partners=2, pair_rounds=3, heaviest_rounds=5)
    torch_loads, torch_items = packing.swap_refine(case["slot_loads"], case["slot_items"], case["targets"], few)
    kernel_loads, kernel_items = case["refined_few_partners"]
    assert torch.equal(kernel_items, torch_items)
    assert torch.equal(kernel_loads, torch_loads)


def test_refine_kernel_refuses_groups_it_cannot_honour():
    pytest.importorskip("triton")
    from rebalancer.solver.kernels import refine

    loads = torch.ones(2, 2, 2)
    with pytest.raises(ValueError, match="group_size must be 1"):
        refine.swap_refine(loads, torch.arange(8).view(2, 2, 2), torch.ones(2), RefineLimits(group_size=2))


def test_groups_stop_together_on_every_torch_path():
    # Problem 0 starts at its target, problem 1 (same group) could still improve: the group stops.
    slot_loads = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[5.0, 4.0], [1.0, 0.0]]])
    slot_items = torch.arange(8).view(2, 2, 2)
    targets = torch.tensor([2.0, 5.0])
    grouped_loads, _ = packing.swap_refine(slot_loads, slot_items, targets, RefineLimits(group_size=2))
    alone_loads, _ = packing.swap_refine(slot_loads, slot_items, targets, RefineLimits(group_size=1))
    assert torch.equal(grouped_loads, slot_loads)
    assert float(alone_loads[1].sum(-1).max()) < 9.0
    if torch.cuda.is_available():
        cuda = [tensor.cuda() for tensor in (slot_loads.double(), slot_items, targets)]
        on_gpu, _ = packing.swap_refine(*cuda, RefineLimits(group_size=2))
        assert torch.equal(on_gpu.cpu().float(), slot_loads)


def test_group_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="group_size"):
        items = torch.zeros(3, 2, 2, dtype=torch.int64)
        packing.swap_refine(torch.ones(3, 2, 2), items, torch.ones(3), RefineLimits(group_size=2))


def test_solver_forced_onto_kernels_matches_torch_quality(interpreted):
    from rebalancer.solver import rebalance_experts

    loads = solver_loads()
    phy2log, _, logcnt = rebalance_experts(loads, **SOLVER_SHAPE, policy="global", num_candidates=4)
    kernel_phy2log, kernel_logcnt = interpreted["solver"]["phy2log"], interpreted["solver"]["logcnt"]
    assert torch.equal(torch.bincount(kernel_phy2log[0], minlength=16), kernel_logcnt[0])
    assert bool((kernel_logcnt >= 1).all())

    def peak(placement: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        per_copy = (loads.double() / counts).gather(1, placement)
        return per_copy.view(loads.shape[0], SOLVER_SHAPE["num_gpus"], -1).sum(-1).max(-1).values

    assert bool((peak(kernel_phy2log, kernel_logcnt) <= peak(phy2log, logcnt) * (1 + 2 * TARGET_SLACK)).all())


def test_torch_path_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv(kernels.PATH_ENV, raising=False)
    assert kernels.active_path("cpu") == "torch"
    assert not kernels.use_triton(torch.zeros(2))


def test_triton_path_on_cuda_by_default(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv(kernels.PATH_ENV, raising=False)
    assert kernels.active_path("cuda") == "triton"
    assert kernels.active_path(torch.device("cuda", 0)) == "triton"


def test_env_forces_the_torch_path(monkeypatch):
    monkeypatch.setenv(kernels.PATH_ENV, "torch")
    assert kernels.active_path("cuda") == "torch"


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv(kernels.PATH_ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.active_path("cpu") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.active_path("cpu") == "triton"
    assert kernels.use_triton(torch.zeros(2))
    assert not kernels.use_triton(torch.zeros(2, dtype=torch.float64))


def test_packing_dispatches_to_the_kernels_when_triton_is_active(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv(kernels.PATH_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    monkeypatch.setattr(kernels, "greedy_pack", lambda *args: calls.append("greedy") or "greedy")
    monkeypatch.setattr(kernels, "swap_refine", lambda *args: calls.append("refine") or "refine")
    loads = torch.ones(1, 4)
    assert packing.greedy_pack(loads, lpt_order(loads), 2) == "greedy"
    assert packing.swap_refine(loads.view(1, 2, 2), torch.arange(4).view(1, 2, 2), torch.ones(1)) == "refine"
    assert calls == ["greedy", "refine"]


def test_unknown_path_is_rejected(monkeypatch):
    monkeypatch.setenv(kernels.PATH_ENV, "cuda")
    with pytest.raises(ValueError, match=kernels.PATH_ENV):
        kernels.active_path("cpu")


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter accepts code the compiler rejects; build both kernels for sm_90 (ptxas ships with triton)."""
    triton = pytest.importorskip("triton")
    from rebalancer.solver.kernels.greedy import _greedy_pack_kernel
    from rebalancer.solver.kernels.refine import _swap_refine_kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(_greedy_pack_kernel, triton.runtime.JITFunction):
        pytest.skip("kernels were imported under TRITON_INTERPRET")
    target = GPUTarget("cuda", 90, 32)
    greedy = ASTSource(
        _greedy_pack_kernel,
        {
            name: "*fp32" if name == "sorted_loads_ptr" else "*i64"
            for name in ("sorted_loads_ptr", "order_ptr", "slot_items_ptr")
        }
        | {"num_items": "i32", "num_packs": "i32", "capacity": "i32", "BLOCK_G": "constexpr"},
        constexprs={"BLOCK_G": 8},
    )
    signature = {
        "slot_loads_ptr": "*fp32",
        "slot_items_ptr": "*i64",
        "targets_ptr": "*fp32",
        "out_loads_ptr": "*fp32",
        "out_items_ptr": "*i64",
        "num_packs": "i32",
        "capacity": "i32",
        "pair_rounds": "i32",
        "heaviest_rounds": "i32",
        "num_partners": "i32",
        "improve_factor": "fp32",
    }
    sources = [greedy]
    for all_partners in (True, False):
        constexprs = {"BLOCK_G": 8, "BLOCK_K": 4, "NUM_PAIRS": 2, "ALL_PARTNERS": all_partners}
        constexpr_types = dict.fromkeys(constexprs, "constexpr")
        sources.append(ASTSource(_swap_refine_kernel, signature | constexpr_types, constexprs=constexprs))
    for source in sources:
        compiled = triton.compile(source, target=target, options={"num_warps": 1, "enable_fp_fusion": False})
        assert compiled.asm["cubin"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_on_cuda_match_the_cpu_torch_path(monkeypatch):
    monkeypatch.delenv(kernels.PATH_ENV, raising=False)
    assert kernels.active_path("cuda") == "triton"
    for seed, (problems, packs, capacity, kind) in enumerate(GREEDY_CASES.values()):
        item_loads = make_loads(problems * 64, packs, capacity, kind, seed)
        expected = packing.greedy_pack(item_loads, lpt_order(item_loads), packs)
        got = packing.greedy_pack(item_loads.cuda(), lpt_order(item_loads).cuda(), packs)
        assert torch.equal(got.cpu(), expected)
    for seed, name in enumerate(REFINE_CASES):
        problems, packs, capacity, kind = REFINE_CASES[name]
        case = refine_inputs(problems * 64, packs, capacity, kind, seed)
        torch_loads, torch_items = packing.swap_refine(case["slot_loads"], case["slot_items"], case["targets"])
        cuda_case = {key: value.cuda() for key, value in case.items()}
        loads, items = packing.swap_refine(cuda_case["slot_loads"], cuda_case["slot_items"], cuda_case["targets"])
        peak, torch_peak = loads.sum(-1).max(-1).values.cpu(), torch_loads.sum(-1).max(-1).values
        # On the GPU float sums run in another order, so float and tied cases may take other, equally good swaps.
        assert float(peak.mean()) <= float(torch_peak.mean()) * (1 + 1e-3)
        if name in EXACT_REFINE:
            assert torch.equal(peak, torch_peak)
            assert torch.equal(items.cpu(), torch_items)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_solve_with_kernels_is_as_good_as_the_torch_path(monkeypatch):
    from rebalancer.solver import rebalance_experts

    loads = torch.rand(8, 64, generator=torch.Generator().manual_seed(3)).cuda() ** 3
    shape = dict(num_replicas=80, num_groups=4, num_nodes=2, num_gpus=8)
    monkeypatch.setenv(kernels.PATH_ENV, "torch")
    reference = rebalance_experts(loads, **shape)
    monkeypatch.setenv(kernels.PATH_ENV, "triton")
    placed = rebalance_experts(loads, **shape)
    assert bool((placed[2] >= 1).all())

    def peak(phy2log: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
        per_copy = (loads.double() / logcnt).gather(1, phy2log)
        return per_copy.view(loads.shape[0], shape["num_gpus"], -1).sum(-1).max(-1).values

    assert bool((peak(placed[0], placed[2]) <= peak(reference[0], reference[2]) * (1 + 2 * TARGET_SLACK)).all())


if __name__ == "__main__":
    run_kernel_cases(Path(sys.argv[1]))
