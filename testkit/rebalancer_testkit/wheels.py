"""The engines' released wheels, fetched once with `pip download --no-deps` and cached, so reruns are offline.

The cache is REBALANCER_ENGINE_WHEELS (default ~/.cache/moe-rebalancer/engine-wheels). Nothing of the engines
is copied into this repository; their modules are imported from the wheels, never their `__init__`.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

ENGINES = {"vllm": "0.33.0", "sglang": "0.5.23"}


def wheel_dir() -> Path:
    return Path(os.environ.get("REBALANCER_ENGINE_WHEELS") or Path.home() / ".cache/moe-rebalancer/engine-wheels")


def fetch_wheel(name: str, version: str) -> Path:
    """The cached wheel of `name==version`, downloaded (no dependencies) when missing; FileNotFoundError, with
    pip's last line, when the registry cannot provide it."""
    directory, pattern = wheel_dir(), f"{name}-{version}-*.whl"
    if not sorted(directory.glob(pattern)):
        directory.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{name}=={version}", "-d"]
        done = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=900)
        if not sorted(directory.glob(pattern)):
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FileNotFoundError(f"cannot fetch {name}=={version} from the package registry: {tail[0]}")
    return sorted(directory.glob(pattern))[0]


def extract(name: str, version: str, members: tuple[str, ...]) -> Path:
    """The wheel's `.py` files under `members` (folder or file prefixes), extracted once next to the wheels;
    the returned folder goes on sys.path to import them under their own names."""
    root = wheel_dir() / "extracted" / f"{name}-{version}"
    if not (root / ".complete").exists():
        with zipfile.ZipFile(fetch_wheel(name, version)) as archive:
            for member in archive.namelist():
                if member.startswith(members) and member.endswith(".py"):
                    archive.extract(member, root)
        (root / ".complete").touch()
    return root


def import_from_wheel(wheel: Path, module: str, alias: str = "") -> types.ModuleType:
    """Import `module` from `wheel` under a private top package `alias` (an installed engine is never shadowed);
    the packages above it are namespace stubs, so no engine `__init__` runs."""
    top, *rest = module.split(".")
    alias = alias or f"_released_{wheel.name.split('-')[0]}_{wheel.name.split('-')[1].replace('.', '_')}"
    for depth in range(len(rest)):
        package = ".".join([alias, *rest[:depth]])
        if package not in sys.modules:
            sys.modules[package] = stub = types.ModuleType(package)
            stub.__path__ = [str(wheel / Path(top, *rest[:depth]))]
    return importlib.import_module(".".join([alias, *rest]))
