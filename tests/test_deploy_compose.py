"""The local monitoring stack (deploy/compose.yaml): no Docker engine here, so its wiring is checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "compose.yaml"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def bind_mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path (resolved against deploy/) of every bind mount of a service."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def published(service: dict) -> set[int]:
    return {int(str(p).split(":")[0]) for p in service.get("ports", [])}


def test_stack_has_server_prometheus_grafana(services: dict) -> None:
    assert {"server", "prometheus", "grafana"} <= set(services)


def test_server_builds_the_image_and_keeps_state(services: dict) -> None:
    server = services["server"]
    context = (DEPLOY / server["build"]["context"]).resolve()
    assert (context / server["build"].get("dockerfile", "Dockerfile")).is_file()
    assert {50051, 9464} <= published(server)
    assert any(v.endswith(":/var/lib/rebalancer") for v in server["volumes"]), "state dir on a named volume"


def test_server_env_names_are_server_flags(services: dict) -> None:
    config = pytest.importorskip("rebalancer.service.config")
    flags = {"REBALANCER_" + f.name.upper() for f in dataclasses.fields(config.ServerConfig)}
    overlay = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["server"]
    for environment in (services["server"]["environment"], overlay["environment"]):
        assert set(environment) - flags == set()


def test_every_bind_mount_exists_in_the_repository(services: dict) -> None:
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) is not in the repository"


def test_prometheus_mounts_config_and_rules(services: dict) -> None:
    prometheus = services["prometheus"]
    mounts = bind_mounts(prometheus)
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    assert mounts[config_path] == DEPLOY / "prometheus" / "prometheus.yaml"
    config = yaml.safe_load(mounts[config_path].read_text())
    for rule_file in config["rule_files"]:
        in_container = str(Path(config_path).parent / rule_file)
        assert mounts.get(in_container) == DEPLOY / "prometheus" / rule_file, f"{rule_file} not mounted"
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "server:9464" in targets, "Prometheus scrapes the compose service by name"
    assert 9090 in published(prometheus)


def test_grafana_mounts_provisioning_and_dashboards(services: dict) -> None:
    grafana = services["grafana"]
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/provider.yaml").read_text())
    dashboards_in_container = provider["providers"][0]["options"]["path"]
    assert (mounts[dashboards_in_container] / "rebalancer.json").is_file()
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert 3000 in published(grafana)


def test_gpu_overlay_reserves_one_nvidia_device() -> None:
    overlay = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["server"]
    (device,) = overlay["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
