"""Security (issue 7): optional TLS and mutual TLS on the gRPC port, bearer-token auth checked by an
interceptor (health stays open, everything else, reflection included, needs the token), a metrics port
that binds to its own address, and no secret in help, reprs or logs.

Certificates are generated per test session with `cryptography`: a CA, a server certificate for
localhost/127.0.0.1 and client certificates from that CA and from a stranger CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rebalancer.service.config import ServerConfig, parse_args
from rebalancer.service.security import SecurityConfigError
from rebalancer_client import RebalancerClient
from rebalancer_client.cli import main as cli_main
from rebalancer_wire.v1 import rebalancer_pb2 as pb
from rebalancer_wire.v1 import rebalancer_pb2_grpc
from service_harness import (
    GPUS,
    GROUPS,
    NODES,
    REPLICAS,
    TOPOLOGY,
    ServerThread,
    free_port,
    launch_local,
    report,
    skewed_loads,
    wait_serving,
)

TOKEN = "tok-9f8e7d6c5b4a39281706f5e4d3c2b1a0"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: str, issuer_key, *, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key, stranger_ca_key = _key(), _key()
    ca = _cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    return Pki(
        ca=_write(root / "ca.pem", ca),
        server_cert=_write(root / "server.pem", _cert("localhost", server_key, "test-ca", ca_key, server=True)),
        server_key=_write(root / "server.key", key=server_key),
        client_cert=_write(root / "client.pem", _cert("engine-0", client_key, "test-ca", ca_key)),
        client_key=_write(root / "client.key", key=client_key),
        stranger_cert=_write(root / "stranger.pem", _cert("mallory", stranger_key, "other-ca", stranger_ca_key)),
        stranger_key=_write(root / "stranger.key", key=stranger_key),
    )


def _credentials(pki: Pki, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def _plan(client: RebalancerClient):
    return client.rebalance(skewed_loads(1), num_replicas=REPLICAS, num_groups=GROUPS, num_nodes=NODES, num_gpus=GPUS)


def _refused(client: RebalancerClient) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        client.list_deployments(timeout=5)
    return error.value.code()


def test_tls_serves_clients_that_trust_the_ca(tmp_path, pki):
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)}
    with ServerThread(str(tmp_path), **tls) as server:
        target = f"127.0.0.1:{server.server.port}"
        with RebalancerClient(target, credentials=_credentials(pki)) as client:
            assert client.health() == "SERVING"
            assert _plan(client).phy2log.shape == (4, REPLICAS)
        with RebalancerClient(target) as plaintext:
            assert _refused(plaintext) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_admits_only_certificates_from_the_client_ca(tmp_path, pki):
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "tls_client_ca": str(pki.ca)}
    with ServerThread(str(tmp_path), **tls) as server:
        target = f"127.0.0.1:{server.server.port}"
        with RebalancerClient(target, credentials=_credentials(pki, pki.client_cert, pki.client_key)) as client:
            assert _plan(client).phy2log.shape == (4, REPLICAS)
        for cert, key in ((None, None), (pki.stranger_cert, pki.stranger_key)):
            with RebalancerClient(target, credentials=_credentials(pki, cert, key)) as client:
                assert _refused(client) == grpc.StatusCode.UNAVAILABLE


def test_token_is_required_accepted_and_wrong_ones_rejected(tmp_path):
    with ServerThread(str(tmp_path), auth_token=TOKEN) as server:
        target = f"127.0.0.1:{server.server.port}"
        for token in (None, "", "wrong", TOKEN + "x", TOKEN[:-1], f"Basic {TOKEN}"):
            with RebalancerClient(target, token=token) as client:
                assert client.health() == "SERVING"  # health stays open for probes
                assert _refused(client) == grpc.StatusCode.UNAUTHENTICATED
        stub = rebalancer_pb2_grpc.RebalancerServiceStub(server.channel)  # every RPC kind is guarded
        calls = (
            lambda: stub.Rebalance(pb.RebalanceRequest(), timeout=5),
            lambda: stub.StreamLoad(iter([report("t", skewed_loads(0), topology=TOPOLOGY)]), timeout=5),
            lambda: next(stub.WatchPlacement(pb.WatchPlacementRequest(deployment_id="t"), timeout=5)),
            lambda: next(
                reflection_pb2_grpc.ServerReflectionStub(server.channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                )
            ),
        )
        for call in calls:
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert TOKEN not in (error.value.details() or "")
        assert server.metric("rebalancer_deployments") == 0
        with RebalancerClient(target, token=TOKEN) as client:
            assert client.report_loads("t", [skewed_loads(0)], topology=TOPOLOGY).accepted == 1
            assert [info.deployment_id for info in client.list_deployments()] == ["t"]
        refused = server.settled_metric(
            "grpc_server_handled_total",
            1,
            grpc_type="unary",
            grpc_service="rebalancer.v1.RebalancerService",
            grpc_method="Rebalance",
            grpc_code="UNAUTHENTICATED",
        )
        assert refused == 1


def test_cli_speaks_tls_and_token(tmp_path, pki, monkeypatch, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "auth_token_file": str(token_file)}
    with ServerThread(str(tmp_path / "state"), **tls) as server:
        target = f"127.0.0.1:{server.server.port}"
        monkeypatch.setenv("REBALANCER_TOKEN", TOKEN)
        assert cli_main(["list", "--target", target, "--tls-ca", str(pki.ca)]) == 0
        assert cli_main(["list", "--target", target, "--tls-ca", str(pki.ca), "--token", "nope"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        monkeypatch.delenv("REBALANCER_TOKEN")
        monkeypatch.setenv("REBALANCER_TLS_CA", str(pki.ca))
        assert cli_main(["health", "--target", target]) == 0
        assert cli_main(["list", "--target", target]) == 1


def test_metrics_port_binds_to_its_own_host(tmp_path):
    port = free_port()
    with ServerThread(str(tmp_path), metrics_port=port, metrics_host="127.0.0.2"):
        text = urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5).read().decode()
        assert "rebalancer_queue_depth" in text
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_unusable_tls_or_token_files_stop_the_start(tmp_path, pki):
    for overrides, flag in (
        ({"tls_cert": str(tmp_path / "missing.pem"), "tls_key": str(pki.server_key)}, "--tls-cert"),
        ({"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_cert)}, "--tls-key"),
        ({"auth_token_file": str(tmp_path)}, "--auth-token-file"),
    ):
        with pytest.raises(SecurityConfigError, match=flag):
            ServerThread(str(tmp_path / "state"), **overrides).start()


def test_token_never_shows_in_help_repr_or_logs(tmp_path, capsys):
    environ = {"REBALANCER_AUTH_TOKEN": TOKEN}
    with pytest.raises(SystemExit):
        parse_args(["--help"], environ)
    assert TOKEN not in capsys.readouterr().out
    assert TOKEN not in repr(parse_args([], environ))
    assert TOKEN not in repr(replace(ServerConfig(), auth_token=TOKEN))

    process, port = launch_local(tmp_path / "state", "--log-level", "DEBUG", REBALANCER_AUTH_TOKEN=TOKEN)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, process)
        for token in (TOKEN, TOKEN[:-1], "wrong"):
            with RebalancerClient(f"127.0.0.1:{port}", token=token) as client:
                try:
                    client.report_loads("logs", [skewed_loads(0)], topology=TOPOLOGY)
                    _plan(client)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        process.terminate()
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "bearer token required" in output
    assert TOKEN not in output and TOKEN[:-1] not in output


@pytest.mark.parametrize(
    "flags",
    [
        ["--tls-cert", "server.pem"],
        ["--tls-key", "server.key"],
        ["--tls-client-ca", "ca.pem"],
        ["--auth-token", TOKEN, "--auth-token-file", "token"],
    ],
)
def test_inconsistent_security_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(flags, {})
    assert exit_.value.code == 2
    assert TOKEN not in capsys.readouterr().err
