"""Random and malformed requests to every unary RPC: each gets a deliberate answer (never INTERNAL,
UNKNOWN or UNIMPLEMENTED) and the server keeps serving. Bounded to a few hundred examples."""

from __future__ import annotations

import asyncio
import functools
import string
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2 as grpc_health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.v1 import health_pb2, health_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.conftest import ServerProcess
from tests.security.conftest import (
    ADMIN_KEY,
    API_KEYS,
    bearer,
    open_stream,
    orchestrator_methods,
    path,
    register,
)
from tests.support import DOWN, read_message

UNARY = [
    *(
        method
        for method in orchestrator_methods()
        if not method.client_streaming and not method.server_streaming
    ),
    grpc_health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"],
]
# Codes that mean the server did not decide the answer: a bug, a crash, or a route that is missing.
UNDECIDED = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DATA_LOSS,
}
FUZZ_SETTINGS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

F = FieldDescriptor
TEXT = st.one_of(
    st.text(max_size=24),
    st.text(alphabet=string.ascii_letters + string.digits + "._-/", max_size=24),
    st.text(alphabet=string.ascii_lowercase, min_size=129, max_size=5000),
)
SCALARS: dict[int, st.SearchStrategy[Any]] = {
    F.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    F.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    F.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    F.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    F.TYPE_UINT32: st.integers(0, 2**32 - 1),
    F.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    F.TYPE_UINT64: st.integers(0, 2**64 - 1),
    F.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    F.TYPE_DOUBLE: st.floats(),
    F.TYPE_FLOAT: st.floats(width=32),
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_STRING: TEXT,
    F.TYPE_BYTES: st.binary(max_size=64),
}


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == F.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    if field.type == F.TYPE_ENUM:
        # proto3 enums are open: numbers the server has never heard of must be refused cleanly.
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-3, 1000))
    return SCALARS[field.type]


@functools.cache
def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Random, well-typed messages of `descriptor`, nested up to four levels."""
    message_class = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.builds(message_class)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name
            fields[field.name] = st.dictionaries(
                _value(entry["key"], depth), _value(entry["value"], depth), max_size=3
            )
        elif field.is_repeated:
            fields[field.name] = st.lists(_value(field, depth), max_size=3)
        else:
            fields[field.name] = _value(field, depth)
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: message_class(**values))


@pytest.fixture
def channel(server_process: Callable[..., ServerProcess]) -> Iterator[tuple[grpc.Channel, ServerProcess]]:
    # Rate limits off: every example must reach the servicers, not the token bucket.
    server = server_process(API_KEYS=API_KEYS, RATE_LIMIT_ENABLED="false").start()
    with grpc.insecure_channel(server.target) as opened:
        yield opened, server
    assert server.process is not None and server.process.poll() is None, "the server died"


def _call(channel: grpc.Channel, method: MethodDescriptor, payload: bytes) -> grpc.StatusCode:
    # Identity serializers: the bytes go on the wire as they are.
    callable_ = channel.unary_unary(path(method))
    try:
        callable_(payload, metadata=bearer(ADMIN_KEY), timeout=10)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


def _still_serving(channel: grpc.Channel, server: ServerProcess) -> None:
    """The process is alive and serves a write and a read on a fresh connection."""
    assert server.process is not None and server.process.poll() is None, "the server process died"
    with grpc.insecure_channel(server.target) as fresh:
        registry = registry_pb2_grpc.RegistryServiceStub(fresh)
        registered = registry.RegisterAgent(
            registry_pb2.RegisterAgentRequest(name="after-fuzz", instance_id="1", type="worker"),
            metadata=bearer(ADMIN_KEY),
            timeout=10,
        )
        found = registry.GetAgent(
            registry_pb2.GetAgentRequest(agent_id=registered.agent.agent_id),
            metadata=bearer(ADMIN_KEY),
            timeout=10,
        )
        assert found.agent.name == "after-fuzz"
    health = health_pb2_grpc.HealthServiceStub(channel).GetSystemHealth(
        health_pb2.GetSystemHealthRequest(), metadata=bearer(ADMIN_KEY), timeout=10
    )
    assert health.store_status == "ok" and health.total_agents >= 1, health


@FUZZ_SETTINGS
@given(method=st.sampled_from(UNARY), payload=st.binary(max_size=512))
def test_random_bytes_to_every_unary_rpc(
    channel: tuple[grpc.Channel, ServerProcess], method: MethodDescriptor, payload: bytes
) -> None:
    code = _call(channel[0], method, payload)
    assert code not in UNDECIDED, f"{path(method)} answered {code.name} to {payload!r}"


@FUZZ_SETTINGS
@given(data=st.data())
def test_random_typed_messages_to_every_unary_rpc(
    channel: tuple[grpc.Channel, ServerProcess], data: st.DataObject
) -> None:
    method = data.draw(st.sampled_from(UNARY))
    request = data.draw(messages(method.input_type))
    code = _call(channel[0], method, request.SerializeToString())
    assert code not in UNDECIDED, f"{path(method)} answered {code.name} to {request}"


def test_the_server_is_still_serving_after_the_fuzz(channel: tuple[grpc.Channel, ServerProcess]) -> None:
    # One fixture per test: fuzz a little here too, then check it answers normally.
    for method in UNARY:
        assert _call(channel[0], method, b"\xff\xff\xff\xff") not in UNDECIDED
    _still_serving(*channel)


async def test_malformed_session_messages_end_the_stream_cleanly(servers: Callable[..., Any]) -> None:
    running = await servers(api_keys=API_KEYS)
    stream = running.stubs.channel.stream_stream("/orchestrator.v1.RegistryService/Heartbeat")

    async def requests() -> Any:
        yield b"\xff\xff\xff\xff"

    call = stream(requests(), metadata=bearer(ADMIN_KEY))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The other client stream, reflection, iterates its requests instead: the same answer.
    reflection = running.stubs.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )(requests(), metadata=bearer(ADMIN_KEY))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await reflection.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # After a good hello, malformed bytes end that session with INVALID_ARGUMENT, and only it.
    bystander_agent = await register(running, "bystander", ADMIN_KEY)
    bystander = open_stream(running, bystander_agent.agent.agent_id, bystander_agent.agent_token)
    assert (await bystander.receive()).WhichOneof("message") == "welcome"
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05\x0a", b"\x12\x02\x08"):
        fuzzed = await register(running, "fuzzed", ADMIN_KEY)
        hello = registry_pb2.HeartbeatRequest(
            hello=registry_pb2.SessionHello(agent_id=fuzzed.agent.agent_id, agent_token=fuzzed.agent_token)
        )
        outbox: asyncio.Queue[bytes] = asyncio.Queue()
        outbox.put_nowait(hello.SerializeToString())

        async def raw(queue: asyncio.Queue[bytes] = outbox) -> AsyncIterator[bytes]:
            while True:
                yield await queue.get()

        session = stream(raw(), metadata=bearer(ADMIN_KEY))
        welcome = registry_pb2.HeartbeatResponse.FromString(await read_message(session))
        assert welcome.WhichOneof("message") == "welcome"
        outbox.put_nowait(garbage)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            while (await asyncio.wait_for(session.read(), 10)) is not grpc.aio.EOF:
                pass
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (garbage, raised.value)
        # The fuzzed agent's stream is over, and it is DOWN; the server and the bystander go on.
        agent = await running.stubs.registry.GetAgent(
            registry_pb2.GetAgentRequest(agent_id=fuzzed.agent.agent_id), metadata=bearer(ADMIN_KEY)
        )
        assert agent.agent.status == DOWN
        bystander.send(beat=registry_pb2.SessionBeat(sequence=len(garbage)))
        assert (await bystander.receive_kind("ack")).ack.sequence == len(garbage)
    await bystander.goodbye()
