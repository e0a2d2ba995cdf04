"""Running the gateway on a socket: `start_in_process_gateway` (inside `orchestrator serve`, calling
the servicers of the process) and `start_gateway` (a process of its own, calling a gRPC server
through a channel). The gateway itself is `app.Gateway`, made by `app.create_gateway`."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from google.protobuf.descriptor import ServiceDescriptor

from orchestrator_server.gateway.app import (
    DEFAULT_SERVICES,
    Gateway,
    GatewayOptions,
    ReadinessCheck,
    create_gateway,
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
    gateway: Gateway
    _runner: web.BaseRunner
    _channel: grpc.aio.Channel | None = None

    async def stop(self) -> None:
        await self._runner.cleanup()
        if self._channel is not None:
            await self._channel.close(grace=None)


class _GatewayRunner(web.ServerRunner):
    """aiohttp's runner of a low-level server, which ends the gateway's open streams at shutdown
    (after its sites stop taking connections, before it waits for the handlers).

    The gateway is served by `web.Server`, not a `web.Application`: it routes every request itself,
    so an application's router, middleware chain and richer request object only cost (~10-20 us of
    a ~150 us REST heartbeat, issue 13)."""

    def __init__(self, gateway: Gateway, options: GatewayOptions, shutdown_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        max_body_bytes = options.max_body_bytes

        def make_request(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            return web.BaseRequest(
                message, payload, protocol, writer, task, loop, client_max_size=max_body_bytes
            )

        server = web.Server(
            gateway.handle,
            request_factory=make_request,
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=options.header_timeout,
            max_line_size=options.max_field_size,
            max_field_size=options.max_field_size,
        )
        super().__init__(server, shutdown_timeout=shutdown_timeout)
        self._gateway = gateway

    async def shutdown(self) -> None:
        await self._gateway.cancel_streams()


async def _listen(
    gateway: Gateway,
    host: str,
    port: int,
    options: GatewayOptions,
    shutdown_timeout: float,
    sock: socket.socket | None = None,
) -> web.BaseRunner:
    runner = _GatewayRunner(gateway, options, shutdown_timeout)
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
        gateway = create_gateway(channel, services=services, options=chosen, readiness_check=readiness_check)
        runner = await _listen(gateway, host, port, chosen, shutdown_timeout)
    except BaseException:
        await channel.close(grace=None)
        raise
    return RunningGateway(host, int(runner.addresses[0][1]), grpc_target, gateway, runner, channel)


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
    gateway = create_gateway(backend, services=services, options=chosen, readiness_check=readiness_check)
    runner = await _listen(gateway, host, port, chosen, shutdown_timeout, sock)
    return RunningGateway(host, int(runner.addresses[0][1]), "", gateway, runner)
