"""Kubernetes manifests, validated offline against the API schemas and against each other."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes the manifests target (gRPC probes GA in 1.27, PVC retention policy beta there)
# and the newest schema the installed kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Custom resources have no schema in kubernetes-validate; their structure is checked below instead.
CUSTOM_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
GRPC_PORT = 50051
METRICS_PORT = 9464


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def one(kind: str) -> dict:
    found = [doc for _, doc in manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container() -> dict:
    return one("StatefulSet")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name,doc", manifests(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_manifest_validates(name: str, doc: dict, version: str) -> None:
    if doc["kind"] in CUSTOM_KINDS:
        assert doc["apiVersion"] == CUSTOM_KINDS[doc["kind"]]
        pytest.skip(f"{doc['kind']} is not a built-in kind: no schema to validate, its structure is tested below")
    kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(one("Kustomization")["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_statefulset_has_a_state_volume_per_replica() -> None:
    statefulset = one("StatefulSet")
    claims = {c["metadata"]["name"]: c for c in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container()["env"]}
    state_mount = next(name for name, path in mounts.items() if path == env["REBALANCER_STATE_DIR"])
    assert state_mount in claims, "the state dir must live on the per-replica claim, not a shared volume"
    assert claims[state_mount]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_statefulset_serves_through_headless_service() -> None:
    statefulset, service = one("StatefulSet"), one("Service")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}


def test_probes_use_grpc_health() -> None:
    spec = container()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert spec[probe]["grpc"]["port"] == GRPC_PORT, probe
    assert spec["readinessProbe"]["grpc"]["service"] == "rebalancer.v1.RebalancerService"


def test_container_ports_and_env_match_flags() -> None:
    spec = container()
    assert {p["name"]: p["containerPort"] for p in spec["ports"]} == {
        "grpc": GRPC_PORT,
        "metrics": METRICS_PORT,
    }
    env = {e["name"]: e.get("value") for e in spec["env"]}
    assert env["REBALANCER_PORT"] == str(GRPC_PORT)
    assert env["REBALANCER_METRICS_PORT"] == str(METRICS_PORT)
    assert env["REBALANCER_HOST"] == "0.0.0.0"


def test_env_names_are_server_flags() -> None:
    """A misspelt REBALANCER_* variable is silently ignored by the server, so check them against its flags."""
    config = pytest.importorskip("rebalancer.service.config")
    flags = {"REBALANCER_" + f.name.upper() for f in dataclasses.fields(config.ServerConfig)}
    env = {e["name"] for e in container()["env"] if e["name"].startswith("REBALANCER_")}
    assert env - flags == set()


def test_gpu_resources_and_non_root() -> None:
    pod = one("StatefulSet")["spec"]["template"]["spec"]
    resources = container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == resources["limits"]["nvidia.com/gpu"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 1000
    assert container()["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["terminationGracePeriodSeconds"] >= 30


def test_pdb_selects_the_pods() -> None:
    pod_labels = one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


def test_servicemonitor_scrapes_the_metrics_port() -> None:
    monitor, service = one("ServiceMonitor"), one("Service")
    spec = monitor["spec"]
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert set(spec) <= {
        "jobLabel",
        "selector",
        "endpoints",
        "namespaceSelector",
        "targetLabels",
        "podTargetLabels",
    }
    # Rules and dashboard select job="rebalancer": the job label comes from the Service's label.
    assert service["metadata"]["labels"][spec["jobLabel"]] == "rebalancer"
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"].endswith("s")
