"""`orchestrator serve` (also `python -m orchestrator_server`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence

from orchestrator_server.auth import check_security_config
from orchestrator_server.config import Config, ConfigError
from orchestrator_server.grpc_api.telemetry import RequestIdFilter
from orchestrator_server.server import OrchestratorServer, PortInUse


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "method", "principal", "target", "peer", "code", "duration_ms", "at"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(config: Config) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level, handlers=[handler], force=True)


async def serve(config: Config) -> None:
    server = OrchestratorServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def request_stop(signame: str) -> None:
        if not stopping:
            logging.getLogger(__name__).info("%s received: draining", signame)
            stopping.append(loop.create_task(server.stop(delay=config.shutdown_delay)))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    await server.wait_stopped()


def serve_from_env() -> int:
    """`orchestrator serve`: configuration from the environment; a bad value exits 2 naming it."""
    try:
        config = Config.from_env()
        # Production without keys, unreadable key or certificate files: refused before anything
        # starts (the store is not even created). The server checks again when built in process.
        check_security_config(config)
    except ConfigError as error:
        print(f"orchestrator: {error}", file=sys.stderr)
        return 2
    configure_logging(config)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(config))
    except PortInUse as error:
        print(f"orchestrator: {error.strerror}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m orchestrator_server [serve]`; the admin commands live in `orchestrator` (the SDK's CLI)."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator_server", description="OptiInfra orchestrator"
    )
    parser.add_argument("command", nargs="?", default="serve", choices=["serve"])
    parser.parse_args(argv)
    return serve_from_env()
