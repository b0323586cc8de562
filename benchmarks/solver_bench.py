"""Solver speed and quality against the published DeepSeek algorithm and the engines' released planners.

Per shape x load kind: each planner's min time over interleaved rounds, its balancedness and max load / bound.
"""

from __future__ import annotations

import operator
import statistics
from collections.abc import Callable, Sequence

import peers
import torch
from harness import filled, interleaved_times, main, table
from rebalancer.solver import solve
from rebalancer_testkit import workloads

Planner = Callable[[torch.Tensor, workloads.Shape], torch.Tensor]  # (weight [L, E], shape) -> phy2log [L, R]


def project(policy: str, candidates: int | None = None, flat: bool = False) -> Planner:
    """The project's solver on CPU."""
    return lambda w, s: solve(w, *s.args(flat), policy=policy, num_candidates=candidates, device="cpu").phy2log


PROJECT: dict[str, Planner] = {
    "deepseek": project("deepseek"),
    "deepseek_global": project("deepseek", flat=True),
    "auto": project("auto"),
    "auto_c64": project("auto", 64),
    "global": project("global"),
    "hierarchical": project("hierarchical"),
    "published_loops": lambda w, s: peers.published_rebalance_experts(w, *s.args(), python_floats=True)[0],
}
REFERENCES = ("deepseek", "deepseek_global")
PEER_ROWS = ("auto", "deepseek", "published_loops")  # the project's rows of the peer table, beside the peers
QUICK_SHAPES, QUICK_KINDS = ("tiny", "dsv3_prefill", "dsv3_ep144", "mixtral"), ("zipf", "hot")
# The cases `../shared/checks/check.py quality` scores, whose mean max/LB the bar (<= 1.005) is about.
CHECK_SHAPES, CHECK_KINDS = ("dsv3_prefill", "dsv3_ep64", "qwen3_30b", "qwen3_235b"), ("zipf", "lognormal", "hot")
LOAD_SEED, SPEED_SEED = 1, 5
# Cheap cases repeat for 1 s (a 1 ms solve timed 3 times is scheduler noise); slow ones stop after 10 s.
LIMITS = {"min_s": 1.0, "max_s": 10.0, "max_rounds": 30}


def bench_case(shape: workloads.Shape, kind: str, repeats: int, planner_map: dict[str, Planner]) -> dict:
    """Time and score every planner on one shape x kind."""
    weight = shape.loads(kind, LOAD_SEED)
    calls = {label: (lambda plan=plan: plan(weight, shape)) for label, plan in planner_map.items()}
    times, results = interleaved_times(calls, repeats, **LIMITS)
    figures = {}
    for label, placed in results.items():
        figures[label] = {"time_min_s": min(times[label]), "time_ratio": min(times[label]) / min(times["deepseek"])}
        figures[label]["balancedness"] = float(workloads.balancedness(weight, placed, shape.gpus).mean())
        figures[label]["max_over_lb"] = float(workloads.max_over_lower_bound(weight, placed, shape.gpus).mean())
    margin = figures["auto"]["balancedness"] - max(figures[name]["balancedness"] for name in REFERENCES)
    case = {"shape": shape.name, "kind": kind, "rounds": len(times["deepseek"]), "policies": figures}
    return case | {"auto_minus_best_reference": margin}


def speed_figure(shape_name: str = "dsv3_prefill", kind: str = "zipf", runs: int = 5) -> dict:
    """Default `auto` CPU solve vs `deepseek` and the published code; ratios are medians of per-run ratios."""
    shape = workloads.SHAPES[shape_name]
    weight, args = shape.loads(kind, SPEED_SEED), shape.args()
    calls = {
        "auto": lambda: solve(weight, *args, device="cpu").phy2log,
        "deepseek": lambda: solve(weight, *args, policy="deepseek", device="cpu").phy2log,
        "published": lambda: peers.published_rebalance_experts(weight, *args)[0],
        "published_lists": lambda: peers.published_rebalance_experts(weight, *args, python_floats=True)[0],
    }
    interleaved_times(calls, 1)  # warm-up: first calls pay allocator and dispatcher set-up
    times, results = interleaved_times(calls, runs)
    figures = {"shape": shape.name, "kind": kind, "runs": runs, "min_ms": {n: 1e3 * min(t) for n, t in times.items()}}
    figures["median_ms"] = {name: 1e3 * statistics.median(samples) for name, samples in times.items()}
    for name in list(calls)[1:]:
        figures[f"ratio_vs_{name}_median"] = statistics.median(map(operator.truediv, times["auto"], times[name]))
    return figures | {"published_equals_deepseek_policy": bool(torch.equal(results["published"], results["deepseek"]))}


def aggregate(cases: Sequence[dict], label: str, base: str) -> dict:
    """Planner `label` over `cases`: mean quality, median min-time and geomean time ratio to planner `base`."""
    figures = [c["policies"][label] for c in cases]
    ratios = (f["time_min_s"] / c["policies"][base]["time_min_s"] for f, c in zip(figures, cases, strict=True))
    means = {f"mean_{key}": statistics.fmean(f[key] for f in figures) for key in ("balancedness", "max_over_lb")}
    median_ms = 1e3 * statistics.median(f["time_min_s"] for f in figures)
    return means | {"median_ms": median_ms, "geomean_time_ratio": statistics.geometric_mean(ratios)}


def summarise(cases: Sequence[dict]) -> dict:
    """Means over all cases per planner, and the worst case of auto against the better reference policy."""
    labels, worst = list(cases[0]["policies"]), min(cases, key=lambda c: c["auto_minus_best_reference"])
    checked = [c for c in cases if c["shape"] in CHECK_SHAPES and c["kind"] in CHECK_KINDS]
    summary: dict = {"auto_worst_case": f"{worst['shape']}/{worst['kind']}", "check_cases": len(checked)}
    summary |= {label: aggregate(cases, label, "deepseek") for label in labels}
    if checked:
        check = {label: aggregate(checked, label, "deepseek")["mean_max_over_lb"] for label in labels}
        summary["check_cases_mean_max_over_lb"] = check
    return summary | {"auto_worst_minus_best_reference": worst["auto_minus_best_reference"]}


def run(quick: bool = False) -> dict:
    """Every shape x kind with every planner, the summary and the speed figure."""
    shapes, kinds = (QUICK_SHAPES, QUICK_KINDS) if quick else (tuple(workloads.SHAPES), workloads.KINDS)
    try:
        released, peer_note = peers.load_released_planners(), ""
    except Exception as error:  # no registry and no cache: the project's figures still stand
        released, peer_note = {}, f"released planners unavailable: {type(error).__name__}: {error}"
    planner_map = PROJECT | {label: (lambda w, s, p=p: p(w, *s.args())) for label, p in released.items()}
    for name in ("tiny", "tiny_ep16"):  # warm-up of one-off set-up costs (compiled loops of both two-slot paths)
        bench_case(workloads.SHAPES[name], "zipf", 1, planner_map)
    repeats = 1 if quick else 3
    cases = [bench_case(workloads.SHAPES[name], kind, repeats, planner_map) for name in shapes for kind in kinds]
    return {
        "shapes": {name: workloads.SHAPES[name].describe() for name in shapes},
        "repeats": repeats,
        "cases": cases,
        "summary": summarise(cases),
        "peer_labels": list(released),
        "peer_note": peer_note,
        "speed": speed_figure(runs=3 if quick else 5),
    }


def peer_rows(result: dict) -> list[dict]:
    """Per shape, each engine planner and the project's rows: means over kinds, time / vLLM's default."""
    vllm = result["peer_labels"][0]
    return [
        aggregate([c for c in result["cases"] if c["shape"] == shape], label, vllm) | {"shape": shape, "label": label}
        for shape in result["shapes"]
        for label in [*result["peer_labels"], *PEER_ROWS]
    ]


def peer_table(result: dict) -> str:
    if not result["peer_labels"]:
        return f"Not run: {result['peer_note']}."
    kinds = sorted({c["kind"] for c in result["cases"]})
    note = f"Released planners from their wheels (`benchmarks/peers.py`), same run, interleaved; means over {kinds}."
    return note + "\n\n" + filled(PEERS[0].format(vllm=result["peer_labels"][0]), PEERS[1], peer_rows(result))


def speed_markdown(speed: dict) -> str:
    ratios = [f"{speed[f'ratio_vs_{name}_median']:.2f}" for name in ("deepseek", "published", "published_lists")]
    rows = [[name, f"{ms:.1f}", f"{speed['min_ms'][name]:.1f}"] for name, ms in speed["median_ms"].items()]
    return (
        f"**Speed** on {speed['shape']} {speed['kind']}, {speed['runs']} interleaved runs: default `auto` /"
        f" `deepseek` policy = **{ratios[0]}x** (median of per-run ratios); `auto` / published EPLB verbatim ="
        f" **{ratios[1]}x**; `auto` / published loops over Python floats = **{ratios[2]}x** (bar <= 1.0).\n\n"
        + table(["solve", "median ms", "min ms"], rows)
        + f"\n\nPublished algorithm reproduces the `deepseek` policy: {speed['published_equals_deepseek_policy']}."
        f" Process torch threads: {torch.get_num_threads()} (a CPU solve runs on REBALANCER_CPU_THREADS, default 1)."
    )


PEERS = (
    "shape | planner | median ms | time / {vllm} (geomean) | mean balancedness | mean max/LB",
    "{shape} | {label} | {median_ms:.1f} | {geomean_time_ratio:.2f} | {mean_balancedness:.4f} | {mean_max_over_lb:.4f}",
)
SUMMARY = (
    "planner | mean balancedness | mean max/LB | geomean time / deepseek",
    "{label} | {mean_balancedness:.4f} | {mean_max_over_lb:.4f} | {geomean_time_ratio:.2f}",
)


def markdown(result: dict) -> str:
    cases, summary = result["cases"], result["summary"]
    labels = list(cases[0]["policies"])
    quality = [
        [c["shape"], c["kind"], *(f"{c['policies'][label]['balancedness']:.4f}" for label in labels)]
        + [f"{c['policies'][label]['max_over_lb']:.4f}" for label in ("auto", "deepseek")]
        + [f"{c['auto_minus_best_reference']:+.4f}"]
        for c in cases
    ]
    times = [
        [c["shape"], c["kind"], c["rounds"], f"{1000 * c['policies']['deepseek']['time_min_s']:.1f}"]
        + [f"{c['policies'][label]['time_ratio']:.2f}" for label in labels[1:]]
        for c in cases
    ]
    means = [summary[label] | {"label": label} for label in labels]
    out = [
        speed_markdown(result["speed"]),
        "**Quality**: mean balancedness per planner (1.0 is perfect) and max GPU load / lower bound.",
        table(["shape", "kind", *labels, "auto max/LB", "deepseek max/LB", "auto - best ref"], quality),
        f"**Time**: min of at least {result['repeats']} interleaved rounds (cheap cases repeat for"
        f" {LIMITS['min_s']:.0f} s, slow ones stop after {LIMITS['max_s']:.0f} s); `deepseek` in ms, every other"
        " planner as a ratio to it.",
        table(["shape", "kind", "rounds", "deepseek ms", *(f"{label} / deepseek" for label in labels[1:])], times),
        f"**Summary over {len(cases)} cases**",
        filled(*SUMMARY, means),
        f"Worst case of `auto` minus the better reference policy (deepseek hierarchical or global): "
        f"{summary['auto_worst_minus_best_reference']:+.5f} on {summary['auto_worst_case']} (must be >= 0).",
    ]
    if summary["check_cases"]:
        check = summary["check_cases_mean_max_over_lb"]
        out.append(
            f"Mean max/LB on the {summary['check_cases']} cases the shared quality check scores"
            f" ({', '.join(CHECK_SHAPES)} x {', '.join(CHECK_KINDS)}): `auto` {check['auto']:.4f},"
            f" `auto_c64` {check['auto_c64']:.4f}, `deepseek` {check['deepseek']:.4f} (bar <= 1.005)."
        )
    return "\n\n".join([*out, "**Side by side with the engines' released planners**", peer_table(result)])


if __name__ == "__main__":
    main(run, markdown, __doc__)
