"""Drop-in compatibility of `rebalance_experts` with the published DeepSeek function and vLLM 0.33.0's
default policy: every input they accept gives a valid map with every policy (the `deepseek` policy
the same map), and what they reject by assertion is rejected with an error that is both a ValueError
and an AssertionError."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch
from client_helpers import assert_valid_maps
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rebalancer.solver import POLICIES, rebalance_experts
from rebalancer.solver.migration import keep_old_slots
from released_engines import load_vllm

_spec = importlib.util.spec_from_file_location(
    "peers", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
)
published = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(published)


@st.composite
def published_inputs(draw):
    """Small shapes whose group, node and GPU counts do and do not divide each other."""
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(1, 12))
    gpus = draw(st.integers(1, 6))
    replicas = gpus * draw(st.integers(1, 5))
    groups = draw(st.integers(1, 6))
    nodes = draw(st.integers(1, 4))
    values = st.one_of(st.just(0.0), st.floats(0.0, 1000.0, allow_nan=False, width=32))
    loads = np.array(draw(st.lists(values, min_size=layers * experts, max_size=layers * experts)), dtype=np.float32)
    return torch.from_numpy(loads.reshape(layers, experts)), replicas, groups, nodes, gpus


def outcome(function, *args):
    try:
        return function(*args), None
    except (AssertionError, ZeroDivisionError, ValueError, RuntimeError, IndexError) as error:
        return None, error


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(published_inputs())
def test_every_input_the_published_function_accepts_gives_a_valid_map_with_every_policy(case):
    weight, replicas, groups, nodes, gpus = case
    reference, rejected = outcome(published.published_rebalance_experts, weight, replicas, groups, nodes, gpus)
    vllm_map, vllm_rejected = outcome(
        load_vllm().policy.DefaultEplbPolicy.rebalance_experts, weight, replicas, groups, nodes, gpus
    )
    assert (rejected is None) == (vllm_rejected is None)  # the two references agree on what is valid
    event("rejected" if rejected else ("global path" if groups % nodes else "hierarchical path"))
    if rejected is not None:
        with pytest.raises(ValueError) as caught:
            rebalance_experts(weight, replicas, groups, nodes, gpus)
        assert isinstance(caught.value, AssertionError)  # `except AssertionError` callers keep working
        return
    for policy in sorted(POLICIES):
        phy2log, log2phy, logcnt = rebalance_experts(weight, replicas, groups, nodes, gpus, policy=policy)
        assert phy2log.shape == (weight.shape[0], replicas) and phy2log.dtype == torch.int64
        assert_valid_maps(phy2log.numpy(), log2phy.numpy(), logcnt.numpy(), weight.shape[1])
        if policy == "deepseek":
            assert torch.equal(phy2log, reference[0]) and torch.equal(logcnt, reference[2])
    assert vllm_map.shape == (weight.shape[0], replicas)


def test_groups_that_do_not_split_over_nodes_plan_globally_like_the_published_function():
    weight = torch.tensor([[90.0, 5, 5, 40, 1, 1, 30, 2, 2, 60, 3, 3]])  # 12 experts
    for groups, nodes, gpus in ((5, 2, 4), (3, 2, 4), (8, 3, 3)):  # 5 does not divide 12; groups % nodes != 0
        reference = published.published_rebalance_experts(weight, 12, groups, nodes, gpus)
        ours = rebalance_experts(weight, 12, groups, nodes, gpus, policy="deepseek")
        assert torch.equal(ours[0], reference[0]) and torch.equal(ours[2], reference[2])
        rebalance_experts(weight, 12, groups, nodes, gpus)  # and the default policy plans it too
    with pytest.raises(AssertionError, match="num_groups"):  # hierarchical path: 5 groups cannot split 12 experts
        rebalance_experts(weight, 12, 5, 1, 4)


@settings(max_examples=60, deadline=None)
@given(gpus=st.integers(1, 5), slots_per_gpu=st.integers(1, 5), experts=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_old_slots_are_kept_exactly_as_vllms_preserve_intragpu_slots_keeps_them(gpus, slots_per_gpu, experts, seed):
    # vLLM 0.33's default policy keeps old slots the same way (duplicates included): the maps it would
    # install from our placement are the ones we plan transfers for.
    policy = load_vllm().policy.DefaultEplbPolicy
    g = torch.Generator().manual_seed(seed)
    prev, new = (torch.randint(experts, (3, gpus * slots_per_gpu), generator=g) for _ in range(2))
    theirs = policy.preserve_intragpu_slots(new.numpy(), gpus, prev.numpy())
    assert np.array_equal(keep_old_slots(prev, new, gpus).numpy(), theirs)
