"""Runs every benchmark and writes benchmarks/RESULTS.md (`make bench`; `make bench-quick` for a smoke run).

Each runs in its own spawned process under a time limit, so one that fails or hangs costs only its section.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, NamedTuple

import gpu_bench
import hostile_bench
import load
import migration_bench
import optimality_bench
import service_bench
import solver_bench
import torch

HERE = Path(__file__).resolve().parent
GPU_RESULTS = HERE / "GPU_RESULTS.md"  # kept by hand from the last lent GPU: `make bench` runs where there is none
FAILED = "**Failed** (traceback below); the other sections are unaffected.\n\n```\n{}\n```"


def fuzz_run(quick: bool = False) -> dict:
    """The totals lines of the service fuzz tests (tests/test_fuzz_service.py), run in a child pytest."""
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_fuzz_service.py"]
    done = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True, timeout=600)
    totals = [line.strip() for line in done.stdout.splitlines() if "fuzz totals" in line]
    if done.returncode != 0 or not totals:
        raise RuntimeError(f"fuzz tests failed:\n{done.stdout[-3000:]}{done.stderr[-1000:]}")
    return {"totals": totals, "outcome": done.stdout.strip().splitlines()[-1]}


def fuzz_markdown(result: dict) -> str:
    return "\n".join(f"- {line}" for line in result["totals"]) + f"\n- pytest: {result['outcome']}"


class Bench(NamedTuple):
    """One section of the report: the benchmark (a module with `run` and `markdown`), its time limit, CUDA or not."""

    title: str
    module: Any
    timeout_s: float
    needs_cuda: bool = False


BENCHES: tuple[Bench, ...] = (
    Bench("Solver: speed and quality vs the published algorithm and the engines", solver_bench, 2400),
    Bench("Migration: moved copies and next-window balance on a drifting series", migration_bench, 900),
    Bench("Optimality (MILP gap on small hard instances)", optimality_bench, 900),
    Bench("Service (gRPC round trip, batching, telemetry ingest)", service_bench, 600),
    Bench("Load (sustained traffic)", load, 300),
    Bench("Hostile clients (memory flood, lanes, deadlines, SIGTERM, cost estimates)", hostile_bench, 900),
    Bench("GPU solve", gpu_bench, 600, needs_cuda=True),
    Bench("Fuzzing (malformed requests and reports)", SimpleNamespace(run=fuzz_run, markdown=fuzz_markdown), 700),
)


def machine(load_before: Sequence[float], load_after: Sequence[float]) -> list[str]:
    """What the figures were measured on; the load average says whether other jobs shared the CPUs."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    averages = [", ".join(f"{v:.2f}" for v in loads) for loads in (load_before, load_after)]
    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} cores; GPU: {gpu}; Python {platform.python_version()}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op threads in the benchmark process; CPU solves"
        f" run on REBALANCER_CPU_THREADS = {os.environ.get('REBALANCER_CPU_THREADS', '1 (default)')} thread(s)",
        f"- Load average (1/5/15 min) before: {averages[0]}; after: {averages[1]}",
    ]
    if max(load_before[0], load_after[0]) > 1.0:
        lines.append(
            "- **The machine was shared with other jobs during this run**: absolute times are noisy (2-5x swings);"
            " timings are therefore ratios to a planner measured interleaved in the same run, with min-of-N times."
        )
    return lines


def _child(title: str, quick: bool, sender: Connection) -> None:
    """Runs in a spawned process: run and format the bench of `title`, send back (status, text, result)."""
    try:
        module = next(bench.module for bench in BENCHES if bench.title == title)
        result = module.run(quick)
        sender.send(("ok", module.markdown(result), result))
    except Exception:
        sender.send(("failed", traceback.format_exc(limit=8), None))


def run_bench(bench: Bench, quick: bool) -> dict:
    """One benchmark in a child process with its time limit; never raises."""
    if bench.needs_cuda and not torch.cuda.is_available():
        last = "; the last GPU figures are in benchmarks/GPU_RESULTS.md" if GPU_RESULTS.exists() else ""
        return {"status": "skipped", "text": f"no CUDA device on this machine{last}", "seconds": 0.0}
    context, started, outcome = multiprocessing.get_context("spawn"), time.perf_counter(), None
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(bench.title, quick, sender))
    process.start()
    sender.close()  # only the child holds it now: a child that dies without a word leaves the pipe at EOF
    if not receiver.poll(bench.timeout_s):
        process.terminate()
        outcome = ("timeout", f"no result within {bench.timeout_s:.0f} s", None)
    with contextlib.suppress(EOFError):
        outcome = outcome or receiver.recv()
    process.join(30)
    outcome = outcome or ("failed", f"child exited with code {process.exitcode}", None)
    return dict(zip(("status", "text", "result"), outcome, strict=True)) | {"seconds": time.perf_counter() - started}


def headline(sections: dict) -> list[str]:
    """The few figures a reader wants first, from the solver, migration and optimality results."""
    solver, migration, optimality = (sections[bench.title].get("result") for bench in BENCHES[:3])
    lines = []
    if solver:
        speed, summary, cases = solver["speed"], solver["summary"], solver["cases"]
        auto, deepseek = summary["auto"], summary["deepseek"]
        lines.append(
            f"- Speed, {speed['shape']} zipf, default `auto` on CPU: {speed['ratio_vs_deepseek_median']:.2f}x the"
            f" `deepseek` policy, {speed['ratio_vs_published_lists_median']:.2f}x the published loops over Python"
            f" floats, {speed['ratio_vs_published_median']:.2f}x the published code verbatim."
        )
        if solver["peer_labels"]:
            vllm, rows = solver["peer_labels"][0], solver_bench.peer_rows(solver)
            ratios = {row["shape"]: row["geomean_time_ratio"] for row in rows if row["label"] == "auto"}
            worst = max(ratios, key=ratios.__getitem__)
            lines.append(
                f"- `auto` / {vllm} time per shape, same run (geomean over kinds): {min(ratios.values()):.2f}x to"
                f" {ratios[worst]:.2f}x ({worst}); mean balancedness {auto['mean_balancedness']:.4f} vs"
                f" {summary[vllm]['mean_balancedness']:.4f}."
            )
        lines.append(
            f"- Quality over {len(cases)} shape x kind cases: mean balancedness `auto` {auto['mean_balancedness']:.4f}"
            f" vs `deepseek` {deepseek['mean_balancedness']:.4f}; mean max/LB `auto` {auto['mean_max_over_lb']:.4f}"
            f" vs `deepseek` {deepseek['mean_max_over_lb']:.4f}; worst `auto` minus best reference"
            f" {summary['auto_worst_minus_best_reference']:+.5f} ({summary['auto_worst_case']})."
        )
    if optimality and optimality["summary"]["auto_proven"]["count"]:
        d = optimality["summary"]["auto_proven"]
        lines.append(
            f"- MILP gap of `auto` on {d['count']} proven optima: mean {d['mean']:.3f} %, p50 {d['p50']:.3f} %,"
            f" p90 {d['p90']:.3f} %, worst {d['worst']:.3f} % (optimal on {d['exact']})."
        )
        two = optimality["summary"].get("auto_two_slot_enumerated", {})
        if two.get("count"):
            lines.append(
                f"- Of those, {two['count']} two-slot layers beyond the count table (proven by enumeration):"
                f" mean {two['mean']:.3f} %, worst {two['worst']:.3f} % (optimal on {two['exact']})."
            )
    for label in ("auto_prev", "auto_prev_hist") if migration else ():
        t = migration["totals"][label]
        lines.append(
            f"- Migration `{label}`: {t['moves_ratio_vs_deepseek_global']:.3f}x the reference's moved copies,"
            f" next-window balancedness {t['balancedness_delta_vs_deepseek_global']:+.4f} vs the reference,"
            f" estimated transfer time {t['transfer_ratio_vs_deepseek_global']:.3f}x."
        )
    spread = migration.get("seed_spread") if migration else None
    if spread:
        delta = "balancedness_delta_vs_deepseek_global"
        lines.append(
            f"- Migration `auto_prev` over {len(spread['per_seed'])} solver seeds x {len(spread['series'])} series per"
            f" shape: moved copies {spread['moves_ratio_vs_deepseek_global_mean']:.3f}x, next-window balancedness"
            f" {spread[delta + '_mean']:+.5f} +- {spread[delta + '_sd']:.5f} (sd) vs the reference."
        )
    return lines


def render(sections: dict, quick: bool, load_before: Sequence[float], total_seconds: float) -> str:
    now, flag = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), " --quick" if quick else ""
    out = ["# Benchmark results", "", f"Generated {now} by `benchmarks/report.py{flag}` in {total_seconds / 60:.1f}"]
    out[-1] += " min. **Quick run: fewer shapes, kinds and repeats; not the reference figures.**" if quick else " min."
    out += ["", "## Machine", "", *machine(load_before, os.getloadavg()), "", "## Reproduce", "", "```"]
    out += [f".venv/bin/python benchmarks/report.py{flag}   # writes this file"]
    scripts = [b.module.__name__ for b in BENCHES if isinstance(b.module, ModuleType) and not b.needs_cuda]
    out += [f".venv/bin/python benchmarks/{script}.py" for script in scripts] + ["```"]
    try:
        lines = headline(sections)
    except Exception as error:  # a headline bug must not cost the figures below it
        lines = [f"- (headline failed: {type(error).__name__}: {error})"]
    out += ["", "## Headline", "", *lines, ""]
    for title, result in sections.items():
        body = result["text"] if result["status"] == "ok" else f"Not run ({result['status']}): {result['text']}."
        if result["status"] == "failed":
            body = FAILED.format(result["text"].rstrip())
        out += [f"## {title}", "", body, "", f"_{result['seconds']:.0f} s_", ""]
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes, kinds and repeats (smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="markdown file to write")
    args = parser.parse_args()
    load_before, started, sections = os.getloadavg(), time.perf_counter(), {}
    for bench in BENCHES:
        sections[bench.title] = result = run_bench(bench, args.quick)
        print(f"{bench.title}: {result['status']} in {result['seconds']:.0f} s", flush=True)
    args.out.write_text(render(sections, args.quick, load_before, time.perf_counter() - started))


if __name__ == "__main__":
    main()
