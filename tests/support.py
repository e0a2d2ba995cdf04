"""Helpers shared by the registry, discovery, health and restart tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orchestrator.v1 import agent_pb2, registry_pb2, registry_pb2_grpc

READY = agent_pb2.AGENT_STATUS_READY
DEGRADED = agent_pb2.AGENT_STATUS_DEGRADED
DRAINING = agent_pb2.AGENT_STATUS_DRAINING
DOWN = agent_pb2.AGENT_STATUS_DOWN
DEREGISTERED = agent_pb2.AGENT_STATUS_DEREGISTERED


async def rpc_error(call: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """Awaits `call`, which must fail with `code`; returns the error."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    return raised.value


DetailT = TypeVar("DetailT", bound=Message)


def error_detail(error: grpc.aio.AioRpcError, detail_type: type[DetailT]) -> DetailT | None:
    """The first google.rpc detail of `detail_type` (RetryInfo, ErrorInfo, ...) on the error."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details on the error"
    for detail in status.details:
        if detail.Is(detail_type.DESCRIPTOR):
            found = detail_type()
            detail.Unpack(found)
            return found
    return None


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations of an INVALID_ARGUMENT error, by field."""
    bad_request = error_detail(error, error_details_pb2.BadRequest)
    if bad_request is None:
        return {}
    return {violation.field: violation.description for violation in bad_request.field_violations}


async def invalid_fields(call: Awaitable[Any]) -> dict[str, str]:
    """Awaits `call`, which must fail with INVALID_ARGUMENT; returns its field violations."""
    return field_violations(await rpc_error(call, grpc.StatusCode.INVALID_ARGUMENT))


class SessionClient:
    """Drives one Heartbeat stream by hand: queue messages with `send`, read with `receive`."""

    def __init__(
        self,
        registry: registry_pb2_grpc.RegistryServiceStub,
        agent_id: str,
        token: str,
        running: tuple[str, ...] = (),
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.outbox: asyncio.Queue[registry_pb2.HeartbeatRequest | None] = asyncio.Queue()
        self.outbox.put_nowait(
            registry_pb2.HeartbeatRequest(
                hello=registry_pb2.SessionHello(
                    agent_id=agent_id, agent_token=token, running_attempt_ids=running
                )
            )
        )
        self.call = registry.Heartbeat(self._requests(), metadata=metadata)

    async def _requests(self) -> AsyncIterator[registry_pb2.HeartbeatRequest]:
        while (message := await self.outbox.get()) is not None:
            yield message

    def send(self, **message: Any) -> None:
        self.outbox.put_nowait(registry_pb2.HeartbeatRequest(**message))

    def close(self) -> None:
        self.outbox.put_nowait(None)

    async def receive(self, within: float = 10.0) -> registry_pb2.HeartbeatResponse:
        response = await asyncio.wait_for(self.call.read(), within)
        assert response is not grpc.aio.EOF, "stream ended"
        return response  # type: ignore[no-any-return]

    async def receive_kind(self, kind: str, within: float = 10.0) -> registry_pb2.HeartbeatResponse:
        """Reads until a message of `kind` (welcome, ack, drain, reconnect...) arrives."""
        while True:
            message = await self.receive(within)
            if message.WhichOneof("message") == kind:
                return message

    async def goodbye(self) -> None:
        """A planned exit: goodbye, half-close, wait for the server to end the stream."""
        self.send(goodbye=registry_pb2.SessionGoodbye(reason="test done"))
        self.close()
        while await asyncio.wait_for(self.call.read(), 10) is not grpc.aio.EOF:
            pass


async def open_session(
    registry: registry_pb2_grpc.RegistryServiceStub, agent_id: str, token: str
) -> SessionClient:
    session = SessionClient(registry, agent_id, token)
    welcome = await session.receive()
    assert welcome.WhichOneof("message") == "welcome"
    return session


async def read_message(stream: Any, within: float = 10.0) -> Any:
    """The next message of a server stream; fails the test on EOF or after `within` seconds."""
    message = await asyncio.wait_for(stream.read(), within)
    assert message is not grpc.aio.EOF, "stream ended"
    return message


async def keep_beating(session: SessionClient, interval: float = 0.2) -> None:
    """Sends a beat every `interval` seconds until cancelled (a live agent's session)."""
    sequence = 0
    while True:
        sequence += 1
        session.send(beat=registry_pb2.SessionBeat(sequence=sequence))
        await asyncio.sleep(interval)
