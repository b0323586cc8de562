"""The Grafana dashboard: generated from one list, every query parses and names a real family."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from metric_families import EXPECTED_FAMILIES, SCRAPE_SERIES, family_of, queried_series

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "rebalancer.json"
# Values Grafana substitutes before a query reaches Prometheus; variables inside label strings stay as is.
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_dashboard", GRAFANA / "generate_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def graph_panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def as_promql(expr: str) -> str:
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def all_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = [(p["title"], t["expr"]) for p in graph_panels(dashboard) for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
            assert match, f"variable {variable['name']}: expected label_values(selector, label)"
            queries.append((f"${variable['name']}", match.group(1)))
    return queries


def test_committed_json_equals_generated() -> None:
    assert DASHBOARD.read_text() == load_generator().render(), (
        "deploy/grafana/dashboards/rebalancer.json is stale: run python deploy/grafana/generate_dashboard.py"
    )


def test_every_query_parses_and_names_known_families(dashboard: dict) -> None:
    for where, expr in all_queries(dashboard):
        series = queried_series(as_promql(expr))
        assert series, f"{where}: {expr} selects no metric"
        unknown = {s for s in series if family_of(s) is None and s not in SCRAPE_SERIES}
        assert not unknown, f"{where}: unknown metrics {unknown} in {expr}"


def test_dashboard_covers_the_rebalancer_families(dashboard: dict) -> None:
    used = {family_of(s) for _, expr in all_queries(dashboard) for s in queried_series(as_promql(expr))}
    assert set(EXPECTED_FAMILIES) - used == set()


def panel_exprs(dashboard: dict, title_word: str) -> str:
    matching = [p for p in graph_panels(dashboard) if title_word.lower() in p["title"].lower()]
    assert matching, f"no panel titled with {title_word!r}"
    return "\n".join(t["expr"] for p in matching for t in p["targets"])


def test_has_the_panels_sres_asked_for(dashboard: dict) -> None:
    latency = panel_exprs(dashboard, "solve latency")
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, " in latency and "rebalancer_solve_duration_seconds_bucket" in latency
    rpc_rate = panel_exprs(dashboard, "RPC rate")
    assert "grpc_server_handled_total" in rpc_rate and "grpc_method, grpc_code" in rpc_rate
    errors = panel_exprs(dashboard, "error ratio")
    assert 'grpc_code!="OK"' in errors and "grpc_method" in errors
    assert "rebalancer_batch_layers" in panel_exprs(dashboard, "batch layers")
    assert "rebalancer_batch_requests" in panel_exprs(dashboard, "batch requests")
    assert "rebalancer_queue_depth" in panel_exprs(dashboard, "queue depth")
    assert "rebalancer_replicas_moved_total" in panel_exprs(dashboard, "replicas moved")
    assert "rebalancer_telemetry_reports_total" in panel_exprs(dashboard, "telemetry")
    for title, family in (
        ("imbalance", "rebalancer_imbalance_ratio"),
        ("balancedness", "rebalancer_balancedness"),
    ):
        expr = panel_exprs(dashboard, title)
        assert family in expr and 'deployment=~"$deployment"' in expr and "by (deployment" in expr


def test_deployment_variable_lists_deployments(dashboard: dict) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    deployment = variables["deployment"]
    assert deployment["type"] == "query" and deployment["multi"] and deployment["includeAll"]
    assert deployment["definition"].endswith(", deployment)")
    assert variables["datasource"]["type"] == "datasource"


def test_panels_use_the_datasource_variable_and_do_not_overlap(dashboard: dict) -> None:
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_provisioning_points_at_the_dashboard_and_datasource(dashboard: dict) -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "provider.yaml").read_text())
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"]
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus"
    default = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert default["current"]["value"] == prometheus["uid"]
