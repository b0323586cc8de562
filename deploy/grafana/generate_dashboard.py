"""Generate `dashboards/rebalancer.json`, the Grafana dashboard of the rebalancer service.

The dashboard is written from the one list of panels below so that every query lives in Python, where
the tests parse it and check each metric name against the families the server exports. Edit the list,
then run `python deploy/grafana/generate_dashboard.py` (or `--check` to fail when the JSON is stale).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

DASHBOARD_PATH = Path(__file__).resolve().parent / "dashboards" / "rebalancer.json"
DASHBOARD_UID = "moe-rebalancer"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Selector shared by every rebalancer query: the replicas chosen in the `instance` variable.
ON_INSTANCE = 'instance=~"$instance"'
ON_DEPLOYMENT = f'{ON_INSTANCE}, deployment=~"$deployment"'
RPC = f'{ON_INSTANCE}, grpc_service="rebalancer.v1.RebalancerService"'
RPC_FAILED = f'{RPC}, grpc_code!="OK"'
WINDOW = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel and the legend Grafana draws for it."""

    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """A panel: what it shows, its unit, and where it sits on the 24-column grid."""

    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """A collapsible group of panels."""

    title: str
    panels: tuple[Panel, ...]


def rate(series: str, selector: str) -> str:
    """Per-second rate of a counter (or histogram part) over the dashboard's rate window."""
    return f"rate({series}{{{selector}}}[{WINDOW}])"


def quantiles(bucket: str, selector: str, by: str, legend_prefix: str = "") -> tuple[Query, ...]:
    """p50/p90/p99 of a histogram over the dashboard's rate window."""
    group = ", ".join(["le", *filter(None, [by])])
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) ({rate(bucket, selector)}))",
            f"{legend_prefix}p{int(q * 100)}",
        )
        for q in (0.5, 0.9, 0.99)
    )


def mean_of(family: str, selector: str) -> Query:
    """Mean of a histogram's observations over the rate window."""
    return Query(
        f"sum({rate(family + '_sum', selector)}) / sum({rate(family + '_count', selector)})",
        "mean",
    )


ROWS: tuple[Row, ...] = (
    Row(
        "Overview",
        (
            Panel(
                "Deployments",
                "Deployments known to the selected replicas.",
                (Query(f"sum(rebalancer_deployments{{{ON_INSTANCE}}})", "deployments"),),
                kind="stat",
                width=6,
                height=4,
            ),
            Panel(
                "Replicas up",
                "Scrape targets of the rebalancer job that answer.",
                (Query(f'sum(up{{job="rebalancer", {ON_INSTANCE}}})', "up"),),
                kind="stat",
                width=6,
                height=4,
            ),
            Panel(
                "Placements / min",
                "Placements committed, by who asked: a Rebalance call or the auto-rebalancer.",
                (
                    Query(
                        f"sum by (trigger) ({rate('rebalancer_placements_total', ON_INSTANCE)}) * 60",
                        "{{trigger}}",
                    ),
                ),
                kind="stat",
                width=6,
                height=4,
            ),
            Panel(
                "Replicas moved per placement",
                "Expert copies GPUs had to receive, per committed placement: the migration cost.",
                (
                    Query(
                        f"sum({rate('rebalancer_replicas_moved_total', ON_INSTANCE)})"
                        f" / sum({rate('rebalancer_placements_total', ON_INSTANCE)})",
                        "moved / placement",
                    ),
                ),
                kind="stat",
                width=6,
                height=4,
            ),
        ),
    ),
    Row(
        "Solver",
        (
            Panel(
                "Solve latency",
                "Seconds per solver call (one batch of layers), p50/p90/p99 by device.",
                quantiles("rebalancer_solve_duration_seconds_bucket", ON_INSTANCE, "device", "{{device}} "),
                unit="s",
            ),
            Panel(
                "Solver calls / s",
                "Solver calls by implementation path (torch or triton).",
                (
                    Query(
                        f"sum by (path) ({rate('rebalancer_solver_calls_total', ON_INSTANCE)})",
                        "{{path}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Batch layers",
                "Layers per solver call; large batches mean coalescing works.",
                (
                    *quantiles("rebalancer_batch_layers_bucket", ON_INSTANCE, ""),
                    mean_of("rebalancer_batch_layers", ON_INSTANCE),
                ),
                width=8,
            ),
            Panel(
                "Batch requests",
                "Requests coalesced into one solver call.",
                (
                    *quantiles("rebalancer_batch_requests_bucket", ON_INSTANCE, ""),
                    mean_of("rebalancer_batch_requests", ON_INSTANCE),
                ),
                width=8,
            ),
            Panel(
                "Queue depth",
                "Requests waiting for the solver worker, per replica.",
                (Query(f"sum by (instance) (rebalancer_queue_depth{{{ON_INSTANCE}}})", "{{instance}}"),),
                width=8,
            ),
            Panel(
                "Dropped requests",
                "Requests never solved because the caller cancelled or their deadline passed while queued.",
                (
                    Query(
                        f"sum by (reason) ({rate('rebalancer_dropped_requests_total', ON_INSTANCE)})",
                        "{{reason}}",
                    ),
                ),
                unit="reqps",
                width=8,
            ),
        ),
    ),
    Row(
        "RPC",
        (
            Panel(
                "RPC rate by method and code",
                "Finished RPCs per second.",
                (
                    Query(
                        f"sum by (grpc_method, grpc_code) ({rate('grpc_server_handled_total', RPC)})",
                        "{{grpc_method}} {{grpc_code}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "RPC error ratio by method and code",
                "Share of each method's RPCs that ended with a non-OK code.",
                (
                    Query(
                        "sum by (grpc_method, grpc_code) "
                        f"({rate('grpc_server_handled_total', RPC_FAILED)})"
                        " / ignoring (grpc_code) group_left "
                        f"sum by (grpc_method) ({rate('grpc_server_handled_total', RPC)})",
                        "{{grpc_method}} {{grpc_code}}",
                    ),
                ),
                unit="percentunit",
            ),
            Panel(
                "RPC latency p99 by method",
                "Server-side handling time; streams count from open to close.",
                (
                    Query(
                        "histogram_quantile(0.99, sum by (le, grpc_method) "
                        f"({rate('grpc_server_handling_seconds_bucket', RPC)}))",
                        "{{grpc_method}}",
                    ),
                ),
                unit="s",
                width=8,
            ),
            Panel(
                "Stream messages / s",
                "Messages received and sent on streaming RPCs (telemetry in, placements out).",
                (
                    Query(
                        f"sum by (grpc_method) ({rate('grpc_server_msg_received_total', RPC)})",
                        "{{grpc_method}} received",
                    ),
                    Query(
                        f"sum by (grpc_method) ({rate('grpc_server_msg_sent_total', RPC)})",
                        "{{grpc_method}} sent",
                    ),
                ),
                unit="ops",
                width=8,
            ),
            Panel(
                "Open RPCs",
                "RPCs started but not finished: mostly telemetry and watch streams held by controllers.",
                (
                    Query(
                        f"sum by (grpc_method) (grpc_server_started_total{{{RPC}}})"
                        f" - sum by (grpc_method) (grpc_server_handled_total{{{RPC}}})",
                        "{{grpc_method}}",
                    ),
                ),
                width=8,
            ),
        ),
    ),
    Row(
        "Deployments",
        (
            Panel(
                "Imbalance ratio",
                "Max / mean GPU load of the placement in force on the telemetry window (1 is perfect).",
                (
                    Query(
                        f"max by (deployment) (rebalancer_imbalance_ratio{{{ON_DEPLOYMENT}}})",
                        "{{deployment}}",
                    ),
                ),
            ),
            Panel(
                "Balancedness",
                "Mean / max GPU load of the current and the proposed placement (1 is perfect).",
                (
                    Query(
                        f"max by (deployment, placement) (rebalancer_balancedness{{{ON_DEPLOYMENT}}})",
                        "{{deployment}} {{placement}}",
                    ),
                ),
                unit="percentunit",
            ),
            Panel(
                "Replicas moved",
                "Expert copies shipped between GPUs by new placements, per deployment.",
                (
                    Query(
                        f"sum by (deployment) (increase(rebalancer_replicas_moved_total{{{ON_DEPLOYMENT}}}[{WINDOW}]))",
                        "{{deployment}}",
                    ),
                ),
                options={"drawStyle": "bars"},
            ),
            Panel(
                "Estimated rearrangement time",
                "Time the engines need to ship each plan's expert copies (cost model: busiest GPU on the slower"
                " link class), quantiles over plans made from a placement in force.",
                quantiles("rebalancer_transfer_estimated_seconds_bucket", ON_INSTANCE, ""),
                unit="s",
            ),
            Panel(
                "Telemetry reports / s",
                "Load reports per deployment, accepted and rejected.",
                (
                    Query(
                        f"sum by (deployment, outcome) ({rate('rebalancer_telemetry_reports_total', ON_DEPLOYMENT)})",
                        "{{deployment}} {{outcome}}",
                    ),
                ),
                unit="ops",
            ),
        ),
    ),
)


def template_variables() -> list[dict]:
    """Datasource, replica and deployment pickers; `deployment` filters the per-deployment panels."""

    def query_variable(name: str, label: str, query: str) -> dict:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-variable"},
            "definition": query,
            "refresh": 2,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }

    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
        },
        query_variable("instance", "Replica", 'label_values(rebalancer_deployments{job="rebalancer"}, instance)'),
        query_variable(
            "deployment",
            "Deployment",
            'label_values(rebalancer_imbalance_ratio{instance=~"$instance"}, deployment)',
        ),
    ]


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    """One Grafana panel with its targets, placed at (x, y)."""
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
    custom.update(panel.options)
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit, "custom": custom if panel.kind == "timeseries" else {}}},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}}
        if panel.kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend}
            for i, q in enumerate(panel.queries)
        ],
    }


def build_dashboard() -> dict:
    """The whole dashboard as a JSON-ready dict; rows stack vertically, panels flow left to right."""
    panels: list[dict] = []
    panel_id = 1
    y = 0
    for row in ROWS:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        panel_id += 1
        y += 1
        x = 0
        line_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, line_height = 0, y + line_height, 0
            panels.append(panel_json(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return {
        "uid": DASHBOARD_UID,
        "title": "MoE rebalancer",
        "description": "Solve latency, batching, RPCs and per-deployment balance of the rebalancer service.",
        "tags": ["moe", "rebalancer"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": template_variables()},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> str:
    """The dashboard as the exact text committed to the repository."""
    return json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed JSON is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DASHBOARD_PATH.exists() or DASHBOARD_PATH.read_text() != text:
            print(f"{DASHBOARD_PATH} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    DASHBOARD_PATH.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD_PATH.write_text(text)
    print(f"wrote {DASHBOARD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
