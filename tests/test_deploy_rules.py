"""Prometheus scrape config and alert rules: structure, PromQL, metric names, promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from metric_families import SCRAPE_SERIES, family_of, queried_series

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules.yaml"
# The situations SREs asked to be paged or warned about, by alert name.
REQUIRED_ALERTS = {
    "RebalancerImbalanceHigh",
    "RebalancerSolveLatencyHigh",
    "RebalancerGrpcErrorRatioHigh",
    "RebalancerTelemetryStopped",
    "RebalancerDown",
}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        reason = "promtool not installed (apt-get install -y prometheus); promtool checks skipped"
        print(reason)
        pytest.skip(reason)
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)


def test_rule_file_structure() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert len({g["name"] for g in groups}) == len(groups)
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule.get("alert")
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])
        assert rule["for"].endswith("m")
    assert {r["alert"] for r in rules()} >= REQUIRED_ALERTS


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_rule_expr_parses_and_names_known_families(rule: dict) -> None:
    series = queried_series(rule["expr"])
    unknown = {s for s in series if family_of(s) is None and s not in SCRAPE_SERIES}
    assert not unknown, f"{rule['alert']}: unknown metrics {unknown}"


def test_imbalance_alert_is_per_deployment() -> None:
    (imbalance,) = (r for r in rules() if r["alert"] == "RebalancerImbalanceHigh")
    assert "by (deployment)" in imbalance["expr"]


def test_scrape_config_targets_the_metrics_port_and_loads_rules() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yaml").read_text())
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).is_file(), f"rule file {rule_file} (relative to the config) is missing"
    (job,) = (j for j in config["scrape_configs"] if j["job_name"] == "rebalancer")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets and all(t.endswith(":9464") for t in targets)


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests() -> None:
    """The alerts fire on the situations they name, and only there (rules.test.yaml)."""
    result = promtool("test", "rules", str(PROMETHEUS / "rules.test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
