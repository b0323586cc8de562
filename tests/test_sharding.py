"""Deployment sharding: rendezvous hashing is stable under scale-out, and a ShardedClient keeps each
deployment's calls and telemetry on one replica (real servers in-process, and as processes)."""

from __future__ import annotations

import collections
import contextlib

import grpc
import numpy as np
import pytest
from client_helpers import launch_servers, stop_all
from rebalancer_client import LoadReporter, RebalancerClient, ShardedClient, connect, rendezvous_owner
from rebalancer_client.sharding import parse_targets, resolve_dns
from service_harness import ServerThread, real_service

IDS = [f"deployment-{i}" for i in range(1000)]
TOPOLOGY = {"num_replicas": 6, "num_gpus": 3}


def test_adding_a_fourth_target_moves_about_a_quarter_and_nothing_between_the_old_ones():
    three = ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"]
    four = [*three, "10.0.0.4:50051"]
    before = {key: rendezvous_owner(key, three) for key in IDS}
    after = {key: rendezvous_owner(key, four) for key in IDS}
    moved = [key for key in IDS if before[key] != after[key]]
    assert 0.15 <= len(moved) / len(IDS) <= 0.35
    assert all(after[key] == four[3] for key in moved)  # only moves onto the new replica


def test_owners_are_spread_evenly_and_independent_of_target_order():
    targets = [f"10.0.0.{i}:50051" for i in range(1, 5)]
    counts = collections.Counter(rendezvous_owner(key, targets) for key in IDS)
    assert min(counts.values()) > 180 and max(counts.values()) < 320
    assert all(rendezvous_owner(key, targets) == rendezvous_owner(key, targets[::-1]) for key in IDS[:100])


def test_removing_a_target_moves_only_its_deployments():
    targets = [f"10.0.0.{i}:50051" for i in range(1, 5)]
    survivors = targets[:3]
    for key in IDS:
        owner = rendezvous_owner(key, targets)
        if owner in survivors:
            assert rendezvous_owner(key, survivors) == owner


def test_target_lists_and_dns_names_parse():
    assert parse_targets("b:1, a:1,,b:1") == ["a:1", "b:1"]
    assert parse_targets(["a:1"]) == ["a:1"]
    assert resolve_dns("dns:///localhost:50051")[0].endswith(":50051")
    assert "127.0.0.1:7" in parse_targets("dns:///127.0.0.1:7")
    with pytest.raises(ValueError, match="needs a port"):
        resolve_dns("dns:///localhost")
    with pytest.raises(ValueError, match="no targets"):
        parse_targets(" , ")
    assert isinstance(connect("127.0.0.1:1"), RebalancerClient)
    assert isinstance(connect("127.0.0.1:1,127.0.0.1:2"), ShardedClient)


@pytest.fixture
def replicas():
    """Four real servers in-process, each with its own state; a test may stop some of them."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(real_service()) for _ in range(4)]


def deployments_on(replica: ServerThread) -> set[str]:
    with RebalancerClient(replica.target) as client:
        return {info.deployment_id for info in client.list_deployments()}


def test_sharded_client_keeps_each_deployment_on_one_replica(replicas):
    three, fourth = replicas[:3], replicas[3]
    names = [f"dep-{i}" for i in range(40)]  # ports are random: 40 names make "none moved" a 1e-5 event
    with ShardedClient([f.target for f in three], timeout=5) as client:
        for name in names:
            client.report_loads(name, [np.ones((2, 4))], topology=TOPOLOGY)
        held = {f.target: deployments_on(f) for f in three}
        for name in names:
            holders = [target for target, held_names in held.items() if name in held_names]
            assert holders == [client.target_for(name)]
            assert client.rebalance(deployment_id=name).version == 1
            assert client.get_placement(name).version == 1
        assert [d.deployment_id for d in client.list_deployments()] == sorted(names)
        assert all(status == "SERVING" for status in client.health().values())

        inline = {f.target: f.rpcs_started("Rebalance") for f in three}
        for _ in range(6):
            client.rebalance(np.ones((1, 4)), num_replicas=4, num_gpus=2)
        assert all(f.rpcs_started("Rebalance") - inline[f.target] == 2 for f in three)  # round robin

        before = {name: client.target_for(name) for name in names}
        client.set_targets([f.target for f in replicas])
        moved = [name for name in names if client.target_for(name) != before[name]]
        assert all(client.target_for(name) == fourth.target for name in moved)
        assert 1 <= len(moved) <= 20
        for name in names:
            client.report_loads(name, [np.ones((2, 4))], topology=TOPOLOGY)
            assert client.rebalance(deployment_id=name).version == (1 if name in moved else 2)


def test_a_dead_replica_fails_only_its_own_deployments(replicas):
    three = replicas[:3]
    names = [f"dep-{i}" for i in range(20)]
    with ShardedClient([f.target for f in three], timeout=2) as client:
        for name in names:
            client.report_loads(name, [np.ones((2, 4))], topology=TOPOLOGY)
        dead = three[0]
        dead.stop()
        for name in names:
            if client.target_for(name) == dead.target:
                with pytest.raises(grpc.RpcError) as info:
                    client.rebalance(deployment_id=name)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            else:
                assert client.rebalance(deployment_id=name).committed
        assert client.health()[dead.target] == "UNAVAILABLE"


def test_reporter_streams_through_the_sharded_client_to_the_owner(replicas):
    with ShardedClient([f.target for f in replicas]) as client:
        with LoadReporter(client, "sharded-engine", topology=TOPOLOGY) as reporter:
            reporter.report(np.ones((2, 4)))
            assert reporter.flush(10)
        owner = client.target_for("sharded-engine")
        assert [f.target for f in replicas if "sharded-engine" in deployments_on(f)] == [owner]


@pytest.mark.slow
def test_real_replicas_shard_scale_out_and_fail_independently(tmp_path):
    """With real processes: 20 deployments over 3 replicas, a 4th added, one killed."""
    servers = launch_servers([tmp_path / f"replica-{i}" for i in range(4)])
    try:
        targets = [server.target for server in servers]
        names = [f"tenant-{i}" for i in range(20)]
        with ShardedClient(targets[:3], timeout=30) as client:
            for name in names:
                client.report_loads(name, [np.ones((2, 8))], topology={"num_replicas": 8, "num_gpus": 2})
                assert client.rebalance(deployment_id=name).version == 1
            holders = collections.defaultdict(list)
            for target in targets[:3]:
                with RebalancerClient(target) as replica:
                    for info in replica.list_deployments():
                        holders[info.deployment_id].append(target)
            assert all(holders[name] == [client.target_for(name)] for name in names)

            before = {name: client.target_for(name) for name in names}
            client.set_targets(targets)
            moved = [name for name in names if client.target_for(name) != before[name]]
            assert all(client.target_for(name) == targets[3] for name in moved) and len(moved) <= 12
            for name in moved:  # the new owner learns the deployment from its next telemetry
                client.report_loads(name, [np.ones((2, 8))], topology={"num_replicas": 8, "num_gpus": 2})
                assert client.rebalance(deployment_id=name).version == 1
            for name in names:
                assert client.get_placement(name).deployment_id == name

            servers[0].process.kill()
            servers[0].process.wait()
            for name in names:
                if client.target_for(name) == targets[0]:
                    with pytest.raises(grpc.RpcError) as info:
                        client.get_placement(name, timeout=5)
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                else:
                    assert client.get_placement(name).deployment_id == name
    finally:
        stop_all(servers)


def test_dns_targets_are_named_by_stable_pod_names(monkeypatch):
    """Pod IPs change on restart; the reverse names of a headless Service's pods do not, so the shard
    owner of a deployment must be computed on those names."""
    import socket

    addresses = {"10.0.0.7": "rebalancer-0.rebalancer.ml.svc.cluster.local", "10.0.0.9": None}

    def getaddrinfo(host, port, type=0):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in addresses]

    def gethostbyaddr(ip):
        if addresses[ip] is None:
            raise socket.herror("no reverse name")
        return addresses[ip], [], [ip]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "gethostbyaddr", gethostbyaddr)
    assert resolve_dns("dns:///rebalancer:50051") == [
        "10.0.0.9:50051",
        "rebalancer-0.rebalancer.ml.svc.cluster.local:50051",
    ]
