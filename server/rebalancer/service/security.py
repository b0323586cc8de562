"""Who may talk to the server: TLS (optionally mutual) on the gRPC port and a bearer token.

Both are off by default: the service is meant to sit on a private network next to the inference fleet,
and a sidecar or mesh often terminates TLS already. Files are read once at start; a missing or unreadable
file is a start-up error (exit 2) whose message names the flag and path, never the file's content.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from .config import ServerConfig


class SecurityConfigError(ValueError):
    """A TLS or token file that cannot be used; the message names the flag and path only."""


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"{flag} {path}: {error.strerror or error}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plaintext.

    With --tls-client-ca the server requires and verifies a client certificate signed by that CA (mTLS).
    """
    if not config.tls_cert:
        return None
    key = _read("--tls-key", config.tls_key)
    chain = _read("--tls-cert", config.tls_cert)
    client_ca = _read("--tls-client-ca", config.tls_client_ca) if config.tls_client_ca else None
    if b"PRIVATE KEY" not in key or b"CERTIFICATE" not in chain:
        raise SecurityConfigError(f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: not PEM")
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def auth_token(config: ServerConfig) -> str | None:
    """The bearer token RPCs must carry, from --auth-token or --auth-token-file; None when auth is off."""
    if config.auth_token_file:
        token = _read("--auth-token-file", config.auth_token_file).decode("utf-8", "replace").strip()
        if not token:
            raise SecurityConfigError(f"--auth-token-file {config.auth_token_file} is empty")
        return token
    return config.auth_token.strip() or None
