"""What the benchmarks share: markdown tables, interleaved timing and the command line.

A benchmark module offers `run(quick: bool, ...) -> dict` and `markdown(result) -> str`; `report.py` lists
them and `main` gives each the same `python benchmarks/<name>.py [--quick] [--flag V]` entry point.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence


def table(head: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def filled(head: str, row: str, items: Iterable[Mapping[str, object]]) -> str:
    """A markdown table of fixed columns: `head` names them ("a | b"), `row` formats one item ("{a} | {b:.3f}")."""
    return table(head.split(" | "), ([row.format_map(item)] for item in items))


def timed(call: Callable[..., object], *args: object, **kwargs: object) -> tuple[object, float]:
    """(what `call` returns, seconds it took)."""
    started = time.perf_counter()
    return call(*args, **kwargs), time.perf_counter() - started


def interleaved_times(
    calls: dict[str, Callable[[], object]],
    rounds: int,
    *,
    min_s: float = 0.0,
    max_s: float = math.inf,
    max_rounds: int = 0,
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Every call in at least `rounds` rounds (more until `min_s`, up to `max_rounds`, none after `max_s`), order
    rotated: interleaved calls see the same 2-5x drift of a shared machine, so ratios survive it. Returns
    (label -> seconds per round, label -> last result)."""
    times: dict[str, list[float]] = {label: [] for label in calls}
    results: dict[str, object] = {}
    labels, started = list(calls), time.perf_counter()
    for index in range(max(rounds, max_rounds)):
        elapsed = time.perf_counter() - started
        if index and (elapsed > max_s or (index >= rounds and elapsed > min_s)):
            break
        for label in labels[index % len(labels) :] + labels[: index % len(labels)]:
            results[label], seconds = timed(calls[label])
            times[label].append(seconds)
    return times, results


def main(run: Callable[..., dict], markdown: Callable[[dict], str], doc: str, **flags: object) -> None:
    """`--quick` and a flag per keyword (typed by its value, passed on only when given); prints the markdown."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats (smoke run)")
    for name, default in flags.items():
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, dest=name, type=type(default), default=argparse.SUPPRESS, help=f"default {default}")
    print(markdown(run(**vars(parser.parse_args()))))
