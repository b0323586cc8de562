"""What the client tests share beyond the in-process server of `service_harness`: checks of placement
maps, the solver's answer to compare a placement with, and `rebalancer-server` subprocesses for the tests
of real processes (several replicas, SIGKILL, the console scripts).
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from rebalancer.solver import rebalance_experts
from service_harness import free_port, launch, wait_serving

SERVER_BIN = pathlib.Path(sys.executable).with_name("rebalancer-server")


def assert_valid_maps(phy2log: np.ndarray, log2phy: np.ndarray, logcnt: np.ndarray, num_experts: int) -> None:
    """The three maps describe one placement: every expert has a copy, counts and slot lists agree."""
    num_layers, num_replicas = phy2log.shape
    assert logcnt.shape == (num_layers, num_experts)
    assert log2phy.shape[:2] == (num_layers, num_experts)
    assert ((phy2log >= 0) & (phy2log < num_experts)).all()
    assert (logcnt >= 1).all() and (logcnt.sum(axis=1) == num_replicas).all()
    for layer in range(num_layers):
        for expert in range(num_experts):
            slots = log2phy[layer, expert]
            listed = sorted(int(s) for s in slots if s >= 0)
            assert listed == sorted(np.flatnonzero(phy2log[layer] == expert).tolist())
            assert len(listed) == logcnt[layer, expert]


def library_phy2log(
    loads: np.ndarray, num_replicas: int, num_gpus: int, num_groups: int = 1, num_nodes: int = 1, **options
) -> np.ndarray:
    """phy2log [L, R] of the solver library on the arguments a client sent: what the server must return."""
    weight = torch.from_numpy(np.asarray(loads, dtype=np.float64))
    phy2log, _, _ = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, **options)
    return phy2log.numpy()


@dataclass
class ServerProcess:
    """A `rebalancer-server` subprocess on 127.0.0.1 with its own state directory."""

    process: subprocess.Popen
    target: str

    def stop(self) -> None:
        stop_all([self])


def stop_all(servers: list[ServerProcess]) -> None:
    """SIGTERM every server first, then wait for each: the drains overlap."""
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def launch_servers(state_dirs: list[pathlib.Path]) -> list[ServerProcess]:
    """Start one server per state directory (in parallel, CPU, no auto re-plan) and wait until each is
    SERVING; if one does not come up, all are killed."""
    servers = []
    for state_dir in state_dirs:
        port = free_port()
        flags = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(free_port())]
        process = launch(state_dir, *flags, "--device", "cpu", "--auto-rebalance-threshold", "0")
        servers.append(ServerProcess(process, f"127.0.0.1:{port}"))
    try:
        for server in servers:
            with grpc.insecure_channel(server.target) as channel:
                wait_serving(channel, server.process)
    except BaseException:
        for server in servers:
            server.process.kill()
            server.process.wait()
        raise
    return servers
