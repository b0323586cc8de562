"""The benchmarks still run and return what RESULTS.md is built from, on tiny shapes, in a few seconds each.

`make bench` takes minutes on the full shapes, so a broken benchmark would otherwise be found only when
someone wants the figures. These tests run each bench on the README-sized shape and check the keys the
report reads, plus the two pieces whose correctness the figures rest on: the vectorised lower bound and the
published-algorithm transcription.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import migration_bench  # noqa: E402
import published_eplb  # noqa: E402
import report  # noqa: E402
import solver_bench  # noqa: E402
import workloads  # noqa: E402

README_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
README_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]
TIME_LIMIT_S = 20.0


@pytest.mark.parametrize("python_floats", [False, True])
def test_published_transcription_reproduces_readme_example(python_floats: bool) -> None:
    phy2log, log2phy, logcnt = published_eplb.rebalance_experts(
        torch.tensor(README_WEIGHT), 16, 4, 2, 8, python_floats=python_floats
    )
    assert phy2log.tolist() == README_PHY2LOG
    assert logcnt.sum(1).tolist() == [16, 16]
    assert log2phy.shape[:2] == (2, 12)


def test_copy_lower_bound_matches_greedy_replication_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.rand(6, 10, generator=gen, dtype=torch.float64) * 100
    weight[0] = 0.0
    num_replicas = 17
    counts = torch.ones_like(weight)
    rows = torch.arange(weight.shape[0])
    for _ in range(num_replicas - weight.shape[1]):
        counts[rows, (weight / counts).argmax(1)] += 1
    expected = (weight / counts).max(1).values
    assert torch.allclose(solver_bench.copy_lower_bound(weight, num_replicas), expected)


def test_workloads_shapes_and_kinds() -> None:
    for kind in workloads.KINDS:
        loads = workloads.make(kind, 3, 12, seed=1)
        assert loads.shape == (3, 12) and bool((loads > 0).all())
        assert torch.equal(loads, workloads.make(kind, 3, 12, seed=1))
    series = workloads.drift_series(2, 12, 4, seed=1)
    assert series.shape == (4, 2, 12)
    assert series.sum((1, 2)).tolist() == [2 * 200_000.0] * 4


def test_solver_bench_runs_on_tiny_shape() -> None:
    started = time.perf_counter()
    result = solver_bench.run(shapes=("tiny",), kinds=("zipf", "hot"), repeats=1, speed_runs=0)
    assert time.perf_counter() - started < TIME_LIMIT_S
    assert {"shapes", "kinds", "repeats", "cases", "summary", "speed"} <= set(result)
    case = result["cases"][0]
    assert {"shape", "kind", "policies", "best_reference_balancedness", "auto_minus_best_reference"} <= set(case)
    for figures in case["policies"].values():
        assert {"time_min_s", "time_ratio", "balancedness", "balancedness_delta", "max_over_lb", "candidates"} <= set(
            figures
        )
        assert figures["max_over_lb"] >= 1.0 - 1e-9
    assert case["auto_minus_best_reference"] >= -1e-9
    assert "| shape | kind |" in solver_bench.format_tables(result)


def test_speed_figure_keys_on_tiny_shape() -> None:
    started = time.perf_counter()
    speed = solver_bench.speed_figure("tiny", runs=1)
    assert time.perf_counter() - started < TIME_LIMIT_S
    assert {"ratio_vs_deepseek_median", "ratio_vs_published_median", "ratio_vs_published_lists_median"} <= set(speed)
    assert speed["published_equals_deepseek_policy"]


def test_migration_bench_runs_on_tiny_shape() -> None:
    started = time.perf_counter()
    result = migration_bench.run(shape="tiny", windows=4, seeds=(1,))
    assert time.perf_counter() - started < TIME_LIMIT_S
    assert {"runs", "totals", "history_effect", "bar"} <= set(result)
    labels = {variant.label for variant in migration_bench.VARIANTS}
    assert set(result["totals"]) == labels
    for totals in result["totals"].values():
        assert {"total_moves", "moves_ratio_vs_deepseek_global", "balancedness_delta_vs_deepseek_global"} <= set(totals)
    assert "Does history help?" in migration_bench.format_tables(result)


def test_report_renders_without_external_benches() -> None:
    solver = solver_bench.run(shapes=("tiny",), kinds=("zipf",), repeats=1, speed_runs=0)
    migration = migration_bench.run(shape="tiny", windows=3, seeds=(1,))
    sections = {
        "Solver": {"status": "ok", "text": solver_bench.format_tables(solver), "seconds": 1.0, "result": solver},
        "Migration": {
            "status": "ok",
            "text": migration_bench.format_tables(migration),
            "seconds": 1.0,
            "result": migration,
        },
        "Service": {"status": "failed", "text": "Traceback: boom", "seconds": 0.0},
    }
    text = report.render(sections, report.machine(), quick=True, load_after=(0.0, 0.0, 0.0), total_seconds=3.0)
    assert "## Machine" in text and "## Reproduce" in text and "## Headline" in text
    assert "**Failed**" in text and "| shape | kind |" in text
