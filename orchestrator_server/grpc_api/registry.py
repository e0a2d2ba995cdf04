"""RegistryService over gRPC, including the Heartbeat session stream."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from orchestrator.v1 import registry_pb2, registry_pb2_grpc
from orchestrator_server.config import Config
from orchestrator_server.errors import FailedPrecondition, InvalidArgument, OrchestratorError
from orchestrator_server.grpc_api.errors import abort_with
from orchestrator_server.grpc_api.interceptors import authenticated_caller
from orchestrator_server.metrics import HEARTBEATS
from orchestrator_server.registry import Registry, Session
from orchestrator_server.tasks import TaskScheduler

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
# How long a closing session may take to write what is queued for it.
WRITER_FLUSH_TIMEOUT = 1.0
# End-of-stream marker of context.read(); missing from the type stubs.
EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009


def seconds(value: float) -> Any:
    from google.protobuf import duration_pb2

    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, config: Config, registry: Registry, tasks: TaskScheduler) -> None:
        self._config = config
        self._registry = registry
        self._tasks = tasks

    async def RegisterAgent(
        self, request: registry_pb2.RegisterAgentRequest, context: Context
    ) -> registry_pb2.RegisterAgentResponse:
        agent, token, created = await self._registry.register(request, authenticated=authenticated_caller())
        return registry_pb2.RegisterAgentResponse(
            agent=agent,
            agent_token=token,
            heartbeat_interval=seconds(self._config.heartbeat_interval),
            heartbeat_timeout=seconds(self._config.heartbeat_timeout),
            created=created,
        )

    async def DeregisterAgent(
        self, request: registry_pb2.DeregisterAgentRequest, context: Context
    ) -> registry_pb2.DeregisterAgentResponse:
        return registry_pb2.DeregisterAgentResponse(agent=await self._registry.deregister(request.agent_id))

    async def GetAgent(
        self, request: registry_pb2.GetAgentRequest, context: Context
    ) -> registry_pb2.GetAgentResponse:
        return registry_pb2.GetAgentResponse(agent=self._registry.get(request.agent_id))

    async def ListAgents(
        self, request: registry_pb2.ListAgentsRequest, context: Context
    ) -> registry_pb2.ListAgentsResponse:
        agents, token = self._registry.list_agents(request)
        return registry_pb2.ListAgentsResponse(agents=agents, next_page_token=token)

    async def UpdateAgent(
        self, request: registry_pb2.UpdateAgentRequest, context: Context
    ) -> registry_pb2.UpdateAgentResponse:
        agent = await self._registry.update(request.agent_id, request.update, list(request.update_mask.paths))
        return registry_pb2.UpdateAgentResponse(agent=agent)

    async def DrainAgent(
        self, request: registry_pb2.DrainAgentRequest, context: Context
    ) -> registry_pb2.DrainAgentResponse:
        return registry_pb2.DrainAgentResponse(
            agent=await self._registry.set_draining(request.agent_id, True, request.reason)
        )

    async def UndrainAgent(
        self, request: registry_pb2.UndrainAgentRequest, context: Context
    ) -> registry_pb2.UndrainAgentResponse:
        return registry_pb2.UndrainAgentResponse(
            agent=await self._registry.set_draining(request.agent_id, False, "")
        )

    async def SendHeartbeat(
        self, request: registry_pb2.SendHeartbeatRequest, context: Context
    ) -> registry_pb2.SendHeartbeatResponse:
        HEARTBEATS.labels("unary").inc()
        status, expires_at = await self._registry.unary_heartbeat(
            request.agent_id, request.load, request.checks
        )
        response = registry_pb2.SendHeartbeatResponse(
            status=status,
            heartbeat_interval=seconds(self._config.heartbeat_interval),
        )
        response.lease_expires_at.FromNanoseconds(int(expires_at * 1e9))
        return response

    async def Heartbeat(self, request_iterator: Any, context: Context) -> None:  # type: ignore[override]
        hello = await self._read_hello(context)
        session, kept = await self._registry.open_session(
            hello.agent_id, hello.agent_token, context.peer(), hello.running_attempt_ids
        )
        session.handler = asyncio.current_task()
        welcome = registry_pb2.SessionWelcome(
            epoch=session.epoch,
            heartbeat_interval=seconds(self._config.heartbeat_interval),
            heartbeat_timeout=seconds(self._config.heartbeat_timeout),
            kept_attempt_ids=kept,
            agent=self._registry.get(session.agent_id),
        )
        writer = asyncio.create_task(self._pump(session, context, welcome))
        reason = "stream closed"
        try:
            await self._serve(session, context)
        except asyncio.CancelledError:
            if session.ended is None:
                reason = "stream cancelled"
                raise
            # Ended by the server (fenced, timed out, deregistered): finish with its status below.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            reason = session.ended.reason
        finally:
            # Shielded: the client may cancel the call again while the agent is being marked DOWN.
            await asyncio.shield(self._registry.close_session(session, reason))
            await self._stop_writer(session, writer)
        if session.ended is not None:
            await context.abort(grpc.StatusCode[session.ended.code], session.ended.reason)

    async def _read_hello(self, context: Context) -> registry_pb2.SessionHello:
        try:
            first = await asyncio.wait_for(context.read(), self._config.heartbeat_timeout)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello within the heartbeat timeout")
        if first is EOF:
            await context.abort(grpc.StatusCode.CANCELLED, "stream closed before hello")
        if first.WhichOneof("message") != "hello":
            await abort_with(context, InvalidArgument.field("message", "the first message must be a hello"))
        hello: registry_pb2.SessionHello = first.hello
        return hello

    async def _serve(self, session: Session, context: Context) -> None:
        while True:
            message = await context.read()
            if message is EOF:
                return
            kind = message.WhichOneof("message")
            try:
                if kind == "beat":
                    HEARTBEATS.labels("stream").inc()
                    status = self._registry.session_beat(session, message.beat)
                    ack = registry_pb2.HeartbeatResponse(
                        ack=registry_pb2.SessionAck(sequence=message.beat.sequence, status=status)
                    )
                    ack.ack.server_time.GetCurrentTime()
                    session.push(ack)
                elif kind == "task_update":
                    if self._registry.touch(session):
                        self._tasks.session_update(session.agent_id, message.task_update)
                elif kind == "goodbye":
                    session.goodbye = True
                    return
                else:
                    raise InvalidArgument.field("message", "hello may only be sent once, first")
            except (InvalidArgument, FailedPrecondition) as error:
                # A bad beat or a stale task report is refused; the session itself goes on.
                log.info("session %s: refused %s: %s", session.agent_id, kind, error.message)
            except OrchestratorError as error:
                log.info("session %s: %s failed: %s", session.agent_id, kind, error.message)

    @staticmethod
    async def _stop_writer(session: Session, writer: asyncio.Task[None]) -> None:
        """Lets the writer flush what is queued and finish its write in flight before the call ends.

        Cancelling it mid-write leaves the write's operation pending in grpc core; ending the call
        then fails with GRPC_CALL_ERROR_TOO_MANY_OPERATIONS and the client never gets a status."""
        session.outbox.put_nowait(None)  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(asyncio.shield(writer), WRITER_FLUSH_TIMEOUT)
        except TimeoutError:
            writer.cancel()  # a peer that does not read: give up on it
        except asyncio.CancelledError:
            writer.cancel()
            raise

    @staticmethod
    async def _pump(session: Session, context: Context, first: registry_pb2.SessionWelcome) -> None:
        """Writes the welcome, then everything pushed to the session, in order, until None."""
        try:
            await context.write(registry_pb2.HeartbeatResponse(welcome=first))
            while (message := await session.outbox.get()) is not None:
                await context.write(message)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the stream is gone; the reader sees it end too
            log.debug("session %s: write failed: %s", session.agent_id, error)
