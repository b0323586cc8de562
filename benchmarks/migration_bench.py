"""Moved copies and next-window balancedness on a drifting load series (SPEC §8 migration, issue 3).

A controller rebalances every window: it plans on window i's loads and lives with the plan during window
i + 1. Replanning from scratch (what every engine does) ships most expert copies every time; the solver's
`prev_phy2log` keeps the placement in force where that costs (almost) no balance, and `history` plans for
the next window rather than the last. This bench runs, per window, on the same series:

* `deepseek` / `deepseek_global`: the published algorithm from scratch, with the shape's groups and nodes /
  flat (1 group, 1 node; the baseline `../shared/checks/check.py migration` uses, and the better-balanced
  one whenever the hierarchy collapses),
* `auto_fresh`: `auto` from scratch,
* `auto_prev`: `auto` with the previous plan (default balance tolerance),
* `auto_prev_tol0.002`: the same with `balance_tolerance=0.002`,
* `auto_prev_hist`: previous plan plus the last 4 windows as history,
* `auto_hist`: history only, from scratch.

Figures: total moved copies (ratio to each deepseek baseline), mean next-window balancedness (delta to
each baseline) and solve time. The question the lead decides on is whether history helps; the paired
per-window differences with and without history, with their standard error, answer it honestly.

Run: `python benchmarks/migration_bench.py [--quick]`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import workloads  # noqa: E402
from rebalancer.solver import CostModel, maps, solve  # noqa: E402
from rebalancer.solver.elastic import elastic_moves  # noqa: E402
from rebalancer.solver.transfers import plan_transfers, same_node_share, transfer_stats  # noqa: E402

MIGRATION_SHAPES = ("dsv3_prefill", "qwen3_235b", "kimi_k2")
HISTORY_WINDOWS = 4
BASELINES = ("deepseek", "deepseek_global")
# (label of the variant with history, label of the same variant without it)
HISTORY_PAIRS = (("auto_prev_hist", "auto_prev"), ("auto_hist", "auto_fresh"))
# Rearrangement cost model: DeepSeek-V3 FP8 experts, NVLink 450 GB/s and a 400 Gb/s NIC per GPU.
COST = CostModel()


@dataclass(frozen=True)
class Variant:
    """One controller strategy: which policy, whether it passes the plan in force and/or the window history."""

    label: str
    policy: str = "auto"
    flat: bool = False
    use_prev: bool = False
    use_history: bool = False
    balance_tolerance: float | None = None


VARIANTS: tuple[Variant, ...] = (
    Variant("deepseek", "deepseek"),
    Variant("deepseek_global", "deepseek", flat=True),
    Variant("auto_fresh"),
    Variant("auto_prev", use_prev=True),
    Variant("auto_prev_tol0.002", use_prev=True, balance_tolerance=0.002),
    Variant("auto_prev_hist", use_prev=True, use_history=True),
    Variant("auto_hist", use_history=True),
)


@dataclass
class Track:
    """Per-window figures of one variant on one series."""

    moves: list[int] = field(default_factory=list)
    next_balancedness: list[float] = field(default_factory=list)
    solve_seconds: list[float] = field(default_factory=list)
    transfer_seconds: list[float] = field(default_factory=list)
    intra_copies: list[float] = field(default_factory=list)
    network_copies: list[float] = field(default_factory=list)
    possible_copies: list[float] = field(default_factory=list)
    possible_intra_copies: list[float] = field(default_factory=list)


def plan(
    variant: Variant,
    series: torch.Tensor,
    window: int,
    shape: workloads.Shape,
    prev_phy2log: torch.Tensor | None,
):
    """Plan on `series[window]` as `variant` would; history is the last HISTORY_WINDOWS windows up to it."""
    groups, nodes = (1, 1) if variant.flat else (shape.groups, shape.nodes)
    kwargs: dict = {}
    if variant.use_prev and prev_phy2log is not None:
        kwargs["prev_phy2log"] = prev_phy2log
    if variant.use_history:
        kwargs["history"] = series[max(0, window - HISTORY_WINDOWS + 1) : window + 1]
    if variant.balance_tolerance is not None:
        kwargs["balance_tolerance"] = variant.balance_tolerance
    return solve(
        series[window], shape.replicas, groups, nodes, shape.gpus, policy=variant.policy, device="cpu", **kwargs
    )


def run_series(shape: workloads.Shape, windows: int, seed: int, variants: Sequence[Variant] = VARIANTS) -> dict:
    """Every variant over one drift series: plan on window 0, then replan on windows 1 .. T-2, each scored on
    the window after it; moves count against that variant's own previous plan."""
    series = workloads.drift_series(shape.layers, shape.experts, windows, seed=seed)
    tracks = {v.label: Track() for v in variants}
    gpus_per_node = shape.gpus // shape.nodes
    placements = {v.label: plan(v, series, 0, shape, None).phy2log.cpu() for v in variants}
    for window in range(1, windows - 1):
        following = series[window + 1].double()
        for variant in variants:
            started = time.perf_counter()
            result = plan(variant, series, window, shape, placements[variant.label])
            elapsed = time.perf_counter() - started
            phy2log = result.phy2log.cpu()
            logcnt = result.logcnt.cpu()
            track = tracks[variant.label]
            track.solve_seconds.append(elapsed)
            track.moves.append(
                int(maps.moved_copies(placements[variant.label], phy2log, shape.experts, shape.gpus).sum())
            )
            track.next_balancedness.append(float(maps.balancedness(following, phy2log, logcnt, shape.gpus).mean()))
            # Every variant's rearrangement under one cost model and the shape's real nodes; a re-plan
            # keeps experts already on a GPU (vLLM-style), so only new arrivals use a link.
            plan_rows = plan_transfers(
                placements[variant.label], phy2log, shape.experts, shape.replicas // shape.gpus, gpus_per_node
            )
            cost = transfer_stats(plan_rows, shape.layers, shape.gpus, gpus_per_node, COST)
            track.transfer_seconds.append(cost["estimated_transfer_seconds"])
            track.network_copies.append(cost["transferred_copies"])
            track.intra_copies.append(cost["transferred_copies"] * cost["intra_node_share"])
            share, possible = same_node_share(
                placements[variant.label], plan_rows, shape.experts, shape.gpus, gpus_per_node
            )
            track.possible_copies.append(cost["transferred_copies"] * possible)
            track.possible_intra_copies.append(cost["transferred_copies"] * possible * share)
            placements[variant.label] = phy2log
    replans = windows - 2
    figures: dict[str, dict] = {}
    for label, track in tracks.items():
        figures[label] = {
            "moves": track.moves,
            "total_moves": sum(track.moves),
            "moved_share": sum(track.moves) / (replans * shape.layers * shape.replicas),
            "next_balancedness": track.next_balancedness,
            "mean_next_balancedness": statistics.fmean(track.next_balancedness),
            "mean_solve_s": statistics.fmean(track.solve_seconds),
            "min_solve_s": min(track.solve_seconds),
            "transfer_seconds": sum(track.transfer_seconds),
            "intra_node_share": sum(track.intra_copies) / max(sum(track.network_copies), 1.0),
            "intra_where_possible": sum(track.possible_intra_copies) / max(sum(track.possible_copies), 1.0),
            "possible_copies": sum(track.possible_copies),
            "possible_intra_copies": sum(track.possible_intra_copies),
        }
    for entry in figures.values():
        for base in BASELINES:
            base_moves = figures[base]["total_moves"]
            entry[f"moves_ratio_vs_{base}"] = entry["total_moves"] / base_moves if base_moves else math.nan
            entry[f"balancedness_delta_vs_{base}"] = (
                entry["mean_next_balancedness"] - figures[base]["mean_next_balancedness"]
            )
            entry[f"time_ratio_vs_{base}"] = entry["mean_solve_s"] / figures[base]["mean_solve_s"]
            entry[f"transfer_ratio_vs_{base}"] = entry["transfer_seconds"] / max(
                figures[base]["transfer_seconds"], 1e-300
            )
    return {"shape": shape.name, "seed": seed, "windows": windows, "replans": replans, "variants": figures}


def paired_difference(runs: Sequence[dict], with_history: str, without: str) -> dict:
    """Per-window next-window balancedness of `with_history` minus `without`, pooled over `runs`.

    Windows of one series are correlated, so the standard error is optimistic; the per-run means beside it
    show whether the sign holds on every shape and seed.
    """
    diffs: list[float] = []
    per_run: list[float] = []
    for entry in runs:
        a = entry["variants"][with_history]["next_balancedness"]
        b = entry["variants"][without]["next_balancedness"]
        run_diffs = [x - y for x, y in zip(a, b, strict=True)]
        diffs += run_diffs
        per_run.append(statistics.fmean(run_diffs))
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return {
        "mean_diff": statistics.fmean(diffs),
        "stderr": stderr,
        "windows": len(diffs),
        "per_run_mean": per_run,
        "runs_positive": sum(d > 0 for d in per_run),
    }


def run(
    shape: str | None = None,
    windows: int = 8,
    seeds: Sequence[int] = (21, 22),
    shapes: Sequence[str] = MIGRATION_SHAPES,
) -> dict:
    """All shapes x seeds (`shape` restricts to one); returns per-run figures, pooled totals and history pairs."""
    names = (shape,) if shape else tuple(shapes)
    runs = [run_series(workloads.SHAPES[name], windows, seed) for name in names for seed in seeds]
    totals: dict[str, dict] = {}
    for variant in VARIANTS:
        moves = sum(r["variants"][variant.label]["total_moves"] for r in runs)
        totals[variant.label] = {
            "total_moves": moves,
            "mean_next_balancedness": statistics.fmean(
                r["variants"][variant.label]["mean_next_balancedness"] for r in runs
            ),
            "mean_solve_s": statistics.fmean(r["variants"][variant.label]["mean_solve_s"] for r in runs),
            "transfer_seconds": sum(r["variants"][variant.label]["transfer_seconds"] for r in runs),
            "intra_node_share": statistics.fmean(r["variants"][variant.label]["intra_node_share"] for r in runs),
            "intra_where_possible": sum(r["variants"][variant.label]["possible_intra_copies"] for r in runs)
            / max(sum(r["variants"][variant.label]["possible_copies"] for r in runs), 1.0),
        }
    for entry in totals.values():
        for base in BASELINES:
            entry[f"moves_ratio_vs_{base}"] = entry["total_moves"] / max(totals[base]["total_moves"], 1)
            entry[f"balancedness_delta_vs_{base}"] = (
                entry["mean_next_balancedness"] - totals[base]["mean_next_balancedness"]
            )
            entry[f"transfer_ratio_vs_{base}"] = entry["transfer_seconds"] / max(
                totals[base]["transfer_seconds"], 1e-300
            )
    history = {f"{a} - {b}": paired_difference(runs, a, b) for a, b in HISTORY_PAIRS}
    return {
        "shapes": {name: workloads.SHAPES[name].describe() for name in names},
        "windows": windows,
        "seeds": list(seeds),
        "history_windows": HISTORY_WINDOWS,
        "runs": runs,
        "totals": totals,
        "history_effect": history,
        "bar": {"moves_ratio": 0.25, "aim": 0.1, "balancedness_slack": 0.005},
    }


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_tables(result: dict) -> str:
    """Markdown: per shape x seed, pooled totals, and the history effect, ready for RESULTS.md."""
    out = [
        f"Drift series, {result['windows']} windows (plan on window i, score on i + 1; {result['windows'] - 2} replans"
        f" per series), seeds {result['seeds']}, history = last {result['history_windows']} windows. Ratios and deltas"
        " are against `deepseek_global` (flat published algorithm, the check's baseline); `deepseek` with the shape's"
        " hierarchy is listed too.",
        "",
    ]
    head = [
        "shape",
        "seed",
        "variant",
        "moved copies",
        "share of slots",
        "x deepseek_global",
        "next-window bal.",
        "delta vs deepseek_global",
        "mean solve ms",
    ]
    rows = []
    for entry in result["runs"]:
        for label, fig in entry["variants"].items():
            rows.append(
                [
                    entry["shape"],
                    str(entry["seed"]),
                    label,
                    str(fig["total_moves"]),
                    f"{fig['moved_share']:.3f}",
                    f"{fig['moves_ratio_vs_deepseek_global']:.3f}",
                    f"{fig['mean_next_balancedness']:.4f}",
                    f"{fig['balancedness_delta_vs_deepseek_global']:+.4f}",
                    f"{1000 * fig['mean_solve_s']:.0f}",
                ]
            )
    out.append(_table(head, rows))
    out.append("")
    out.append("**Pooled over all shapes and seeds**")
    out.append("")
    head = [
        "variant",
        "moved copies",
        "x deepseek_global",
        "x deepseek",
        "next-window bal.",
        "delta vs deepseek_global",
        "delta vs deepseek",
        "mean solve ms",
        "est. transfer s",
        "transfer x deepseek_global",
        "intra-node share",
        "intra where a node source exists",
    ]
    rows = [
        [
            label,
            str(t["total_moves"]),
            f"{t['moves_ratio_vs_deepseek_global']:.3f}",
            f"{t['moves_ratio_vs_deepseek']:.3f}",
            f"{t['mean_next_balancedness']:.4f}",
            f"{t['balancedness_delta_vs_deepseek_global']:+.4f}",
            f"{t['balancedness_delta_vs_deepseek']:+.4f}",
            f"{1000 * t['mean_solve_s']:.0f}",
            f"{t['transfer_seconds']:.3f}",
            f"{t['transfer_ratio_vs_deepseek_global']:.3f}",
            f"{t['intra_node_share']:.3f}",
            f"{t['intra_where_possible']:.3f}",
        ]
        for label, t in result["totals"].items()
    ]
    out.append(_table(head, rows))
    out.append("")
    bar = result["bar"]
    out.append(
        f"Bar: moved copies <= {bar['moves_ratio']}x the reference (aim {bar['aim']}x) at next-window balancedness"
        f" within {bar['balancedness_slack']} of it."
    )
    out.append("")
    out.append("**Does history help?** Paired per-window differences of next-window balancedness.")
    out.append("")
    rows = [
        [
            pair,
            f"{h['mean_diff']:+.5f}",
            f"{h['stderr']:.5f}",
            str(h["windows"]),
            ", ".join(f"{d:+.5f}" for d in h["per_run_mean"]),
            f"{h['runs_positive']}/{len(h['per_run_mean'])}",
        ]
        for pair, h in result["history_effect"].items()
    ]
    out.append(_table(["pair", "mean diff", "std. error", "windows", "per shape x seed", "runs > 0"], rows))
    out.append("")
    out.append(
        "Windows of one series are correlated, so the standard error understates the noise; read the per-run signs."
    )
    return "\n".join(out)


def run_elastic(
    shape: str = "dsv3_prefill", seeds: Sequence[int] = (21, 22), lost_gpu: int = 5, scale_to: int = 40
) -> dict:
    """Elastic EP from a placement planned on the same loads: lose one GPU, and scale to `scale_to` GPUs.

    Against the issue's bars: moves when a GPU is lost vs twice the copies it held, balancedness vs a fresh
    plan on the healthy GPUs (which is what re-planning on the active ranks gives, and its moves), copies
    kept in place when scaling out.
    """
    spec = workloads.SHAPES[shape]
    slots = spec.replicas // spec.gpus
    rows = []
    for seed in seeds:
        weight = workloads.make("zipf", spec.layers, spec.experts, seed=seed)
        prev = solve(weight, spec.replicas, spec.groups, spec.nodes, spec.gpus, device="cpu").phy2log
        healthy = spec.gpus - 1
        started = time.perf_counter()
        lost = solve(
            weight,
            spec.replicas,
            spec.groups,
            spec.nodes,
            spec.gpus,
            device="cpu",
            prev_phy2log=prev,
            unavailable_gpus=[lost_gpu],
        )
        lost_s = time.perf_counter() - started
        fresh = solve(weight, slots * healthy, 1, 1, healthy, device="cpu")
        fresh_moves, _ = elastic_moves(prev, fresh.phy2log, spec.experts, slots, lost.gpu_ids)
        started = time.perf_counter()
        scaled = solve(
            weight,
            spec.replicas,
            spec.groups,
            spec.nodes,
            spec.gpus,
            device="cpu",
            prev_phy2log=prev,
            new_num_gpus=scale_to,
        )
        scaled_s = time.perf_counter() - started
        _, kept = elastic_moves(prev, scaled.phy2log, spec.experts, slots, scaled.gpu_ids)
        fresh_scaled = solve(weight, slots * scale_to, 1, 1, scale_to, device="cpu")
        rows.append(
            {
                "seed": seed,
                "lost_moves_mean": float(lost.moved_copies.double().mean()),
                "lost_moves_max": int(lost.moved_copies.max()),
                "lost_bar": 2 * slots,
                "fresh_moves_mean": float(fresh_moves.double().mean()),
                "lost_balancedness": float(lost.balancedness.mean()),
                "fresh_balancedness": float(fresh.balancedness.mean()),
                "lost_worst_gap": float((fresh.balancedness - lost.balancedness).max()),
                "lost_incremental_layers": sum(name.endswith("incremental") for name in lost.policy_per_layer),
                "lost_seconds": lost_s,
                "scaled_kept_share": float(kept.sum()) / prev.numel(),
                "scaled_balancedness": float(scaled.balancedness.mean()),
                "fresh_scaled_balancedness": float(fresh_scaled.balancedness.mean()),
                "scaled_seconds": scaled_s,
            }
        )
    return {"shape": shape, "lost_gpu": lost_gpu, "scale_to": scale_to, "rows": rows}


def format_elastic(result: dict) -> str:
    """Markdown table of `run_elastic`."""
    head = [
        "seed",
        "lose 1: moved/layer mean (max)",
        "bar (2 x slots)",
        "fresh re-plan moved/layer",
        "bal. vs fresh",
        "worst layer gap",
        "incremental layers",
        f"scale to {result['scale_to']}: kept share",
        "bal. vs fresh",
    ]
    rows = [
        [
            str(r["seed"]),
            f"{r['lost_moves_mean']:.1f} ({r['lost_moves_max']})",
            str(r["lost_bar"]),
            f"{r['fresh_moves_mean']:.1f}",
            f"{r['lost_balancedness']:.4f} vs {r['fresh_balancedness']:.4f}",
            f"{r['lost_worst_gap']:.4f}",
            str(r["lost_incremental_layers"]),
            f"{r['scaled_kept_share']:.3f}",
            f"{r['scaled_balancedness']:.4f} vs {r['fresh_scaled_balancedness']:.4f}",
        ]
        for r in result["rows"]
    ]
    return f"Elastic EP on {result['shape']} (zipf loads, GPU {result['lost_gpu']} lost):\n\n" + _table(head, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, one seed, 5 windows")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--elastic", action="store_true", help="only the elastic EP figures")
    args = parser.parse_args()
    if args.elastic:
        print(format_elastic(run_elastic()))
        return
    result = run(shape="qwen3_235b", windows=5, seeds=(21,)) if args.quick else run(windows=args.windows)
    print(format_tables(result))


if __name__ == "__main__":
    main()
