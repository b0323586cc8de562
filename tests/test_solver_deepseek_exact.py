"""The `deepseek` policy is the published DeepSeek EPLB algorithm bit for bit, not just on the README
example: it is compared with the published algorithm as benchmarks/peers.py runs it (SGLang's
released `deepseek.py` from its wheel, packing with the published loop whose pack sums are float32 0-d
tensors), on random near-tie loads."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from rebalancer.solver import rebalance_experts

PUBLISHED = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"


def _published():
    spec = importlib.util.spec_from_file_location("peers", PUBLISHED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "shape",
    [(3, 12, 16, 4, 2, 8), (4, 64, 72, 8, 4, 8), (3, 48, 64, 1, 4, 16), (2, 32, 48, 4, 2, 8), (2, 24, 32, 3, 2, 4)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_deepseek_policy_equals_published_code(shape, seed):
    layers, experts, replicas, groups, nodes, gpus = shape
    generator = torch.Generator().manual_seed(seed)
    # Lognormal loads rounded to a coarse grid: many near-ties, where float rounding decides the order.
    weight = (torch.exp(torch.randn(layers, experts, generator=generator)) * 50).round() / 7
    expected = _published().published_rebalance_experts(weight, replicas, groups, nodes, gpus)
    got = rebalance_experts(weight, replicas, groups, nodes, gpus, policy="deepseek")
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
