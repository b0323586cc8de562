"""The `rebalancer` command line against the real server in-process: parsing, loads files, JSON outputs,
exit codes."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys

import numpy as np
import pytest
from client_helpers import library_phy2log
from grpc_health.v1 import health_pb2
from rebalancer_client.cli import DEFAULT_TARGET, build_parser, main, read_loads, write_json
from service_harness import real_service


@pytest.fixture(scope="module")
def server():
    with real_service() as running:
        yield running


def test_target_defaults_to_the_environment_then_loopback(monkeypatch):
    monkeypatch.delenv("REBALANCER_TARGET", raising=False)
    assert build_parser().parse_args(["health"]).target == DEFAULT_TARGET == "127.0.0.1:50051"
    monkeypatch.setenv("REBALANCER_TARGET", "dns:///rebalancer-headless:50051")
    assert build_parser().parse_args(["get", "x"]).target == "dns:///rebalancer-headless:50051"
    args = build_parser().parse_args(["rebalance", "l.npy", "--replicas", "288", "--gpus", "32", "--format", "sglang"])
    assert (args.replicas, args.groups, args.nodes, args.gpus, args.format) == (288, 1, 1, 32, "sglang")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["rebalance", "l.npy", "--format", "tensorrt"])


def test_loads_files_in_every_format(tmp_path):
    loads = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.save(tmp_path / "a.npy", loads)
    (tmp_path / "b.json").write_text(json.dumps(loads.tolist()))
    unfilled = np.zeros_like(loads).tolist()
    (tmp_path / "c.json").write_text(json.dumps({"logical_count": [loads.tolist(), unfilled, loads.tolist()]}))
    assert np.array_equal(read_loads(str(tmp_path / "a.npy")), loads)
    assert np.array_equal(read_loads(str(tmp_path / "b.json")), loads)
    assert read_loads(str(tmp_path / "c.json")).shape == (2, 2, 4)  # SGLang's recorder dump, filled steps
    torch = pytest.importorskip("torch")
    torch.save({"logical_count": torch.from_numpy(loads)}, tmp_path / "d.pt")
    assert np.array_equal(read_loads(str(tmp_path / "d.pt")), loads[None])  # one step
    (tmp_path / "e.json").write_text(json.dumps({"counts": []}))
    for name, match in (("e.json", "expected a key"), ("f.csv", "must be a .npy")):
        with pytest.raises(ValueError, match=match):
            read_loads(str(tmp_path / name))


@pytest.mark.parametrize(("form", "keys"), [("vllm", 1), ("sglang", 1), ("raw", 12)])
def test_rebalance_writes_the_engine_json(server, tmp_path, capsys, form, keys):
    loads = np.array([[9, 1, 1, 1], [1, 1, 1, 9]], dtype=np.float32)
    np.save(tmp_path / "loads.npy", loads)
    out = tmp_path / "placement.json"
    code = main(
        ["rebalance", str(tmp_path / "loads.npy"), "--replicas", "6", "--gpus", "3", "--seed", "4"]
        + ["--policy", "global", "--target", server.target, "--out", str(out), "--format", form]
        + ["--first-moe-layer", "0"]  # every layer is MoE
    )
    assert code == 0
    document = json.loads(out.read_text())
    assert len(document) == keys
    phy2log = np.array(document.get("physical_to_logical_map", document.get("phy2log")))
    assert phy2log.shape == (2, 6) and set(phy2log.ravel()) == {0, 1, 2, 3}
    assert "inline plan; balancedness" in capsys.readouterr().err
    assert np.array_equal(phy2log, library_phy2log(loads, 6, 3, seed=4, policy="global"))  # the flags reached it


def test_report_get_watch_list_delete_round_trip(server, tmp_path, capsys):
    target = ["--target", server.target]
    np.save(tmp_path / "window.npy", np.ones((3, 2, 4)))  # three reports
    assert main(["report", "cli-dep", str(tmp_path / "window.npy"), "--replicas", "6", "--gpus", "3", *target]) == 0
    assert json.loads(capsys.readouterr().out)["accepted"] == 3
    assert main(["rebalance", "--deployment", "cli-dep", *target]) == 0
    assert "version 1 committed" in capsys.readouterr().err
    assert main(["get", "cli-dep", "--format", "sglang", "--first-moe-layer", "0", *target]) == 0
    assert np.array(json.loads(capsys.readouterr().out)["physical_to_logical_map"]).shape == (2, 6)
    assert main(["watch", "cli-dep", "--count", "1", *target]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    watched = tmp_path / "watched.json"
    watch = ["watch", "cli-dep", "--count", "1", "--format", "sglang", "--first-moe-layer", "0"]
    assert main([*watch, "--out", str(watched), *target]) == 0
    assert list(json.loads(watched.read_text())) == ["physical_to_logical_map"]
    assert main(["list", *target]) == 0
    assert "cli-dep\tversion 1\treports 3" in capsys.readouterr().out
    assert main(["delete", "cli-dep", *target]) == 0
    assert main(["delete", "cli-dep", *target]) == 1


def test_health_exit_codes(server, capsys):
    assert main(["health", "--target", server.target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    server.set_health("cli.Draining", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["health", "--service", "cli.Draining", "--target", server.target]) == 1
    assert main(["health", "--target", "127.0.0.1:1", "--timeout", "0.5"]) == 1
    assert main(["health", "--target", f"{server.target},127.0.0.1:1", "--timeout", "0.5"]) == 1
    assert "127.0.0.1:1 UNAVAILABLE" in capsys.readouterr().out


def test_errors_map_to_exit_codes_and_readable_messages(server, tmp_path, capsys):
    np.save(tmp_path / "nan.npy", np.full((2, 4), np.nan))
    target = ["--target", server.target]
    assert main(["rebalance", str(tmp_path / "nan.npy"), "--replicas", "6", "--gpus", "3", *target]) == 2
    assert "loads must be finite" in capsys.readouterr().err
    assert main(["rebalance", str(tmp_path / "missing.npy"), "--replicas", "6", "--gpus", "3", *target]) == 2
    assert main(["get", "nobody", *target]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_out_replaces_the_file_atomically_with_ordinary_permissions(tmp_path, monkeypatch):
    out = tmp_path / "placement.json"
    out.write_text('{"old": true}\n')
    real_replace = os.replace
    seen = []

    def replace(source, target):
        # At the rename the reader still sees the whole old file; the new one is complete beside it.
        seen.append((json.loads(pathlib.Path(target).read_text()), json.loads(pathlib.Path(source).read_text())))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    old_umask = os.umask(0o022)
    try:
        write_json({"new": list(range(10_000))}, str(out))
    finally:
        os.umask(old_umask)
    assert seen == [({"old": True}, {"new": list(range(10_000))})]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # readable by an engine running as another user
    assert sorted(p.name for p in tmp_path.iterdir()) == ["placement.json"]

    def fail(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json({"newer": 1}, str(out))
    assert json.loads(out.read_text()) == {"new": list(range(10_000))}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["placement.json"]  # no temporary left behind


def test_output_into_a_closed_pipe_ends_quietly(server, tmp_path):
    np.save(tmp_path / "loads.npy", np.ones((58, 256), dtype=np.float32))
    command = [sys.executable, "-m", "rebalancer_client.cli", "rebalance", str(tmp_path / "loads.npy")]
    command += ["--replicas", "288", "--gpus", "32", "--format", "raw", "--target", server.target]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte, as after `| head` has had its fill
    try:
        result = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.stderr == "" and result.returncode == 0, result.stderr
