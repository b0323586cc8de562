"""Run every benchmark and write `benchmarks/RESULTS.md`: the figures of SPEC §8 with the machine they came from.

Timings only mean something next to the machine, the date and the load it ran under, so the file starts
with those and the exact commands to reproduce it. The solver and migration benches run in this process;
the benches other people own (service, optimality, load, GPU) run in a child process each, with short
settings and a time limit, so one that fails or hangs is reported as such instead of losing the report.

Run: `python benchmarks/report.py [--quick] [--out PATH]` (`--quick`: fewer shapes, kinds and repeats).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import importlib.util
import inspect
import io
import multiprocessing
import os
import platform
import queue as queue_module
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import migration_bench  # noqa: E402
import solver_bench  # noqa: E402

DEFAULT_OUT = HERE / "RESULTS.md"


@dataclass(frozen=True)
class External:
    """A bench module owned by someone else: its `run` keyword arguments (full, quick) and a time limit."""

    module: str
    title: str
    full: dict
    quick: dict
    timeout_s: float
    needs_cuda: bool = False


EXTERNALS: tuple[External, ...] = (
    External(
        "optimality_bench",
        "Optimality (MILP gap on small instances)",
        {"time_limit": 20.0, "save": False},
        {"time_limit": 2.0, "save": False},
        900,
    ),
    External(
        "service_bench",
        "Service (gRPC round trip, batching, telemetry ingest)",
        {"repeats": 5, "concurrent_repeats": 2, "reports": 500},
        {"repeats": 2, "concurrent_repeats": 1, "reports": 100},
        600,
    ),
    External("load", "Load (sustained traffic)", {"duration_s": 30.0}, {"duration_s": 5.0}, 300),
    External("gpu_bench", "GPU solve", {"runs": 50}, {"runs": 10}, 600, needs_cuda=True),
)


def machine() -> dict:
    """What the figures were measured on; the load average says whether other jobs shared the CPUs."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "solver_cpu_threads": os.environ.get("REBALANCER_CPU_THREADS", "1 (default)"),
        "gpu": gpu,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def _accepted(function: Callable, kwargs: dict) -> dict:
    """The subset of `kwargs` that `function` accepts, so a changed signature degrades instead of failing."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(kwargs)
    return {key: value for key, value in kwargs.items() if key in parameters}


def _markdown_of(module, result: object) -> str:
    """The module's own formatting when it has one, else a generic figure | value table."""
    for name in ("format_tables", "format_table"):
        if callable(getattr(module, name, None)):
            return getattr(module, name)(result)
    if callable(getattr(module, "print_table", None)):
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            module.print_table(result)
        return "```\n" + captured.getvalue().rstrip() + "\n```"
    return generic_table(result)


def generic_table(result: object) -> str:
    """Flatten a nested dict into `figure | value` rows (lists are shown inline)."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, float):
            rows.append((prefix, f"{value:.4g}"))
        else:
            rows.append((prefix, str(value)))

    walk("", result)
    return "\n".join(["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _child(module_name: str, kwargs: dict, queue) -> None:
    """Runs in a spawned process: import, run, format, send back (status, markdown, seconds)."""
    started = time.perf_counter()
    try:
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        module = importlib.import_module(module_name)
        if callable(getattr(module, "run", None)):
            result = module.run(**_accepted(module.run, kwargs))
            text = _markdown_of(module, result)
        else:
            text = _run_main_with_out(module, kwargs)
        queue.put(("ok", text, time.perf_counter() - started))
    except Exception:
        queue.put(("failed", traceback.format_exc(limit=6), time.perf_counter() - started))


def _run_main_with_out(module, kwargs: dict) -> str:
    """For a bench with only a CLI `main()` that accepts `--out FILE` (gpu_bench): run it and read the file."""
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".md") as out:
        argv = [module.__file__, "--out", out.name] + [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
        saved = sys.argv
        sys.argv = argv
        try:
            module.main()
        finally:
            sys.argv = saved
        return Path(out.name).read_text()


def run_external(bench: External, quick: bool) -> dict:
    """Run one external bench in a child process with its time limit; never raises."""
    if bench.needs_cuda and not torch.cuda.is_available():
        return {"status": "skipped", "text": "no CUDA device on this machine", "seconds": 0.0}
    if importlib.util.find_spec(bench.module) is None:
        return {"status": "missing", "text": f"`benchmarks/{bench.module}.py` does not exist yet", "seconds": 0.0}
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(bench.module, bench.quick if quick else bench.full, results))
    started = time.perf_counter()
    process.start()
    deadline = started + bench.timeout_s
    # Poll rather than block on the queue, so a child that dies without a word is noticed at once.
    while True:
        try:
            status, text, seconds = results.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not process.is_alive():
                return {
                    "status": "failed",
                    "text": f"child exited with code {process.exitcode}",
                    "seconds": time.perf_counter() - started,
                }
            if time.perf_counter() > deadline:
                process.terminate()
                process.join(10)
                return {
                    "status": "timeout",
                    "text": f"no result within {bench.timeout_s:.0f} s",
                    "seconds": bench.timeout_s,
                }
    process.join(30)
    return {"status": status, "text": text, "seconds": seconds}


def collect(quick: bool, externals: Sequence[External] = EXTERNALS) -> dict:
    """Every bench's figures and markdown, in report order."""
    sections: dict[str, dict] = {}
    started = time.perf_counter()
    if quick:
        solver = solver_bench.run(solver_bench.QUICK_SHAPES, solver_bench.QUICK_KINDS, repeats=1, speed_runs=3)
    else:
        solver = solver_bench.run(repeats=3, speed_runs=5)
    sections["Solver: speed and quality vs the published algorithm"] = {
        "status": "ok",
        "text": solver_bench.format_tables(solver),
        "seconds": time.perf_counter() - started,
        "result": solver,
    }
    started = time.perf_counter()
    migration = migration_bench.run(shape="qwen3_235b", windows=5, seeds=(21,)) if quick else migration_bench.run()
    sections["Migration: moved copies and next-window balance on a drifting series"] = {
        "status": "ok",
        "text": migration_bench.format_tables(migration),
        "seconds": time.perf_counter() - started,
        "result": migration,
    }
    for bench in externals:
        sections[bench.title] = run_external(bench, quick)
    sections["Fuzzing (malformed requests and reports)"] = fuzz_totals()
    return sections


def fuzz_totals() -> dict:
    """The totals line of the service fuzz tests (tests/test_fuzz_service.py), run in a child pytest."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_fuzz_service.py"]
    done = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True, timeout=600)
    totals = [line.strip() for line in done.stdout.splitlines() if "fuzz totals" in line]
    outcome = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()[-300:]
    if done.returncode != 0 or not totals:
        return {
            "status": "failed",
            "text": done.stdout[-3000:] + done.stderr[-1000:],
            "seconds": time.perf_counter() - started,
        }
    text = "\n".join(f"- {line}" for line in totals) + f"\n- pytest: {outcome}"
    return {"status": "ok", "text": text, "seconds": time.perf_counter() - started}


def headline(sections: dict) -> list[str]:
    """The few figures a reader wants first, pulled from the solver and migration results."""
    lines: list[str] = []
    solver = next((s["result"] for s in sections.values() if "result" in s and "cases" in s["result"]), None)
    migration = next((s["result"] for s in sections.values() if "result" in s and "totals" in s["result"]), None)
    if solver:
        summary = solver["summary"]
        speed = solver.get("speed")
        if speed:
            lines.append(
                f"- Speed, {speed['shape']} zipf, default `auto` on CPU: {speed['ratio_vs_deepseek_median']:.2f}x the"
                f" `deepseek` policy, {speed['ratio_vs_published_lists_median']:.2f}x the published loops over Python"
                f" floats, {speed['ratio_vs_published_median']:.2f}x the published code verbatim (bar <= 1.0 vs the"
                " reference)."
            )
        lines.append(
            f"- Quality over {len(solver['cases'])} shape x kind cases: mean balancedness `auto`"
            f" {summary['auto']['mean_balancedness']:.4f} vs `deepseek` {summary['deepseek']['mean_balancedness']:.4f};"
            f" mean max/LB `auto` {summary['auto']['mean_max_over_lb']:.4f} vs `deepseek`"
            f" {summary['deepseek']['mean_max_over_lb']:.4f}; worst `auto` minus best reference"
            f" {summary['auto_worst_minus_best_reference']:+.5f} ({summary['auto_worst_case']})."
        )
        if summary.get("check_cases"):
            lines.append(
                f"- Mean max/LB on the {summary['check_cases']} cases the shared quality check scores: `auto`"
                f" {summary['check_cases_mean_max_over_lb']['auto']:.4f} (bar <= 1.005), `deepseek`"
                f" {summary['check_cases_mean_max_over_lb']['deepseek']:.4f}."
            )
    if migration:
        totals = migration["totals"]
        for label in ("auto_prev", "auto_prev_hist"):
            t = totals[label]
            lines.append(
                f"- Migration `{label}`: {t['moves_ratio_vs_deepseek_global']:.3f}x the reference's moved copies"
                f" (bar <= 0.25x, aim 0.1x), next-window balancedness {t['balancedness_delta_vs_deepseek_global']:+.4f}"
                " vs the reference (bar >= -0.005)."
            )
        for pair, h in migration["history_effect"].items():
            lines.append(
                f"- History effect `{pair}`: {h['mean_diff']:+.5f} +- {h['stderr']:.5f} (s.e.), positive on"
                f" {h['runs_positive']}/{len(h['per_run_mean'])} shape x seed runs."
            )
    return lines


def render(sections: dict, info: dict, quick: bool, load_after: tuple[float, ...], total_seconds: float) -> str:
    """The whole RESULTS.md."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = info["load_average"]
    shared = max(load_before[0], load_after[0]) > 1.0  # more than one of the cores busy with other work
    flag = " --quick" if quick else ""
    out = [
        "# Benchmark results",
        "",
        f"Generated {now} by `benchmarks/report.py{flag}` in {total_seconds / 60:.1f} min."
        + (" **Quick run: fewer shapes, kinds and repeats; not the reference figures.**" if quick else ""),
        "",
        "## Machine",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores",
        f"- torch {info['torch']}, {info['torch_threads']} intra-op threads in the benchmark process; the solver runs"
        f" CPU solves on REBALANCER_CPU_THREADS = {info['solver_cpu_threads']} thread(s)",
        f"- GPU: {info['gpu']}",
        f"- Python {info['python']}",
        f"- Load average (1/5/15 min) before: {', '.join(f'{v:.2f}' for v in load_before)};"
        f" after: {', '.join(f'{v:.2f}' for v in load_after)}",
    ]
    if shared:
        out.append(
            "- **The machine was shared with other jobs during this run**: absolute times are noisy (2-5x swings);"
            " every timing is therefore a ratio to the `deepseek` policy measured interleaved in the same run,"
            " with min-of-N times."
        )
    out += [
        "",
        "## Reproduce",
        "",
        "```",
        f".venv/bin/python benchmarks/report.py{flag}        # everything below, writes this file",
        ".venv/bin/python benchmarks/solver_bench.py          # solver speed and quality tables",
        ".venv/bin/python benchmarks/migration_bench.py       # migration / history tables",
        ".venv/bin/python benchmarks/optimality_bench.py      # MILP gaps",
        ".venv/bin/python benchmarks/service_bench.py         # service figures",
        "```",
        "",
        "## Headline",
        "",
        *headline(sections),
        "",
    ]
    for title, section in sections.items():
        out += [f"## {title}", ""]
        if section["status"] == "ok":
            out.append(section["text"])
        elif section["status"] == "failed":
            out += [
                "**Failed** (traceback below); the other sections are unaffected.",
                "",
                "```",
                section["text"].rstrip(),
                "```",
            ]
        else:
            out.append(f"Not run ({section['status']}): {section['text']}.")
        out += ["", f"_{section['seconds']:.0f} s_", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes, kinds and repeats (smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"markdown file to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    info = machine()
    started = time.perf_counter()
    sections = collect(args.quick)
    text = render(sections, info, args.quick, os.getloadavg(), time.perf_counter() - started)
    args.out.write_text(text)
    print(text)
    return args.out


if __name__ == "__main__":
    main()
