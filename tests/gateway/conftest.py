"""A scripted gRPC backend on port 0 and a gateway in front of it.

The backend implements every RPC of the four services generically: each call is recorded (request,
metadata, deadline) and answered by a behaviour the test scripts, or by an empty response.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from orchestrator_server.gateway import DEFAULT_SERVICES, GatewayOptions, RunningGateway, start_gateway

UnaryBehaviour = Callable[[Message, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]
StreamBehaviour = Callable[[Message, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Message]]


@dataclass
class RecordedCall:
    method: str  # "RegistryService/GetAgent"
    request: Message
    metadata: dict[str, str]
    time_remaining: float | None


@dataclass
class ScriptedBackend:
    port: int = 0
    calls: list[RecordedCall] = field(default_factory=list)
    unary: dict[str, UnaryBehaviour] = field(default_factory=dict)
    streams: dict[str, StreamBehaviour] = field(default_factory=dict)
    health: HealthServicer = field(default_factory=HealthServicer)
    call_recorded: asyncio.Event = field(default_factory=asyncio.Event)

    def last(self, method: str) -> RecordedCall:
        matching = [call for call in self.calls if call.method == method]
        assert matching, f"{method} was not called; calls: {[call.method for call in self.calls]}"
        return matching[-1]

    def _record(self, method: str, request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = {
            key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)
        }
        self.calls.append(RecordedCall(method, request, metadata, context.time_remaining()))
        self.call_recorded.set()

    def handler(self) -> grpc.GenericRpcHandler:
        backend = self
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for service in DEFAULT_SERVICES:
            for rpc in service.methods:
                if rpc.client_streaming:
                    continue
                request_class = message_factory.GetMessageClass(rpc.input_type)
                response_class = message_factory.GetMessageClass(rpc.output_type)
                key = f"{service.name}/{rpc.name}"
                full = f"/{service.full_name}/{rpc.name}"
                if rpc.server_streaming:

                    def make_stream(key: str = key) -> Any:
                        async def stream(request: Message, context: Any) -> AsyncIterator[Message]:
                            backend._record(key, request, context)
                            behaviour = backend.streams.get(key)
                            if behaviour is None:
                                return
                            async for reply in behaviour(request, context):
                                yield reply

                        return stream

                    handlers[full] = grpc.unary_stream_rpc_method_handler(
                        make_stream(),
                        request_deserializer=request_class.FromString,
                        response_serializer=response_class.SerializeToString,
                    )
                else:

                    def make_unary(key: str = key, response_class: Any = response_class) -> Any:
                        async def unary(request: Message, context: Any) -> Message:
                            backend._record(key, request, context)
                            behaviour = backend.unary.get(key)
                            if behaviour is None:
                                return response_class()  # type: ignore[no-any-return]
                            return await behaviour(request, context)

                        return unary

                    handlers[full] = grpc.unary_unary_rpc_method_handler(
                        make_unary(),
                        request_deserializer=request_class.FromString,
                        response_serializer=response_class.SerializeToString,
                    )

        class Router(grpc.GenericRpcHandler):
            def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
                return handlers.get(handler_call_details.method)

        return Router()


@pytest.fixture
async def backend() -> AsyncIterator[ScriptedBackend]:
    scripted = ScriptedBackend()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([scripted.handler()])
    health_pb2_grpc.add_HealthServicer_to_server(scripted.health, server)
    await scripted.health.set("", health_pb2.HealthCheckResponse.SERVING)
    scripted.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield scripted
    await server.stop(grace=None)


@pytest.fixture
def gateway_options() -> GatewayOptions:
    return GatewayOptions()


@pytest.fixture
async def gateway(backend: ScriptedBackend, gateway_options: GatewayOptions) -> AsyncIterator[RunningGateway]:
    running = await start_gateway("127.0.0.1", 0, f"127.0.0.1:{backend.port}", options=gateway_options)
    yield running
    await running.stop()


@pytest.fixture
async def http(gateway: RunningGateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gateway.port}") as session:
        yield session
