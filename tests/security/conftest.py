"""Keys, credentials and generic calls for the security tests."""

from __future__ import annotations

import pkgutil
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import import_module
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

import orchestrator.v1
from orchestrator.v1 import registry_pb2
from orchestrator_server.grpc_api.reflection import v1_service as v1_reflection_service
from tests.conftest import Running
from tests.support import SessionClient

ADMIN_KEY = "admin-key-0123456789abcdef"
AGENT_KEY = "agent-key-0123456789abcdef"
READER_KEY = "reader-key-0123456789abcdef"
API_KEYS = f"admin:{ADMIN_KEY},agent:{AGENT_KEY},reader:{READER_KEY}"

Metadata = tuple[tuple[str, str], ...]


def bearer(secret: str) -> Metadata:
    return (("authorization", f"Bearer {secret}"),)


def orchestrator_methods() -> list[MethodDescriptor]:
    """Every RPC of every service in proto/orchestrator/v1, found from the generated modules."""
    methods = []
    for module_info in pkgutil.iter_modules(orchestrator.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = import_module(f"orchestrator.v1.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.extend(service.methods)
    return methods


def served_methods() -> list[MethodDescriptor]:
    """The orchestrator's RPCs plus the standard health and reflection services it also serves."""
    standard = [
        *health_pb2.DESCRIPTOR.services_by_name["Health"].methods,
        *reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].methods,
        *v1_reflection_service().methods,
    ]
    return [*orchestrator_methods(), *standard]


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def message_class(method: MethodDescriptor, output: bool = False) -> type[Message]:
    return message_factory.GetMessageClass(method.output_type if output else method.input_type)


async def call_code(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    request: Message,
    metadata: Metadata = (),
    *,
    more: Sequence[Message] = (),
) -> grpc.StatusCode:
    """The status of one call of any shape; for a stream, of its first response (OK if one came)."""
    response_class = message_class(method, output=True)
    serializer = type(request).SerializeToString
    deserializer = response_class.FromString
    name = path(method)
    try:
        if not method.client_streaming and not method.server_streaming:
            callable_ = channel.unary_unary(
                name, request_serializer=serializer, response_deserializer=deserializer
            )
            await callable_(request, metadata=metadata, timeout=10)
            return grpc.StatusCode.OK
        if not method.client_streaming:
            stream: Any = channel.unary_stream(
                name, request_serializer=serializer, response_deserializer=deserializer
            )(request, metadata=metadata, timeout=10)
        else:

            async def requests() -> AsyncIterator[Message]:
                yield request
                for message in more:
                    yield message

            stream = channel.stream_stream(
                name, request_serializer=serializer, response_deserializer=deserializer
            )(requests(), metadata=metadata, timeout=10)
        first = await stream.read()
        stream.cancel()
        if first is grpc.aio.EOF:
            return await stream.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        return error.code()


async def register(running: Running, name: str, key: str = AGENT_KEY) -> registry_pb2.RegisterAgentResponse:
    response: registry_pb2.RegisterAgentResponse = await running.stubs.registry.RegisterAgent(
        registry_pb2.RegisterAgentRequest(name=name, instance_id="1", type="worker", max_concurrent_tasks=4),
        metadata=bearer(key),
    )
    return response


def open_stream(running: Running, agent_id: str, token: str, metadata: Metadata = ()) -> SessionClient:
    """A Heartbeat stream opened with (optionally) metadata, driven by hand."""
    return SessionClient(running.stubs.registry, agent_id, token, metadata=tuple(metadata))


@pytest.fixture
async def secured(servers: Callable[..., Any]) -> Running:
    """An in-process server with keys of every role."""
    running: Running = await servers(api_keys=API_KEYS)
    return running
