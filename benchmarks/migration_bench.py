"""Moved copies and next-window balancedness on a drifting load series (plan on window i, live with it on i + 1).

Replanning from scratch (what the engines do) ships most copies every time; `prev_phy2log` keeps the plan in
force where that costs (almost) no balance, `history` plans for the next window. Plus elastic EP.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from unittest import mock

import peers
import torch
from harness import filled, main
from rebalancer.solver import DEFAULT_BALANCE_TOLERANCE, CostModel, maps, solve
from rebalancer.solver.elastic import elastic_moves
from rebalancer.solver.transfers import plan_transfers, same_node_share, transfer_stats
from rebalancer_testkit import workloads

MIGRATION_SHAPES, BASELINES = ("dsv3_prefill", "qwen3_235b", "kimi_k2"), ("deepseek_global", "deepseek")
HISTORY_WINDOWS = 4
HISTORY_PAIRS = (("auto_prev_hist", "auto_prev"), ("auto_hist", "auto_fresh"))  # (with history, without)
BAR = {"moves_ratio": 0.25, "aim": 0.1, "balancedness_slack": 0.005}
# Elastic EP: a GPU lost and a scale-out; the loss again under a tighter tolerance, beside SGLang's fresh plan.
ELASTIC_SHAPE, LOST_GPU, SCALE_TO, LOST_TIGHT = "dsv3_prefill", 5, 40, {"balance_tolerance": 0.002}
COST = CostModel()  # DeepSeek-V3 FP8 experts, NVLink 450 GB/s and a 400 Gb/s NIC per GPU
# Trading arrivals (arrivals.py: for same-node sources, and the rearrangement's receive balancing) measured
# in place: the same window and placement in force, planned with both steps and with both patched out.
TRADED = "auto_prev"
SAME_NODE_TRADES, RECEIVE_BALANCING = (
    "rebalancer.solver.api._near_sources",
    "rebalancer.solver.rearrangement.balanced_receivers",
)
# Raw per-run sums of the rearrangement figures; shares are pooled from them.
TRANSFER_SUMS = ("transfer_seconds", "network_copies", "intra_copies", "possible_copies", "possible_intra_copies")


@dataclass(frozen=True)
class Variant:
    """One controller strategy: which policy, whether it passes the plan in force and/or the window history."""

    label: str
    policy: str = "auto"
    flat: bool = False
    use_prev: bool = False
    use_history: bool = False
    balance_tolerance: float = DEFAULT_BALANCE_TOLERANCE
    seed: int = 0

    def plan(self, series, window: int, shape: workloads.Shape, prev_phy2log):
        """Plan on `series[window]`; history is the last HISTORY_WINDOWS windows up to it."""
        options: dict = {"policy": self.policy, "device": "cpu", "balance_tolerance": self.balance_tolerance}
        options["seed"] = self.seed
        options["prev_phy2log"] = prev_phy2log if self.use_prev else None
        options["history"] = series[max(0, window - HISTORY_WINDOWS + 1) : window + 1] if self.use_history else None
        return solve(series[window], *shape.args(self.flat), **options).phy2log.cpu()


VARIANTS: tuple[Variant, ...] = (
    Variant("deepseek", "deepseek"),
    Variant("deepseek_global", "deepseek", flat=True),
    Variant("auto_fresh"),
    Variant("auto_prev", use_prev=True),
    Variant("auto_prev_tol0.002", use_prev=True, balance_tolerance=0.002),
    Variant("auto_prev_hist", use_prev=True, use_history=True),
    Variant("auto_hist", use_history=True),
)


# The solver's seed and the series move next-window balancedness by about as much as the variants differ:
# `auto_prev` under five solver seeds on more series, beside the (seedless) baselines, gives the spread.
SPREAD_SEEDS = (0, 1, 2, 3, 4)
SPREAD_SERIES = (21, 22, 23, 24, 25, 26)
SPREAD_VARIANTS = (
    *VARIANTS[:2],
    *(Variant(f"auto_prev_seed{seed}", use_prev=True, seed=seed) for seed in SPREAD_SEEDS),
)


def rearrangement(prev_phy2log, phy2log, shape: workloads.Shape) -> dict[str, float]:
    """Transfer sums from one plan to the next, costed alike for every variant (experts already on a GPU stay)."""
    per_node = shape.gpus // shape.nodes
    rows = plan_transfers(prev_phy2log, phy2log, shape.experts, shape.replicas // shape.gpus, per_node)
    cost = transfer_stats(rows, shape.layers, shape.gpus, per_node, COST)
    share, possible = same_node_share(prev_phy2log, rows, shape.experts, shape.gpus, per_node)
    copies = cost["transferred_copies"]
    sums = (cost["estimated_transfer_seconds"], copies, copies * cost["intra_node_share"], copies * possible)
    return dict(zip(TRANSFER_SUMS, (*sums, copies * possible * share), strict=True))


def untraded(series, window: int, shape: workloads.Shape, prev_phy2log) -> torch.Tensor:
    """The `auto_prev` plan of `series[window]` from `prev_phy2log` with both arrival trades patched out (for
    same-node sources, and the rearrangement's receive balancing)."""
    with (
        mock.patch(SAME_NODE_TRADES, new=lambda _, phy2log: phy2log),
        mock.patch(RECEIVE_BALANCING, new=lambda _loads, _prev, phy2log, *_, **__: phy2log),
    ):
        return solve(series[window], *shape.args(), device="cpu", prev_phy2log=prev_phy2log).phy2log.cpu()


def trade_effect(series, window: int, shape: workloads.Shape, prev, traded) -> dict[str, float]:
    """The untraded plan's transfer sums beside the traded one's, and the next-window balancedness difference."""
    plain = untraded(series, window, shape, prev)
    nxt = series[window + 1]
    gain = float(
        (workloads.balancedness(nxt, traded, shape.gpus) - workloads.balancedness(nxt, plain, shape.gpus)).mean()
    )
    sums = rearrangement(prev, plain, shape)
    return {"untraded_seconds": sums["transfer_seconds"], "untraded_intra": sums["intra_copies"], "next_gain": gain}


def relative(figures: dict[str, dict]) -> dict[str, dict]:
    """Add to every variant's figures its ratios and balancedness delta to each baseline and its pooled shares."""
    for entry in figures.values():
        entry["intra_node_share"] = entry["intra_copies"] / max(entry["network_copies"], 1.0)
        entry["intra_where_possible"] = entry["possible_intra_copies"] / max(entry["possible_copies"], 1.0)
        for base, of in ((base, figures[base]) for base in BASELINES):
            for name, key in (("moves_ratio", "total_moves"), ("transfer_ratio", "transfer_seconds")):
                entry[f"{name}_vs_{base}"] = entry[key] / of[key] if of[key] else math.nan
            entry[f"balancedness_delta_vs_{base}"] = entry["mean_next_balancedness"] - of["mean_next_balancedness"]
    return figures


def run_series(
    shape: workloads.Shape, windows: int, seed: int, variants: Sequence[Variant] = VARIANTS, trades: bool = True
) -> dict:
    """`variants` on one series: replans on windows 1 .. T-2, each scored on the next, moves vs its own plan;
    with `trades`, the trade step measured in place on `TRADED`."""
    series = workloads.drift_series(shape.layers, shape.experts, windows, seed=seed)
    placements = {v.label: v.plan(series, 0, shape, None) for v in variants}
    tracks = {v.label: {"moves": [], "next": [], "seconds": [], "transfers": []} for v in variants}
    trade_steps = []
    for window in range(1, windows - 1):
        for variant in variants:
            started, prev, track = time.perf_counter(), placements[variant.label], tracks[variant.label]
            placements[variant.label] = phy2log = variant.plan(series, window, shape, prev)
            track["seconds"].append(time.perf_counter() - started)
            track["moves"].append(int(maps.moved_copies(prev, phy2log, shape.experts, shape.gpus).sum()))
            track["next"].append(float(workloads.balancedness(series[window + 1], phy2log, shape.gpus).mean()))
            track["transfers"].append(rearrangement(prev, phy2log, shape))
            if trades and variant.label == TRADED:
                trade_steps.append(trade_effect(series, window, shape, prev, phy2log) | track["transfers"][-1])
    figures = {}
    for label, track in tracks.items():
        moves, next_balance = sum(track["moves"]), track["next"]
        figures[label] = {key: sum(step[key] for step in track["transfers"]) for key in TRANSFER_SUMS}
        figures[label] |= {"next_balancedness": next_balance, "mean_next_balancedness": statistics.fmean(next_balance)}
        figures[label] |= {"total_moves": moves, "mean_solve_ms": 1e3 * statistics.fmean(track["seconds"])}
        figures[label]["moved_share"] = moves / ((windows - 2) * shape.layers * shape.replicas)
    return {"shape": shape.name, "seed": seed, "windows": windows, "variants": relative(figures), "trades": trade_steps}


def paired_difference(runs: Sequence[dict], with_history: str, without: str) -> dict:
    """Next-window balancedness of `with_history` minus `without`, per window pooled over `runs`, and per run."""
    per_run = []
    for r in runs:
        paired = (r["variants"][label]["next_balancedness"] for label in (with_history, without))
        per_run.append([a - b for a, b in zip(*paired, strict=True)])
    diffs, means = [d for run_diffs in per_run for d in run_diffs], [statistics.fmean(d) for d in per_run]
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    figures = {"mean_diff": statistics.fmean(diffs), "stderr": stderr, "windows": len(diffs), "per_run_mean": means}
    return figures | {"runs_positive": sum(d > 0 for d in means)}


def pooled(runs: Sequence[dict], variants: Sequence[Variant]) -> dict:
    """Totals pooled over `runs` per variant, with ratios and deltas to the baselines present."""
    totals = {}
    for label in (v.label for v in variants):
        figures = [r["variants"][label] for r in runs]
        totals[label] = {key: sum(f[key] for f in figures) for key in ("total_moves", *TRANSFER_SUMS)}
        for key in ("mean_next_balancedness", "mean_solve_ms"):
            totals[label][key] = statistics.fmean(f[key] for f in figures)
    return relative(totals)


def summarise(runs: Sequence[dict], spread_runs: Sequence[dict] = ()) -> dict:
    """Totals pooled over `runs`, the history pairs, the trades, and `auto_prev`'s spread over solver seeds."""
    totals = pooled(runs, VARIANTS)
    history = {f"{a} - {b}": paired_difference(runs, a, b) for a, b in HISTORY_PAIRS}
    summary = {"windows": runs[0]["windows"], "seeds": sorted({r["seed"] for r in runs}), "runs": runs, "bar": BAR}
    summary |= {"totals": totals, "history_effect": history, "trades": pooled_trades(runs)}
    return summary | {"seed_spread": seed_spread(spread_runs) if spread_runs else None}


def seed_spread(spread_runs: Sequence[dict]) -> dict:
    """`auto_prev` under each of SPREAD_SEEDS pooled over `spread_runs`: moves ratio and next-window delta
    vs `deepseek_global` per seed, and their mean and standard deviation."""
    spread = pooled(spread_runs, SPREAD_VARIANTS)
    per_seed = [{"seed": seed} | spread[f"auto_prev_seed{seed}"] for seed in SPREAD_SEEDS]
    figures = {"per_seed": per_seed, "series": sorted({r["seed"] for r in spread_runs})}
    for key in ("moves_ratio_vs_deepseek_global", "balancedness_delta_vs_deepseek_global"):
        values = [entry[key] for entry in per_seed]
        figures |= {f"{key}_mean": statistics.fmean(values), f"{key}_sd": statistics.stdev(values)}
    return figures


def pooled_trades(runs: Sequence[dict]) -> dict:
    """Traded vs untraded plans from the same placements in force: estimated seconds, intra-node share, and
    the next-window balancedness difference per window (mean, standard error)."""
    steps = [step for r in runs for step in r["trades"]]
    gains = [step["next_gain"] for step in steps]
    copies = sum(step["network_copies"] for step in steps)
    figures = {"windows": len(steps), "next_gain": statistics.fmean(gains)}
    figures["next_gain_stderr"] = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else math.nan
    for name, key, intra in (
        ("traded", "transfer_seconds", "intra_copies"),
        ("untraded", "untraded_seconds", "untraded_intra"),
    ):
        figures[f"{name}_seconds"] = sum(step[key] for step in steps)
        figures[f"{name}_intra_share"] = sum(step[intra] for step in steps) / max(copies, 1.0)
    return figures | {"seconds_ratio": figures["traded_seconds"] / max(figures["untraded_seconds"], 1e-300)}


def run_elastic(seed: int) -> dict:
    """Lose a GPU (also under a tighter tolerance), and scale out, from a plan in force; each beside a fresh plan."""
    shape = workloads.SHAPES[ELASTIC_SHAPE]
    slots, weight = shape.replicas // shape.gpus, shape.loads("zipf", seed)
    replan = functools.partial(solve, weight, *shape.args(), device="cpu")
    prev = replan().phy2log
    lost = replan(prev_phy2log=prev, unavailable_gpus=[LOST_GPU])
    tight = replan(prev_phy2log=prev, unavailable_gpus=[LOST_GPU], **LOST_TIGHT)
    scaled = replan(prev_phy2log=prev, new_num_gpus=SCALE_TO)
    fresh, fresh_scaled = (solve(weight, slots * gpus, 1, 1, gpus, device="cpu") for gpus in (shape.gpus - 1, SCALE_TO))
    fresh_moves, _ = elastic_moves(prev, fresh.phy2log, shape.experts, slots, lost.gpu_ids)
    _, kept = elastic_moves(prev, scaled.phy2log, shape.experts, slots, scaled.gpu_ids)
    moved, worst_gap = lost.moved_copies.double(), (fresh.balancedness - lost.balancedness).max()
    figures = {"shape": ELASTIC_SHAPE, "seed": seed, "lost_gpu": LOST_GPU, "scale_to": SCALE_TO, **LOST_TIGHT}
    figures["tight_moves_mean"] = tight.moved_copies.double().mean().item()
    figures |= {"lost_moves_mean": moved.mean().item(), "lost_moves_max": int(moved.max()), "lost_bar": 2 * slots}
    figures |= {"fresh_moves_mean": fresh_moves.double().mean().item(), "lost_worst_gap": worst_gap.item()}
    figures["scaled_kept_share"] = float(kept.sum()) / prev.numel()
    plans = {"lost": lost, "tight": tight, "fresh": fresh, "scaled": scaled, "fresh_scaled": fresh_scaled}
    figures |= {f"{name}_balancedness": float(result.balancedness.mean()) for name, result in plans.items()}
    return figures | sglang_elastic(weight, prev, shape, lost.gpu_ids)


def sglang_elastic(weight, prev, shape: workloads.Shape, gpu_ids: list[int]) -> dict:
    """SGLang 0.5.23's `elasticity_aware` plan for the same loss (a fresh plan on the healthy ranks): its
    moved copies per layer and balancedness over the healthy GPUs; NaN when the wheel cannot be had."""
    try:
        planner = peers.load_elasticity_aware()
    except Exception:  # no registry and no cache: the project's figures still stand
        return {"sglang_moves_mean": math.nan, "sglang_balancedness": math.nan}
    active = torch.isin(torch.arange(shape.gpus), torch.as_tensor(gpu_ids))
    phy2log = planner(weight, *shape.args(), active).view(shape.layers, shape.gpus, -1)[:, gpu_ids]
    healthy = phy2log.reshape(shape.layers, -1)
    moves, _ = elastic_moves(prev, healthy, shape.experts, phy2log.shape[-1], gpu_ids)
    balance = workloads.balancedness(weight, healthy, len(gpu_ids)).mean().item()
    return {"sglang_moves_mean": moves.double().mean().item(), "sglang_balancedness": balance}


def run(quick: bool = False) -> dict:
    """All shapes x seeds (quick: one shape, one seed, 5 windows), pooled totals, history pairs, elastic EP."""
    names, windows, seeds = (("qwen3_235b",), 5, (21,)) if quick else (MIGRATION_SHAPES, 8, (21, 22))
    warm_up()
    series = [(workloads.SHAPES[name], windows, seed) for name in names for seed in seeds]
    runs = [run_series(*args) for args in series]
    wide = [(workloads.SHAPES[name], windows, seed) for name in names for seed in SPREAD_SERIES]
    spread = [] if quick else [run_series(*args, variants=SPREAD_VARIANTS, trades=False) for args in wide]
    return summarise(runs, spread) | {"elastic": [run_elastic(seed) for seed in seeds]}


def warm_up() -> None:
    """One replan from a placement in force, so that no timed solve loads the compiled loops first."""
    shape = workloads.SHAPES["tiny_ep16"]
    loads = shape.loads("zipf", 0)
    solve(loads, *shape.args(), device="cpu", prev_phy2log=solve(loads.flip(1), *shape.args(), device="cpu").phy2log)


PER_RUN = (
    "shape | seed | variant | moved copies | share of slots | x deepseek_global | next-window bal. |"
    " delta vs deepseek_global | mean solve ms",
    "{shape} | {seed} | {label} | {total_moves} | {moved_share:.3f} | {moves_ratio_vs_deepseek_global:.3f} |"
    " {mean_next_balancedness:.4f} | {balancedness_delta_vs_deepseek_global:+.4f} | {mean_solve_ms:.0f}",
)
POOLED = (
    "variant | moved copies | x deepseek_global | x deepseek | next-window bal. | delta vs deepseek_global |"
    " delta vs deepseek | mean solve ms | est. transfer s | transfer x deepseek_global | intra-node share |"
    " intra where on-node source",
    "{label} | {total_moves} | {moves_ratio_vs_deepseek_global:.3f} | {moves_ratio_vs_deepseek:.3f} |"
    " {mean_next_balancedness:.4f} | {balancedness_delta_vs_deepseek_global:+.4f} |"
    " {balancedness_delta_vs_deepseek:+.4f} | {mean_solve_ms:.0f} | {transfer_seconds:.3f} |"
    " {transfer_ratio_vs_deepseek_global:.3f} | {intra_node_share:.3f} | {intra_where_possible:.3f}",
)
HISTORY = (
    "pair | mean diff | std. error | windows | per shape x seed | runs > 0",
    "{pair} | {mean_diff:+.5f} | {stderr:.5f} | {windows} | {signs} | {runs_positive}/{runs}",
)
ELASTIC = (
    "seed | lose 1: moved/layer mean (max) | bar (2 x slots) | fresh re-plan moved/layer | bal. vs fresh |"
    " worst layer gap | tolerance {balance_tolerance}: moved/layer, bal. | SGLang elasticity_aware: moved/layer, bal. |"
    " scale to {scale_to}: kept share | bal. vs fresh",
    "{seed} | {lost_moves_mean:.1f} ({lost_moves_max}) | {lost_bar} | {fresh_moves_mean:.1f} |"
    " {lost_balancedness:.4f} vs {fresh_balancedness:.4f} | {lost_worst_gap:.4f} |"
    " {tight_moves_mean:.1f}, {tight_balancedness:.4f} |"
    " {sglang_moves_mean:.1f}, {sglang_balancedness:.4f} | {scaled_kept_share:.3f} |"
    " {scaled_balancedness:.4f} vs {fresh_scaled_balancedness:.4f}",
)


TRADES = (
    "windows | est. transfer s traded | untraded | ratio | intra-node share traded | untraded |"
    " next-window bal. traded - untraded",
    "{windows} | {traded_seconds:.3f} | {untraded_seconds:.3f} | {seconds_ratio:.3f} | {traded_intra_share:.3f} |"
    " {untraded_intra_share:.3f} | {next_gain:+.5f} +- {next_gain_stderr:.5f}",
)


SPREAD = (
    "solver seed | moved copies x deepseek_global | next-window delta vs deepseek_global |"
    " est. transfer x deepseek_global",
    "{seed} | {moves_ratio_vs_deepseek_global:.4f} | {balancedness_delta_vs_deepseek_global:+.5f} |"
    " {transfer_ratio_vs_deepseek_global:.4f}",
)


def markdown(result: dict) -> str:
    bar, elastic = result["bar"], result.get("elastic")
    per_run = [r | fig | {"label": label} for r in result["runs"] for label, fig in r["variants"].items()]
    history = [
        h | {"pair": pair, "signs": ", ".join(f"{d:+.5f}" for d in h["per_run_mean"]), "runs": len(h["per_run_mean"])}
        for pair, h in result["history_effect"].items()
    ]
    out = [
        f"Drift series, {result['windows']} windows (plan on window i, score on i + 1), seeds {result['seeds']},"
        f" history = last {HISTORY_WINDOWS} windows. Ratios and deltas are against `deepseek_global` (flat"
        " published algorithm, the check's baseline); `deepseek` with the shape's hierarchy is listed too.",
        filled(*PER_RUN, per_run),
        "**Pooled over all shapes and seeds**",
        filled(*POOLED, [t | {"label": label} for label, t in result["totals"].items()]),
        f"Bar: moved copies <= {bar['moves_ratio']}x the reference (aim {bar['aim']}x) at next-window"
        f" balancedness within {bar['balancedness_slack']} of it.",
        "**Does history help?** Paired per-window differences of next-window balancedness.",
        filled(*HISTORY, history),
        "Windows of one series are correlated, so the standard error understates the noise; read the per-run signs.",
        f"**Trading arrivals** (`{TRADED}`, each window planned from the same placement in force with and without"
        " the trades for same-node sources and the receive balancing): the same moved copies and no higher"
        " per-layer peaks, by construction.",
        filled(*TRADES, [result["trades"]]),
    ]
    spread = result.get("seed_spread")
    if spread:
        moves, delta = "moves_ratio_vs_deepseek_global", "balancedness_delta_vs_deepseek_global"
        out.append(
            f"**Solver seeds** (`{TRADED}` under {len(spread['per_seed'])} solver seeds on the same shapes, series"
            f" {spread['series']}): moved copies"
            f" {spread[moves + '_mean']:.4f}x +- {spread[moves + '_sd']:.4f} (sd), next-window delta"
            f" {spread[delta + '_mean']:+.5f} +- {spread[delta + '_sd']:.5f} (sd) vs the reference."
        )
        out.append(filled(*SPREAD, spread["per_seed"]))
    if elastic:
        out.append(f"**Elastic EP** on {elastic[0]['shape']} (zipf loads, GPU {elastic[0]['lost_gpu']} lost)")
        out.append(filled(ELASTIC[0].format(**elastic[0]), ELASTIC[1], elastic))
    return "\n\n".join(out)


if __name__ == "__main__":
    main(run, markdown, __doc__)
