"""The Prometheus families the server must export, as the tests see them.

One list shared by the dashboard, alert-rule and live-scrape tests: a query in `deploy/` may only name a
series derived from a family here, and a live scrape must show every family here. Names are the ones
written in PromQL (counters with `_total`); histograms also answer to `_bucket`, `_sum` and `_count`.
"""

from __future__ import annotations

from dataclasses import dataclass

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass(frozen=True)
class Family:
    """One metric family: its Prometheus type and the labels every sample of it carries."""

    type: str
    labels: tuple[str, ...] = ()


_GRPC_METHOD_LABELS = ("grpc_type", "grpc_service", "grpc_method")

EXPECTED_FAMILIES: dict[str, Family] = {
    "rebalancer_solve_duration_seconds": Family("histogram", ("device", "path")),
    "rebalancer_batch_layers": Family("histogram"),
    "rebalancer_batch_requests": Family("histogram"),
    "rebalancer_transfer_estimated_seconds": Family("histogram"),
    "rebalancer_queue_depth": Family("gauge"),
    "rebalancer_imbalance_ratio": Family("gauge", ("deployment",)),
    "rebalancer_balancedness": Family("gauge", ("deployment", "placement")),
    "rebalancer_replicas_moved_total": Family("counter", ("deployment",)),
    "rebalancer_telemetry_reports_total": Family("counter", ("deployment", "outcome")),
    "rebalancer_placements_total": Family("counter", ("trigger",)),
    "rebalancer_solver_calls_total": Family("counter", ("path",)),
    "rebalancer_deployments": Family("gauge"),
    "rebalancer_dropped_requests_total": Family("counter", ("reason",)),
    "grpc_server_started_total": Family("counter", _GRPC_METHOD_LABELS),
    "grpc_server_handled_total": Family("counter", (*_GRPC_METHOD_LABELS, "grpc_code")),
    "grpc_server_handling_seconds": Family("histogram", _GRPC_METHOD_LABELS),
    "grpc_server_msg_received_total": Family("counter", _GRPC_METHOD_LABELS),
    "grpc_server_msg_sent_total": Family("counter", _GRPC_METHOD_LABELS),
}

# Series Prometheus itself attaches to every scrape target; rules may use them too.
SCRAPE_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


def family_of(series: str) -> str | None:
    """The family a queried series name belongs to (`x_bucket` -> `x` for histograms), or None."""
    if series in EXPECTED_FAMILIES:
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and EXPECTED_FAMILIES.get(base, Family("")).type == "histogram":
            return base
    return None


def exposition_name(family: str) -> str:
    """The name prometheus-client's text parser reports for a family (counters lose `_total`)."""
    if EXPECTED_FAMILIES[family].type == "counter":
        return family.removesuffix("_total")
    return family


def queried_series(expr: str) -> set[str]:
    """Every series name a PromQL expression selects; raises ValueError when it does not parse."""
    import promql_parser

    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            if name is None and node.matchers is not None:
                name = next((m.value for m in node.matchers.matchers if m.name == "__name__"), None)
            if name is not None:
                names.add(name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names
