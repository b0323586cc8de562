"""Solver API invariants: valid maps for every policy on random shapes, the
published README example, edge cases, dtypes, determinism, batch independence, CPU/CUDA, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from placement_checks import assert_groups_on_one_node, assert_valid_maps
from rebalancer.solver import POLICIES, deepseek, rebalance_experts, solve
from rebalancer_testkit.workloads import KINDS, README_PHY2LOG, README_WEIGHT, make, max_gpu_load

ALL_POLICIES = ("auto", "deepseek", "global", "hierarchical")
SOLVER_POLICIES = ("auto", "global", "hierarchical")


# --- random shapes ---------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def problems(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, int, int]:
    num_layers = draw(st.integers(1, 4))
    num_experts = draw(st.sampled_from([1, 2, 3, 4, 8, 12, 16, 32]))
    num_gpus = draw(st.sampled_from([1, 2, 4, 8]))
    extra = draw(st.integers(0, 2))
    num_replicas = math.ceil(num_experts / num_gpus) * num_gpus + extra * num_gpus
    num_groups = draw(st.sampled_from(_divisors(num_experts)))
    num_nodes = draw(st.sampled_from(_divisors(num_gpus)))
    source = draw(st.sampled_from(KINDS + ("integers",)))
    if source == "integers":
        # Small integers: ties, zeros and whole zero layers.
        values = draw(
            st.lists(st.integers(0, 50), min_size=num_layers * num_experts, max_size=num_layers * num_experts)
        )
        weight = torch.tensor(values, dtype=torch.float32).view(num_layers, num_experts)
    else:
        weight = make(source, num_layers, num_experts, seed=draw(st.integers(0, 2**16)))
    # Loads at any float64 magnitude: planning is scale-free, and float32 cannot hold the extremes.
    magnitude = draw(st.sampled_from([1.0, 1.0, 1.0, 2.0**-1000, 1e300]))
    if magnitude != 1.0:
        weight = weight.double() * magnitude
    return weight, num_replicas, num_groups, num_nodes, num_gpus


@pytest.mark.parametrize("policy", ALL_POLICIES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_every_policy_returns_valid_maps_on_random_shapes(policy: str, problem: tuple) -> None:
    weight, num_replicas, num_groups, num_nodes, num_gpus = problem
    result = solve(weight, num_replicas, num_groups, num_nodes, num_gpus, policy=policy)
    num_layers, num_experts = weight.shape
    assert_valid_maps(*result.triple(), num_layers, num_experts, num_replicas, num_gpus, device=weight.device)
    assert len(result.policy_per_layer) == num_layers
    assert result.balancedness.shape == (num_layers,)
    assert bool(((result.balancedness > 0) & (result.balancedness <= 1 + 1e-9)).all())
    assert torch.equal(result.moved_copies.cpu(), torch.zeros(num_layers, dtype=torch.int64))
    assert result.balancedness_before is None
    # Hierarchical plans keep each group on one node (the reason to choose them).
    if num_groups % num_nodes == 0:
        local = [
            i for i, name in enumerate(result.policy_per_layer) if name.split("/")[0] in ("hierarchical", "deepseek")
        ]
        assert_groups_on_one_node(result.phy2log, num_experts, num_groups, num_nodes, local)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_rebalance_experts_is_the_triple_of_solve(problem: tuple) -> None:
    weight, num_replicas, num_groups, num_nodes, num_gpus = problem
    triple = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, seed=3)
    result = solve(weight, num_replicas, num_groups, num_nodes, num_gpus, seed=3)
    for got, want in zip(triple, result.triple(), strict=True):
        assert torch.equal(got, want)


def test_policy_names_are_the_published_four() -> None:
    assert set(POLICIES) == set(ALL_POLICIES)


# --- the published README example -----------------------------------------------------------------------


def test_deepseek_policy_reproduces_the_published_readme_example() -> None:
    weight = torch.tensor(README_WEIGHT)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8, policy="deepseek")
    assert phy2log.tolist() == README_PHY2LOG
    expected_logcnt = torch.stack([torch.bincount(torch.tensor(row), minlength=12) for row in README_PHY2LOG])
    assert torch.equal(logcnt, expected_logcnt)
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert_valid_maps(phy2log, log2phy, logcnt, 2, 12, 16, 8)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float64])
def test_readme_example_is_dtype_independent(dtype: torch.dtype) -> None:
    weight = torch.tensor(README_WEIGHT, dtype=dtype)
    assert rebalance_experts(weight, 16, 4, 2, 8, policy="deepseek")[0].tolist() == README_PHY2LOG


def test_deepseek_policy_is_the_published_entry_point() -> None:
    # hierarchical when groups divide over nodes, else the published global call (1 group, 1 node).
    weight = make("lognormal", 3, 16, seed=4)
    hier = deepseek.rebalance_hierarchical(weight, 24, 4, 2, 8)[0]
    assert torch.equal(rebalance_experts(weight, 24, 4, 2, 8, policy="deepseek")[0], hier)
    flat = deepseek.rebalance_hierarchical(weight, 24, 1, 1, 8)[0]
    assert torch.equal(rebalance_experts(weight, 24, 4, 8, 8, policy="deepseek")[0], flat)


@pytest.mark.parametrize("policy", SOLVER_POLICIES)
def test_solver_policies_beat_deepseek_on_the_readme_example(policy: str) -> None:
    weight = torch.tensor(README_WEIGHT, dtype=torch.float32)
    ours = max_gpu_load(weight, rebalance_experts(weight, 16, 4, 2, 8, policy=policy)[0], 8)
    ref = max_gpu_load(weight, rebalance_experts(weight, 16, 4, 2, 8, policy="deepseek")[0], 8)
    assert bool((ours <= ref + 1e-9).all()), f"{policy}: {ours.tolist()} vs deepseek {ref.tolist()}"


# --- edge cases -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_single_gpu(policy: str) -> None:
    weight = make("zipf", 2, 8, seed=1)
    result = solve(weight, 12, 2, 1, 1, policy=policy)
    assert_valid_maps(*result.triple(), 2, 8, 12, 1)
    assert torch.allclose(result.balancedness, torch.ones(2, dtype=result.balancedness.dtype))


# (layers, experts, groups, weight): 16 replicas on 8 GPUs. R = E gives one copy each; with R = 2E any
# expert with a single copy would sit with a second slot on its GPU, above the mean.
EQUAL_WEIGHTS = {"replicas_equal_experts": (3, 16, 4, 7.0), "two_slots_per_expert": (2, 8, 2, 5.0)}


@pytest.mark.parametrize("case", EQUAL_WEIGHTS)
@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_equal_weights_get_equal_copy_counts_and_perfect_balance(policy: str, case: str) -> None:
    layers, experts, groups, value = EQUAL_WEIGHTS[case]
    result = solve(torch.full((layers, experts), value), 16, groups, 2, 8, policy=policy)
    assert_valid_maps(*result.triple(), layers, experts, 16, 8)
    assert bool((result.logcnt == 16 // experts).all()), result.logcnt.tolist()
    assert torch.allclose(result.balancedness, torch.ones(layers, dtype=result.balancedness.dtype))


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_one_extreme_expert_gets_all_extra_copies_with_one_slot_per_gpu(policy: str) -> None:
    weight = torch.tensor([[1.0, 1.0, 1000.0, 1.0], [0.0, 500.0, 0.0, 0.0]])
    result = solve(weight, 8, 1, 1, 8, policy=policy)
    assert_valid_maps(*result.triple(), 2, 4, 8, 8)
    assert result.logcnt.tolist() == [[1, 1, 5, 1], [1, 5, 1, 1]]


@pytest.mark.parametrize("policy", SOLVER_POLICIES)
def test_one_extreme_expert_gets_one_copy_per_gpu(policy: str) -> None:
    # 8 GPUs x 2 slots: the hot expert takes a copy on every GPU (125 each, plus one light copy); a
    # ninth copy would put two of its copies on one GPU (222), so the optimum stops at eight.
    weight = torch.tensor([[1000.0] + [1.0] * 7])
    result = solve(weight, 16, 1, 1, 8, policy=policy)
    assert_valid_maps(*result.triple(), 1, 8, 16, 8)
    assert int(result.logcnt[0, 0]) == 8
    gpus = (result.log2phy[0, 0, :8] // 2).sort().values
    assert gpus.tolist() == list(range(8)), "the hot expert's copies share a GPU"
    assert float(max_gpu_load(weight, result.phy2log, 8)[0]) <= 126.0 + 1e-9


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_global_fallback_when_groups_do_not_divide_over_nodes(policy: str) -> None:
    weight = make("lognormal", 3, 12, seed=2)
    result = solve(weight, 16, 3, 2, 4, policy=policy)  # 3 groups on 2 nodes
    assert_valid_maps(*result.triple(), 3, 12, 16, 4)
    if policy == "deepseek":
        assert torch.equal(result.phy2log, deepseek.rebalance_hierarchical(weight, 16, 1, 1, 4)[0])
    else:
        assert all(name == "global" for name in result.policy_per_layer), result.policy_per_layer
        flat = solve(weight, 16, 3, 2, 4, policy="global")
        assert torch.equal(result.phy2log, flat.phy2log)


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_all_zero_layers_get_a_valid_placement(policy: str) -> None:
    weight = torch.zeros(3, 16)
    weight[1] = make("zipf", 1, 16, seed=5)[0]  # a real layer between two empty ones
    result = solve(weight, 24, 4, 2, 8, policy=policy)
    assert_valid_maps(*result.triple(), 3, 16, 24, 8)
    assert float(result.balancedness[0]) == 1.0 and float(result.balancedness[2]) == 1.0
    only_zero = solve(torch.zeros(2, 16), 24, 4, 2, 8, policy=policy)
    assert_valid_maps(*only_zero.triple(), 2, 16, 24, 8)


@pytest.mark.parametrize("policy", ALL_POLICIES)
@pytest.mark.parametrize("num_gpus", [1, 2, 8])
def test_one_expert_fills_every_slot(policy: str, num_gpus: int) -> None:
    # Two slots per GPU with one expert once crashed the process: the exact pair search's compiled loop
    # read past its arrays on a one-column table.
    weight = torch.tensor([[0.0], [5.0], [1e-3]])
    for slots_per_gpu in (1, 2, 3):
        result = solve(weight, slots_per_gpu * num_gpus, 1, 1, num_gpus, policy=policy)
        assert_valid_maps(*result.triple(), 3, 1, slots_per_gpu * num_gpus, num_gpus)
        assert bool((result.balancedness == 1.0).all())


@pytest.mark.parametrize("policy", ALL_POLICIES)
@pytest.mark.parametrize("scale", [2.0**200, 2.0**-200, 2.0**1023, 2.0**-1040, 1e300, 1e-300])
def test_loads_at_any_float64_magnitude_plan_and_score_as_the_same_loads_in_range(policy: str, scale: float) -> None:
    # float32 turns the extremes into inf (the published algorithm then returned invalid maps) or zeros;
    # float64 sums of loads near its top overflow (NaN figures), and a clamp at 1e-300 skewed tiny ones.
    weight = make("zipf", 3, 16, seed=9).double()
    weight = weight / weight.amax()
    want = solve(weight, 24, 4, 2, 8, policy=policy)
    got = solve(weight * scale, 24, 4, 2, 8, policy=policy)
    assert_valid_maps(*got.triple(), 3, 16, 24, 8)
    if scale in (2.0**200, 2.0**-200, 2.0**1023):  # exact scaling: the very same placement
        assert torch.equal(got.phy2log, want.phy2log)
    assert torch.allclose(got.balancedness, want.balancedness, rtol=1e-6)
    assert torch.allclose(got.stats["off_node_share"], want.stats["off_node_share"], rtol=1e-6)


@pytest.mark.parametrize("policy", ALL_POLICIES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float64])
def test_integer_and_other_float_inputs(policy: str, dtype: torch.dtype) -> None:
    # Integers up to 256 are exact in every dtype here, so every dtype must give the float32 answer.
    weight = (make("zipf", 2, 16, seed=6) / 1000).round().clamp_max(256)
    want = rebalance_experts(weight.float(), 24, 4, 2, 8, policy=policy, seed=1)
    got = rebalance_experts(weight.to(dtype), 24, 4, 2, 8, policy=policy, seed=1)
    assert_valid_maps(*got, 2, 16, 24, 8)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_nested_list_input_is_accepted() -> None:
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8, policy="deepseek")
    assert phy2log.tolist() == README_PHY2LOG


# --- determinism and batch independence ------------------------------------------------------------------


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_same_seed_same_maps(policy: str) -> None:
    weight = make("hot", 4, 32, seed=7)
    first = rebalance_experts(weight, 40, 4, 2, 8, policy=policy, seed=11)
    second = rebalance_experts(weight.clone(), 40, 4, 2, 8, policy=policy, seed=11)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("policy", SOLVER_POLICIES)
def test_different_seeds_give_valid_maps_and_seed_is_used(policy: str) -> None:
    weight = make("lognormal", 4, 32, seed=8)
    plans = [rebalance_experts(weight, 40, 4, 2, 8, policy=policy, seed=s, num_candidates=8) for s in range(4)]
    for plan in plans:
        assert_valid_maps(*plan, 4, 32, 40, 8)
    # With one candidate (candidate 0 is unperturbed) the seed cannot matter.
    single = [rebalance_experts(weight, 40, 4, 2, 8, policy=policy, seed=s, num_candidates=1)[0] for s in range(3)]
    assert all(torch.equal(single[0], other) for other in single[1:])


def test_default_layer_seeds_are_seed_plus_layer_index() -> None:
    weight = make("zipf", 3, 16, seed=9)
    batch = solve(weight, 24, 4, 2, 8, seed=5, num_candidates=8)
    explicit = solve(weight, 24, 4, 2, 8, layer_seeds=torch.tensor([5, 6, 7]), num_candidates=8)
    assert torch.equal(batch.phy2log, explicit.phy2log)
    for layer in range(3):
        alone = solve(weight[layer : layer + 1], 24, 4, 2, 8, seed=5 + layer, num_candidates=8)
        assert torch.equal(alone.phy2log[0], batch.phy2log[layer])


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_layers_solved_in_a_batch_match_each_request_solved_alone(policy: str) -> None:
    a = make("hot", 3, 32, seed=10)
    b = make("zipf", 2, 32, seed=11)
    seed_a, seed_b = 17, 1000
    alone_a = rebalance_experts(a, 40, 8, 2, 8, policy=policy, seed=seed_a)
    alone_b = rebalance_experts(b, 40, 8, 2, 8, policy=policy, seed=seed_b)
    seeds = torch.cat([seed_a + torch.arange(3), seed_b + torch.arange(2)])
    both = rebalance_experts(torch.cat([a, b]), 40, 8, 2, 8, policy=policy, layer_seeds=seeds)
    assert torch.equal(both[0], torch.cat([alone_a[0], alone_b[0]]))
    assert torch.equal(both[2], torch.cat([alone_a[2], alone_b[2]]))
    assert_valid_maps(*both, 5, 32, 40, 8)


# --- CPU / CUDA -----------------------------------------------------------------------------------------


def test_cpu_input_gives_cpu_outputs() -> None:
    result = solve(make("zipf", 2, 16, seed=12), 24, 4, 2, 8)
    assert result.device == "cpu"
    for t in (*result.triple(), result.balancedness, result.moved_copies):
        assert t.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_cuda_input_gives_cuda_outputs_and_valid_maps(policy: str) -> None:
    weight = make("hot", 4, 32, seed=13)
    cuda = weight.cuda()
    result = solve(cuda, 40, 4, 2, 8, policy=policy)
    assert_valid_maps(*result.triple(), 4, 32, 40, 8, device="cuda")
    assert result.device.startswith("cuda")
    prev = result.phy2log
    moved = solve(make("hot", 4, 32, seed=14).cuda(), 40, 4, 2, 8, policy=policy, prev_phy2log=prev)
    assert_valid_maps(*moved.triple(), 4, 32, 40, 8, device="cuda")
    # The CPU and CUDA solvers draw the same candidates; their plans must be as balanced (float32 sums
    # may break ties differently, so compare quality, not maps).
    on_cpu = solve(weight, 40, 4, 2, 8, policy=policy)
    assert float(result.balancedness.mean()) >= float(on_cpu.balancedness.mean()) - 0.01
    if policy == "deepseek":
        assert torch.equal(result.phy2log.cpu(), on_cpu.phy2log)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_argument_moves_a_cpu_input_to_cuda() -> None:
    result = solve(make("zipf", 2, 16, seed=15), 24, 4, 2, 8, device="cuda")
    assert result.phy2log.device.type == "cuda"
    assert_valid_maps(*result.triple(), 2, 16, 24, 8, device="cuda")


# --- bad input ------------------------------------------------------------------------------------------

GOOD = {"weight": torch.rand(2, 8) * 100, "num_replicas": 16, "num_groups": 4, "num_nodes": 2, "num_gpus": 8}
VALID_PREV = torch.arange(16).remainder(8).repeat(2, 1)

BAD_INPUTS = [
    ("weight-1d", {"weight": torch.rand(8)}, "weight"),
    ("weight-3d", {"weight": torch.rand(1, 2, 8)}, "weight"),
    ("weight-empty", {"weight": torch.rand(0, 8)}, "weight"),
    ("weight-nan", {"weight": torch.tensor([[1.0, float("nan")] + [1.0] * 6] * 2)}, "weight"),
    ("weight-inf", {"weight": torch.tensor([[1.0, float("inf")] + [1.0] * 6] * 2)}, "weight"),
    ("weight-neg-inf", {"weight": torch.tensor([[1.0, float("-inf")] + [1.0] * 6] * 2)}, "weight"),
    ("weight-negative", {"weight": torch.tensor([[1.0, -0.5] + [1.0] * 6] * 2)}, "weight"),
    ("weight-negative-int", {"weight": torch.tensor([[1, -1] + [1] * 6] * 2)}, "weight"),
    ("weight-bool", {"weight": torch.ones(2, 8, dtype=torch.bool)}, "weight"),
    # Loads NumPy cannot view (bfloat16, autograd) take the torch check instead of the NumPy one.
    (
        "weight-nan-bf16",
        {"weight": torch.tensor([[1.0, float("nan")] + [1.0] * 6] * 2, dtype=torch.bfloat16)},
        "weight",
    ),
    ("weight-negative-grad", {"weight": torch.tensor([[1.0, -0.5] + [1.0] * 6] * 2, requires_grad=True)}, "weight"),
    ("weight-complex", {"weight": torch.ones(2, 8, dtype=torch.complex64)}, "weight"),
    ("weight-string", {"weight": "not a tensor"}, "weight"),
    ("replicas-below-experts", {"num_replicas": 4, "num_gpus": 4, "num_nodes": 2}, "num_replicas"),
    ("replicas-not-multiple-of-gpus", {"num_replicas": 12}, "num_replicas"),
    ("replicas-zero", {"num_replicas": 0}, "num_replicas"),
    ("replicas-float", {"num_replicas": 16.0}, "num_replicas"),
    # Group and node rules bind on the published function's hierarchical path only (groups % nodes == 0).
    ("groups-not-dividing-experts", {"num_groups": 3, "num_nodes": 1}, "num_groups"),
    ("groups-zero", {"num_groups": 0}, "num_groups"),
    ("nodes-not-dividing-gpus", {"num_nodes": 4, "num_gpus": 2}, "num_nodes"),
    ("nodes-zero", {"num_nodes": 0}, "num_nodes"),
    ("gpus-zero", {"num_gpus": 0}, "num_gpus"),
    ("gpus-negative", {"num_gpus": -8}, "num_gpus"),
    ("gpus-bool", {"num_gpus": True}, "num_gpus"),
    ("policy-unknown", {"policy": "greedy"}, "policy"),
    ("policy-case", {"policy": "Auto"}, "policy"),
    ("candidates-zero", {"num_candidates": 0}, "num_candidates"),
    ("candidates-float", {"num_candidates": 2.5}, "num_candidates"),
    ("seed-string", {"seed": "1"}, "seed"),
    ("seed-float", {"seed": 1.5}, "seed"),
    ("layer-seeds-shape", {"layer_seeds": torch.arange(3)}, "layer_seeds"),
    ("balance-tolerance-negative", {"balance_tolerance": -0.1}, "balance_tolerance"),
    ("balance-tolerance-one", {"balance_tolerance": 1.0}, "balance_tolerance"),
    ("balance-tolerance-nan", {"balance_tolerance": float("nan")}, "balance_tolerance"),
    ("locality-tolerance-negative", {"locality_tolerance": -0.01}, "locality_tolerance"),
    ("locality-tolerance-large", {"locality_tolerance": 2.0}, "locality_tolerance"),
    ("locality-tolerance-nan", {"locality_tolerance": float("nan")}, "locality_tolerance"),
    ("max-moves-negative", {"max_moves_per_layer": -1}, "max_moves_per_layer"),
    ("max-moves-float", {"max_moves_per_layer": 2.0}, "max_moves_per_layer"),
    ("prev-wrong-layers", {"prev_phy2log": VALID_PREV[:1]}, "prev_phy2log"),
    ("prev-wrong-slots", {"prev_phy2log": VALID_PREV[:, :8]}, "prev_phy2log"),
    ("prev-1d", {"prev_phy2log": VALID_PREV[0]}, "prev_phy2log"),
    ("prev-expert-too-large", {"prev_phy2log": torch.where(VALID_PREV == 7, 8, VALID_PREV)}, "prev_phy2log"),
    ("prev-negative", {"prev_phy2log": torch.where(VALID_PREV == 7, -1, VALID_PREV)}, "prev_phy2log"),
    ("prev-missing-expert", {"prev_phy2log": torch.where(VALID_PREV == 7, 6, VALID_PREV)}, "prev_phy2log"),
    ("history-2d", {"history": torch.rand(2, 8)}, "history"),
    ("history-4d", {"history": torch.rand(3, 2, 8, 1)}, "history"),
    ("history-wrong-layers", {"history": torch.rand(3, 1, 8)}, "history"),
    ("history-wrong-experts", {"history": torch.rand(3, 2, 7)}, "history"),
    ("history-nan", {"history": torch.full((3, 2, 8), float("nan"))}, "history"),
    ("history-negative", {"history": -torch.ones(3, 2, 8)}, "history"),
]


@pytest.mark.parametrize("entry", [solve, rebalance_experts], ids=["solve", "rebalance_experts"])
@pytest.mark.parametrize(("changes", "argument"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_the_argument(entry, changes: dict, argument: str) -> None:
    args = {**GOOD, **changes}
    positional = [args.pop(k) for k in ("weight", "num_replicas", "num_groups", "num_nodes", "num_gpus")]
    with pytest.raises(ValueError, match=argument):
        entry(*positional, **args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_loads_of_any_real_dtype_or_tracking_gradients_plan_as_float64(dtype: torch.dtype) -> None:
    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4], [20, 107, 104, 64, 19, 197, 187, 157]], dtype=dtype)
    expected = solve(weight.to(torch.float64), 16, 4, 2, 8).phy2log
    assert torch.equal(solve(weight, 16, 4, 2, 8).phy2log, expected)
    if dtype.is_floating_point:
        assert torch.equal(solve(weight.clone().requires_grad_(), 16, 4, 2, 8).phy2log, expected)


def test_the_good_input_of_the_bad_input_table_is_accepted() -> None:
    args = dict(GOOD)
    positional = [args.pop(k) for k in ("weight", "num_replicas", "num_groups", "num_nodes", "num_gpus")]
    result = solve(*positional, prev_phy2log=VALID_PREV, history=torch.rand(3, 2, 8), max_moves_per_layer=0)
    assert torch.equal(result.phy2log, VALID_PREV)


# --- the exact and the joint-search paths -----------------------------------------------------------------

# (experts, replicas, groups, nodes, gpus): two slots per GPU solved exactly (few count vectors, the README
# shape), two slots per GPU too many to enumerate (joint search with exact pairing), three and four slots
# per GPU (joint search with refinement, three-GPU repartition; every count vector a candidate when few).
SEARCH_PATHS = {
    "exact_e8_g8": (8, 16, 1, 1, 8),
    "exact_readme": (12, 16, 4, 2, 8),
    "pairs_e32_g32": (32, 64, 4, 2, 32),
    "three_slots": (12, 18, 1, 1, 6),
    "three_slots_count_table": (8, 12, 1, 1, 4),
    "four_slots": (24, 32, 4, 2, 8),
}


@pytest.mark.parametrize("path", SEARCH_PATHS)
@pytest.mark.parametrize("policy", SOLVER_POLICIES)
def test_search_paths_are_valid_deterministic_and_batch_independent(path: str, policy: str) -> None:
    num_experts, num_replicas, num_groups, num_nodes, num_gpus = SEARCH_PATHS[path]
    a = make("hot", 3, num_experts, seed=21)
    b = make("zipf", 2, num_experts, seed=22)
    shape = (num_replicas, num_groups, num_nodes, num_gpus)
    alone_a = rebalance_experts(a, *shape, policy=policy, seed=3)
    alone_b = rebalance_experts(b, *shape, policy=policy, seed=40)
    seeds = torch.cat([3 + torch.arange(3), 40 + torch.arange(2)])
    both = rebalance_experts(torch.cat([a, b]), *shape, policy=policy, layer_seeds=seeds)
    again = rebalance_experts(torch.cat([a, b]), *shape, policy=policy, layer_seeds=seeds)
    assert torch.equal(both[0], torch.cat([alone_a[0], alone_b[0]]))
    assert torch.equal(both[0], again[0])
    assert_valid_maps(*both, 5, num_experts, num_replicas, num_gpus)


def _brute_force_two_slot_optimum(loads: list[float], num_replicas: int) -> float:
    """Every count vector, each packed heaviest-with-lightest (optimal for two slots per GPU)."""
    best = math.inf
    num_experts, num_gpus = len(loads), num_replicas // 2

    def counts(prefix: list[int], left: int):
        if len(prefix) == num_experts - 1:
            yield [*prefix, left]
            return
        for c in range(1, left - (num_experts - len(prefix) - 1) + 1):
            yield from counts([*prefix, c], left - c)

    for vector in counts([], num_replicas):
        copies = sorted((w / c for w, c in zip(loads, vector, strict=True) for _ in range(c)), reverse=True)
        best = min(best, max(copies[g] + copies[-1 - g] for g in range(num_gpus)))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_two_slots_per_gpu_on_few_experts_reach_the_optimum(seed: int) -> None:
    weight = make("lognormal", 1, 6, seed=seed)
    phy2log = rebalance_experts(weight, 12, 1, 1, 6, policy="global")[0]
    optimum = _brute_force_two_slot_optimum(weight[0].double().tolist(), 12)
    assert float(max_gpu_load(weight, phy2log, 6)[0]) == pytest.approx(optimum, rel=1e-9)


def test_two_slots_per_gpu_on_eight_experts_reach_the_optimum_from_the_pruned_table() -> None:
    # 8 experts on 16 slots: 6435 count vectors, of which the CPU scores only those whose bound reaches
    # a greedy score; in the all-zero layer every vector ties, and ties of equal loads go by table index.
    layers = [make(kind, 1, 8, seed=5) for kind in ("zipf", "lognormal", "hot")]
    weight = torch.cat([*layers, torch.zeros(1, 8)])
    phy2log = rebalance_experts(weight, 16, 1, 1, 8, policy="global")[0]
    alone = torch.cat([rebalance_experts(weight[i : i + 1], 16, 1, 1, 8, policy="global")[0] for i in range(4)])
    assert torch.equal(phy2log, alone)
    peaks = max_gpu_load(weight, phy2log, 8)
    for layer in range(3):
        optimum = _brute_force_two_slot_optimum(weight[layer].double().tolist(), 16)
        assert float(peaks[layer]) == pytest.approx(optimum, rel=1e-9)
    assert float(peaks[3]) == 0.0


@pytest.mark.parametrize("kind", ["zipf", "lognormal", "hot", "uniformish"])
def test_two_slots_per_gpu_on_the_readme_shape_reach_the_optimum(kind: str) -> None:
    # 12 experts on 16 slots (1365 count vectors), two equal experts in one layer.
    weight = make(kind, 2, 12, seed=8)
    weight[1, 3] = weight[1, 7]
    phy2log = rebalance_experts(weight, 16, 1, 1, 8, policy="global")[0]
    peaks = max_gpu_load(weight, phy2log, 8)
    for layer in range(2):
        optimum = _brute_force_two_slot_optimum(weight[layer].double().tolist(), 16)
        assert float(peaks[layer]) == pytest.approx(optimum, rel=1e-9)


@pytest.mark.parametrize("path", SEARCH_PATHS)
def test_search_paths_keep_the_placement_in_force_when_it_is_as_good(path: str) -> None:
    num_experts, num_replicas, num_groups, num_nodes, num_gpus = SEARCH_PATHS[path]
    weight = make("zipf", 3, num_experts, seed=23)
    shape = (num_replicas, num_groups, num_nodes, num_gpus)
    fresh = solve(weight, *shape)
    kept = solve(weight, *shape, prev_phy2log=fresh.phy2log)
    assert torch.equal(kept.moved_copies, torch.zeros(3, dtype=torch.int64))
    assert_valid_maps(*kept.triple(), 3, num_experts, num_replicas, num_gpus)


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_rebalance_experts_returns_the_maps_solve_describes(policy: str) -> None:
    # A fresh plan skips solve's figures; the maps are the same, log2phy ordering included.
    weight = make("zipf", 3, 12, seed=31)
    shape = (16, 4, 2, 8)
    expected = solve(weight, *shape, policy=policy, seed=2).triple()
    for options in ({}, {"prev_phy2log": None, "num_candidates": None}):
        got = rebalance_experts(weight, *shape, policy=policy, seed=2, **options)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    with pytest.raises(TypeError):
        rebalance_experts(weight, *shape, policy=policy, not_an_option=1)
