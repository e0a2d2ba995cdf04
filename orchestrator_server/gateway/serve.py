"""Running the gateway on a socket: `start_in_process_gateway` (inside `orchestrator serve`, calling
the servicers of the process) and `start_gateway` (a process of its own, calling a gRPC server
through a channel). The application itself is `app.create_gateway_app`."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.descriptor import ServiceDescriptor

from orchestrator_server.gateway.app import (
    DEFAULT_SERVICES,
    GatewayOptions,
    ReadinessCheck,
    create_gateway_app,
    logger,
)
from orchestrator_server.gateway.backends import Backend
from orchestrator_server.gateway.hardening import CappedTCPSite, install_log_redaction


@dataclass
class RunningGateway:
    """A gateway listening on a socket; `stop()` closes it (and the channel it opened, if any)."""

    host: str
    port: int
    #: The gRPC server it calls; "" when it dispatches in process.
    grpc_target: str
    app: web.Application
    _runner: web.AppRunner
    _channel: grpc.aio.Channel | None = None

    async def stop(self) -> None:
        await self._runner.cleanup()
        if self._channel is not None:
            await self._channel.close(grace=None)


async def _listen(
    app: web.Application,
    host: str,
    port: int,
    options: GatewayOptions,
    shutdown_timeout: float,
    sock: socket.socket | None = None,
) -> web.AppRunner:
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=options.header_timeout,
        max_line_size=options.max_field_size,
        max_field_size=options.max_field_size,
    )
    await runner.setup()
    site = CappedTCPSite(runner, host, port, max_connections=options.max_connections, sock=sock)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


async def start_gateway(
    host: str,
    port: int,
    grpc_target: str,
    *,
    channel_credentials: grpc.ChannelCredentials | None = None,
    channel_options: Sequence[tuple[str, Any]] = (),
    services: Iterable[ServiceDescriptor] = DEFAULT_SERVICES,
    options: GatewayOptions | None = None,
    readiness_check: ReadinessCheck | None = None,
    shutdown_timeout: float = 5.0,
) -> RunningGateway:
    """Serves the gateway on host:port (0 picks a free port), calling the gRPC server at grpc_target."""
    chosen = options or GatewayOptions()
    install_log_redaction(logger)
    if channel_credentials is None:
        channel = grpc.aio.insecure_channel(grpc_target, options=list(channel_options))
    else:
        channel = grpc.aio.secure_channel(grpc_target, channel_credentials, options=list(channel_options))
    try:
        app = create_gateway_app(channel, services=services, options=chosen, readiness_check=readiness_check)
        runner = await _listen(app, host, port, chosen, shutdown_timeout)
    except BaseException:
        await channel.close(grace=None)
        raise
    return RunningGateway(host, int(runner.addresses[0][1]), grpc_target, app, runner, channel)


async def start_in_process_gateway(
    host: str,
    port: int,
    backend: Backend,
    *,
    services: Iterable[ServiceDescriptor] = DEFAULT_SERVICES,
    options: GatewayOptions | None = None,
    readiness_check: ReadinessCheck | None = None,
    shutdown_timeout: float = 5.0,
    sock: socket.socket | None = None,
) -> RunningGateway:
    """Serves the gateway on host:port, dispatching to `backend` (the servicers of this process);
    on `sock` instead when given (a socket the caller bound and listens on already)."""
    chosen = options or GatewayOptions()
    install_log_redaction(logger)
    app = create_gateway_app(backend, services=services, options=chosen, readiness_check=readiness_check)
    runner = await _listen(app, host, port, chosen, shutdown_timeout, sock)
    return RunningGateway(host, int(runner.addresses[0][1]), "", app, runner)
