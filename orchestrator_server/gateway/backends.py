"""Where the gateway sends the calls it transcodes: a gRPC channel (a gateway of its own, toward a
remote server) or the servicers of the server it runs in (`inprocess.InProcessBackend`).

Both answer the same way: a response message, or a `GatewayError` that carries the status the gRPC
server would have sent, so the HTTP side of the gateway does not know which one it talks to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Protocol

import grpc
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator_server.gateway.errors import from_rpc_error
from orchestrator_server.gateway.http_rules import Route
from orchestrator_server.gateway.proto_json import Encoded


@dataclass(frozen=True)
class Invocation:
    """One HTTP request as a call: what the gRPC server would get as metadata and peer."""

    #: Forwarded headers (credentials, the request id), as gRPC metadata.
    metadata: list[tuple[str, str]]
    #: The HTTP client's address, as grpc writes a peer (`ipv4:127.0.0.1:5000`).
    peer: str
    request_id: str
    #: Seconds the call may take; None: no deadline.
    timeout: float | None


class Backend(Protocol):
    async def unary(self, route: Route, message: Message, invocation: Invocation) -> Message | Encoded:
        """The call's response (a message, or its bytes); a GatewayError when it fails."""
        ...

    def stream(self, route: Route, message: Message, invocation: Invocation) -> AsyncIterator[Message]:
        """The call's messages (an async generator: closing it ends the call); a GatewayError
        when it fails."""
        ...

    async def health(self, service: str, within: float) -> str | None:
        """Why the server is not serving `service` (the grpc.health.v1 answer, asked to come
        within `within` seconds), or None."""
        ...


class ChannelBackend:
    """Calls a gRPC server over a channel: the standalone gateway."""

    def __init__(self, channel: grpc.aio.Channel, routes: Iterable[Route]) -> None:
        self._health_stub = health_pb2_grpc.HealthStub(channel)
        self._unary: dict[str, grpc.aio.UnaryUnaryMultiCallable[Message, Message]] = {}
        self._streams: dict[str, grpc.aio.UnaryStreamMultiCallable[Message, Message]] = {}
        for route in routes:
            request_class = message_factory.GetMessageClass(route.rpc.input_type)
            response_class = message_factory.GetMessageClass(route.rpc.output_type)
            if route.server_streaming:
                self._streams[route.grpc_path] = channel.unary_stream(
                    route.grpc_path,
                    request_serializer=request_class.SerializeToString,
                    response_deserializer=response_class.FromString,
                )
            else:
                self._unary[route.grpc_path] = channel.unary_unary(
                    route.grpc_path,
                    request_serializer=request_class.SerializeToString,
                    response_deserializer=response_class.FromString,
                )

    async def unary(self, route: Route, message: Message, invocation: Invocation) -> Message:
        call = self._unary[route.grpc_path]
        try:
            return await call(message, metadata=invocation.metadata, timeout=invocation.timeout)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def stream(self, route: Route, message: Message, invocation: Invocation) -> AsyncIterator[Message]:
        call = self._streams[route.grpc_path](
            message, metadata=invocation.metadata, timeout=invocation.timeout
        )
        try:
            async for reply in call:
                yield reply
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        finally:
            # Whatever ended the stream (the RPC, the client leaving, gateway shutdown), stop the
            # RPC so the server frees the watcher at once.
            call.cancel()

    async def health(self, service: str, within: float) -> str | None:
        check = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = await self._health_stub.Check(check, timeout=within)
        except grpc.aio.AioRpcError as error:
            return f"gRPC health check failed: {error.code().name}: {error.details()}"
        return not_serving(reply)


def not_serving(reply: health_pb2.HealthCheckResponse) -> str | None:
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return None
    return f"gRPC server reports {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
