"""`rebalancer-server`: flags and environment, logging, signals, exit codes.

SIGTERM/SIGINT start a graceful shutdown (health NOT_SERVING, drain within --grace-period-s, stop the
solves in hand between their rounds) and the process exits 0 as soon as everything is closed, without
the interpreter's teardown of torch and gRPC (about half a second of the orchestrator's grace). An
unusable state directory, device, port, TLS or token file exits 2 with the reason on stderr.

Security is opt-in: `--tls-cert/--tls-key` serve TLS, `--tls-client-ca` also requires client certificates
from that CA (mTLS), `--auth-token-file` (or REBALANCER_AUTH_TOKEN) requires `authorization: Bearer <token>`
on every RPC except health (probes cannot send one); `--metrics-host` keeps /metrics on an internal address.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from .config import parse_args
from .server import serve_until
from .store import StateError


async def _run(config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve_until(config, stop)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(_run(config))
    except (StateError, OSError, ValueError, RuntimeError) as error:
        logging.getLogger("rebalancer.service").error("cannot start: %s", error)
        return 2
    # Store, windows and metrics are closed and every RPC has ended: nothing is left for finalizers.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
