"""The gateway as its own process, in front of a (possibly remote) gRPC server.

    python -m orchestrator_server.gateway --grpc-target orchestrator:50051 --port 8080

Flags fall back to environment variables: GRPC_TARGET, BIND_HOST, PORT, GATEWAY_TLS_CA_FILE,
GATEWAY_TLS_CERT_FILE, GATEWAY_TLS_KEY_FILE, ORCHESTRATOR_READY_FILE. A bad value stops startup
with a message naming the flag or variable. SIGTERM and SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from orchestrator_server.gateway.serve import start_gateway
from orchestrator_server.limits import raise_fd_limit

logger = logging.getLogger("orchestrator_server.gateway")


class ConfigError(ValueError):
    """A flag or environment variable has a value the gateway cannot use."""


def _port(text: str, name: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a port number (0-65535), got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} must be a port number (0-65535), got {text!r}")
    return port


def parse_args(argv: Sequence[str], env: Mapping[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator_server.gateway", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--grpc-target", default=env.get("GRPC_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--host", default=env.get("BIND_HOST", "0.0.0.0"))
    parser.add_argument("--port", default=env.get("PORT", "8080"))
    parser.add_argument("--tls-ca-file", default=env.get("GATEWAY_TLS_CA_FILE"))
    parser.add_argument("--tls-cert-file", default=env.get("GATEWAY_TLS_CERT_FILE"))
    parser.add_argument("--tls-key-file", default=env.get("GATEWAY_TLS_KEY_FILE"))
    parser.add_argument("--ready-file", default=env.get("ORCHESTRATOR_READY_FILE"))
    args = parser.parse_args(argv)
    args.port = _port(str(args.port), "--port / PORT")
    if not args.grpc_target:
        raise ConfigError("--grpc-target / GRPC_TARGET must not be empty")
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        raise ConfigError(
            "--tls-cert-file and --tls-key-file (GATEWAY_TLS_CERT_FILE, GATEWAY_TLS_KEY_FILE) go together"
        )
    return args


def _read(path: str | None, name: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{name}: cannot read {path!r}: {error.strerror}") from None


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    root = _read(args.tls_ca_file, "--tls-ca-file / GATEWAY_TLS_CA_FILE")
    cert = _read(args.tls_cert_file, "--tls-cert-file / GATEWAY_TLS_CERT_FILE")
    key = _read(args.tls_key_file, "--tls-key-file / GATEWAY_TLS_KEY_FILE")
    if root is None and cert is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)


def _write_ready_file(path: str, port: int) -> None:
    target = Path(path)
    scratch = target.with_name(target.name + ".tmp")
    scratch.write_text(json.dumps({"http_port": port, "pid": os.getpid()}))
    scratch.replace(target)  # atomic: a reader never sees a half-written file


async def serve(args: argparse.Namespace) -> None:
    raise_fd_limit(logger)
    gateway = await start_gateway(
        args.host, args.port, args.grpc_target, channel_credentials=channel_credentials(args)
    )
    logger.info("REST gateway on %s:%d, calling gRPC at %s", args.host, gateway.port, args.grpc_target)
    if args.ready_file:
        _write_ready_file(args.ready_file, gateway.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await gateway.stop()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
        asyncio.run(serve(args))
    except ConfigError as error:
        print(f"gateway: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
