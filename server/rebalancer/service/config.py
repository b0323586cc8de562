"""Server settings: command-line flags, each also read from the environment as REBALANCER_<FLAG>.

A flag given on the command line wins over the environment, which wins over the built-in default.
Secrets (`--auth-token`) never show in `--help`, in the config's repr or in logs; prefer
`--auth-token-file` (or the environment) over the flag, which `ps` shows to every local user.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

ENV_PREFIX = "REBALANCER_"
# When the first queued request waits --batch-window-ms for batch mates (batcher.py).
BATCH_WINDOW_WHEN = ("busy", "always")


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_host: str = ""
    metrics_port: int = 9464
    state_dir: str = "./var"
    device: str = "auto"
    batch_window_ms: float = 2.0
    batch_window_when: str = "busy"
    max_batch_layers: int = 4096
    max_queue: int = 256
    window: int = 64
    history_intervals: int = 8
    auto_rebalance_threshold: float = 1.15
    auto_rebalance_min_interval_s: float = 60.0
    auto_rebalance_hysteresis: float = 0.02
    auto_rebalance_period_s: float = 1.0
    max_message_bytes: int = 64 * 1024 * 1024
    max_tensor_elements: int = 1 << 24
    grace_period_s: float = 10.0
    memory_budget_mb: float = 0.0
    max_deployments: int = 4096
    max_job_seconds: float = 10.0
    small_job_seconds: float = 1.0
    log_level: str = "INFO"
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_token: str = field(default="", repr=False)
    auth_token_file: str = ""


SECRETS = frozenset({"auth_token"})

HELP = {
    "host": "address to bind the gRPC and metrics ports to",
    "port": "gRPC port (0: pick a free one)",
    "metrics_host": "address of the metrics port (empty: --host), e.g. an internal interface only",
    "metrics_port": "Prometheus /metrics port (0: no metrics endpoint)",
    "state_dir": "directory of the SQLite state (deployments, placements)",
    "device": "solver device: auto (CUDA when present), cpu or cuda[:N]",
    "batch_window_ms": "how long the first queued request waits for batch mates",
    "batch_window_when": "busy: the window is waited only while other solves are queued or running (an "
    "idle server solves at once); always: every first request waits it (batches bursts to an idle server)",
    "max_batch_layers": "layer cap of one solver call",
    "max_queue": "solve requests allowed to wait; more get RESOURCE_EXHAUSTED",
    "window": "telemetry reports (slots) kept per deployment",
    "history_intervals": "window sums kept as history for the solver (0: none)",
    "auto_rebalance_threshold": "re-plan above this imbalance (max/mean) of the placement in force; 0: off",
    "auto_rebalance_min_interval_s": "minimum time between two auto re-plans of one deployment",
    "auto_rebalance_hysteresis": "an auto re-plan must lower the imbalance by at least this to be committed",
    "auto_rebalance_period_s": "how often windows are scored (imbalance metric and auto re-plan)",
    "max_message_bytes": "largest gRPC message sent or received",
    "max_tensor_elements": "largest tensor accepted, checked on the declared shape before allocating",
    "grace_period_s": "time in-flight RPCs get to finish after SIGTERM",
    "memory_budget_mb": "memory the process may use for windows, placements and solves "
    "(0: half of the host's or the cgroup's memory)",
    "max_deployments": "deployments the server registers at most; more get RESOURCE_EXHAUSTED",
    "max_job_seconds": "estimated solver time one request may cost; costlier ones get RESOURCE_EXHAUSTED",
    "small_job_seconds": "solves estimated at most this long run in their own lane, never behind larger ones",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "tls_cert": "PEM certificate chain of the server; with --tls-key turns TLS on (empty: plaintext)",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle: clients must present a certificate it signed (mutual TLS)",
    "auth_token": "bearer token every RPC but health must carry (empty: no token auth); "
    "prefer --auth-token-file or the environment",
    "auth_token_file": "file holding the bearer token (surrounding whitespace ignored)",
}


def parse_args(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    """Flags -> ServerConfig, with REBALANCER_<FLAG> environment variables as defaults."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="rebalancer-server", description="MoE expert-placement rebalancing service")
    defaults = ServerConfig()
    for spec in fields(ServerConfig):
        env_name = ENV_PREFIX + spec.name.upper()
        default = getattr(defaults, spec.name)
        kind = type(default)
        if env_name in environ:
            try:
                default = kind(environ[env_name])
            except ValueError:
                parser.error(f"{env_name}={environ[env_name]!r} is not a valid {kind.__name__}")
        shown = "not shown" if spec.name in SECRETS else "%(default)s"
        parser.add_argument(
            "--" + spec.name.replace("_", "-"),
            type=kind,
            default=default,
            help=f"{HELP[spec.name]} (env {env_name}; default {shown})",
        )
    args = parser.parse_args(argv)
    config = ServerConfig(**vars(args))
    problems = [
        name
        for name, bad in (
            ("--window", config.window < 1),
            ("--history-intervals", config.history_intervals < 0),
            ("--max-batch-layers", config.max_batch_layers < 1),
            ("--max-queue", config.max_queue < 1),
            ("--batch-window-ms", config.batch_window_ms < 0),
            ("--batch-window-when", config.batch_window_when not in BATCH_WINDOW_WHEN),
            ("--max-tensor-elements", config.max_tensor_elements < 1),
            ("--memory-budget-mb", config.memory_budget_mb < 0),
            ("--max-deployments", config.max_deployments < 1),
            ("--max-job-seconds", not config.max_job_seconds > 0),
            ("--small-job-seconds", not 0 < config.small_job_seconds <= config.max_job_seconds),
        )
        if bad
    ]
    if problems:
        parser.error("out of range: " + ", ".join(problems))
    if bool(config.tls_cert) != bool(config.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    if config.auth_token and config.auth_token_file:
        parser.error("give --auth-token or --auth-token-file, not both")
    return config
