"""The benchmarks still run and return what RESULTS.md is built from, on tiny shapes, in a few seconds each.

`make bench` takes minutes on the full shapes, so a broken benchmark would otherwise be found only when
someone wants the figures. These tests run each bench on the README-sized shape and check the keys the
report reads, plus the pieces whose correctness the figures rest on: the vectorised lower bound, the
published algorithm (the released module with the published packing loop), the released engine planners
imported from their wheels, and the fixed optimality instance set.
"""

from __future__ import annotations

import subprocess

import migration_bench
import optimality_bench
import peers
import pytest
import report
import solver_bench
import torch
from rebalancer_testkit import wheels, workloads
from rebalancer_testkit.workloads import README_PHY2LOG, README_WEIGHT

# A bound against hangs, not a performance figure: a fresh clone compiles the Numba kernels on first use.
BENCH_TIMEOUT = pytest.mark.timeout(180)


@pytest.mark.parametrize("python_floats", [False, True])
def test_published_algorithm_reproduces_readme_example(python_floats: bool) -> None:
    phy2log, log2phy, logcnt = peers.published_rebalance_experts(
        torch.tensor(README_WEIGHT), 16, 4, 2, 8, python_floats=python_floats
    )
    assert phy2log.tolist() == README_PHY2LOG
    assert logcnt.sum(1).tolist() == [16, 16]
    assert log2phy.shape[:2] == (2, 12)


def test_lower_bound_matches_greedy_replication_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.rand(6, 10, generator=gen, dtype=torch.float64) * 100
    weight[0] = 0.0
    num_replicas = 17
    counts = torch.ones_like(weight)
    rows = torch.arange(weight.shape[0])
    for _ in range(num_replicas - weight.shape[1]):
        counts[rows, (weight / counts).argmax(1)] += 1
    expected = torch.maximum((weight / counts).max(1).values, weight.sum(1) / num_replicas)
    assert torch.allclose(workloads.lower_bound(weight, num_replicas, num_replicas), expected)


def test_workloads_shapes_and_kinds() -> None:
    for kind in workloads.KINDS:
        loads = workloads.make(kind, 3, 12, seed=1)
        assert loads.shape == (3, 12) and bool((loads > 0).all())
        assert torch.equal(loads, workloads.make(kind, 3, 12, seed=1))
    series = workloads.drift_series(2, 12, 4, seed=1)
    assert series.shape == (4, 2, 12)
    assert series.sum((1, 2)).tolist() == [2 * 200_000.0] * 4


@BENCH_TIMEOUT
def test_solver_bench_scores_every_planner_on_tiny_shape() -> None:
    planners = {label: solver_bench.PROJECT[label] for label in ("deepseek", "deepseek_global", "auto")}
    cases = [solver_bench.bench_case(workloads.SHAPES["tiny"], kind, 1, planners) for kind in ("zipf", "hot")]
    for case in cases:
        assert set(case["policies"]) == {"deepseek", "deepseek_global", "auto"}
        for figures in case["policies"].values():
            assert {"time_min_s", "time_ratio", "balancedness", "max_over_lb"} <= set(figures)
            assert figures["max_over_lb"] >= 1.0 - 1e-9
        assert case["auto_minus_best_reference"] >= -1e-9
    summary = solver_bench.summarise(cases)
    assert summary["auto"]["mean_balancedness"] >= summary["deepseek"]["mean_balancedness"]


@BENCH_TIMEOUT
def test_speed_figure_keys_on_tiny_shape() -> None:
    speed = solver_bench.speed_figure("tiny", runs=1)
    assert {"ratio_vs_deepseek_median", "ratio_vs_published_median", "ratio_vs_published_lists_median"} <= set(speed)
    assert speed["published_equals_deepseek_policy"]


def test_released_planners_import_from_the_wheels_and_match_the_published_algorithm() -> None:
    try:
        for name, version in wheels.ENGINES.items():
            wheels.fetch_wheel(name, version)
    except (subprocess.TimeoutExpired, FileNotFoundError) as error:
        pytest.skip(f"engine wheels not cached and the registry unreachable: {error}")
    planners = peers.load_released_planners()
    weight = torch.tensor(README_WEIGHT, dtype=torch.float32)
    assert len(planners) == 3
    for label, plan in planners.items():
        phy2log = plan(weight, 16, 4, 2, 8)
        assert phy2log.dtype == torch.int64 and phy2log.shape == (2, 16), label
        assert torch.equal(torch.bincount(phy2log[0], minlength=12) > 0, torch.ones(12, dtype=torch.bool)), label
    # vLLM's default policy and SGLang's `deepseek` are the published algorithm: the README example, exactly.
    for label in list(planners)[:2]:
        assert planners[label](weight, 16, 4, 2, 8).tolist() == README_PHY2LOG, label


@BENCH_TIMEOUT
def test_migration_bench_runs_on_tiny_shape() -> None:
    tiny = workloads.SHAPES["tiny"]
    spread = migration_bench.run_series(tiny, 4, 1, variants=migration_bench.SPREAD_VARIANTS, trades=False)
    result = migration_bench.summarise([migration_bench.run_series(tiny, 4, 1)], [spread])
    assert {"runs", "totals", "history_effect", "bar", "trades", "seed_spread"} <= set(result)
    assert result["trades"]["windows"] == 2 and len(result["seed_spread"]["per_seed"]) == len(
        migration_bench.SPREAD_SEEDS
    )
    labels = {variant.label for variant in migration_bench.VARIANTS}
    assert set(result["totals"]) == labels
    for totals in result["totals"].values():
        expected = {"total_moves", "moves_ratio_vs_deepseek_global", "balancedness_delta_vs_deepseek_global"}
        assert expected | {"transfer_ratio_vs_deepseek_global", "intra_node_share"} <= set(totals)
    text = migration_bench.markdown(result)
    assert "Does history help?" in text and "Trading arrivals" in text and "Solver seeds" in text


def test_optimality_instances_are_small_hard_and_fixed() -> None:
    instances = optimality_bench.instances()
    keys = [optimality_bench.instance_key(inst) for inst in instances]
    assert len(instances) >= 60 and len(set(keys)) == len(instances)
    for inst in instances[len(optimality_bench.KNOWN) :]:
        slots, experts = inst["num_replicas"] // inst["num_gpus"], len(inst["loads"])
        assert 8 <= experts <= 16 and 2 <= slots <= 4 and inst["num_replicas"] > experts, inst["name"]
    assert [optimality_bench.instance_key(inst) for inst in optimality_bench.instances()] == keys


def test_report_renders_with_a_failed_section() -> None:
    planners = {label: solver_bench.PROJECT[label] for label in ("deepseek", "deepseek_global", "auto", "auto_c64")}
    cases = [solver_bench.bench_case(workloads.SHAPES["tiny"], "zipf", 1, planners)]
    solver = {
        "shapes": {"tiny": "tiny"},
        "repeats": 1,
        "cases": cases,
        "summary": solver_bench.summarise(cases),
        "peer_labels": [],
        "peer_note": "not loaded in this test",
        "speed": solver_bench.speed_figure("tiny", runs=1),
    }
    titles = [bench.title for bench in report.BENCHES]
    sections = {title: {"status": "skipped", "text": "not run here", "seconds": 0.0} for title in titles}
    sections[titles[0]] = {"status": "ok", "text": solver_bench.markdown(solver), "seconds": 1.0, "result": solver}
    migration = migration_bench.summarise([migration_bench.run_series(workloads.SHAPES["tiny"], 3, 1)])
    sections[titles[1]] = {"status": "ok", "text": "-", "seconds": 1.0, "result": migration}
    optimality = {"summary": {"auto_proven": optimality_bench.distribution([0.0, 0.5, 2.0])}}
    sections[titles[2]] = {"status": "ok", "text": "-", "seconds": 1.0, "result": optimality}
    sections[titles[3]] = {"status": "failed", "text": "Traceback: boom", "seconds": 0.0}
    text = report.render(sections, quick=True, load_before=(0.0, 0.0, 0.0), total_seconds=3.0)
    assert "## Machine" in text and "## Reproduce" in text and "## Headline" in text
    assert "**Failed**" in text and "| shape | kind |" in text and "Not run: not loaded in this test" in text
    assert "headline failed" not in text and "MILP gap of `auto` on 3 proven optima" in text
    assert "Migration `auto_prev`" in text
