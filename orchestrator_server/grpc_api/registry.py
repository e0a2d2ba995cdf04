"""RegistryService over gRPC, including the Heartbeat session stream."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import grpc
from google.protobuf.message import Error as ProtobufError

from orchestrator.v1 import registry_pb2, registry_pb2_grpc, task_pb2
from orchestrator_server.agents import DRAIN_RETRY_AFTER, CloseReason, Registry, Session
from orchestrator_server.config import Config
from orchestrator_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    OrchestratorError,
    ResourceExhausted,
    Unavailable,
)
from orchestrator_server.grpc_api.errors import abort_with
from orchestrator_server.grpc_api.interceptors import authenticated_caller
from orchestrator_server.grpc_api.pages import EncodedMethods, PageEncoder
from orchestrator_server.metrics import HEARTBEATS
from orchestrator_server.tasks import TaskScheduler

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
# How long a closing session may take to write what is queued for it.
WRITER_FLUSH_TIMEOUT = 1.0
# End-of-stream marker of context.read(); missing from the type stubs.
EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009


# `labels()` costs microseconds, a tenth of a REST heartbeat.
_UNARY_BEATS = HEARTBEATS.labels("unary")
_LIST_AGENTS = PageEncoder(registry_pb2.ListAgentsResponse.DESCRIPTOR)

# The status a session ends with, by why the server ended it.
CLOSE_CODES = {
    CloseReason.FENCED: grpc.StatusCode.ABORTED,
    CloseReason.TIMED_OUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    CloseReason.DEREGISTERED: grpc.StatusCode.NOT_FOUND,
    CloseReason.UNDELIVERABLE: grpc.StatusCode.INTERNAL,
    CloseReason.SHUTDOWN: grpc.StatusCode.UNAVAILABLE,
}


class StreamPort:
    """The domain's `SessionPort` over one Heartbeat stream: what the domain pushes goes to the
    outbox the stream's writer drains; closing cancels the handler, which ends the call with the
    status the reason maps to."""

    def __init__(self) -> None:
        # None marks the end of what is to be written.
        self.outbox: asyncio.Queue[registry_pb2.HeartbeatResponse | None] = asyncio.Queue()
        self.ended: tuple[grpc.StatusCode, str] | None = None
        self._handler: asyncio.Task[object] | None = None

    def attach(self, handler: asyncio.Task[object] | None) -> None:
        """The task serving the stream, cancelled to end it (at once if the session already ended)."""
        self._handler = handler
        if self.ended is not None and handler is not None:
            handler.cancel()

    def assign(self, task: task_pb2.Task, attempt_id: str) -> None:
        assignment = registry_pb2.TaskAssignment(task=task, attempt_id=attempt_id)
        self.outbox.put_nowait(registry_pb2.HeartbeatResponse(assignment=assignment))

    def cancel(self, task_id: str, attempt_id: str, reason: str) -> None:
        cancellation = registry_pb2.TaskCancellation(task_id=task_id, attempt_id=attempt_id, reason=reason)
        self.outbox.put_nowait(registry_pb2.HeartbeatResponse(cancellation=cancellation))

    def drain(self, draining: bool, reason: str) -> None:
        notice = registry_pb2.DrainNotice(draining=draining, reason=reason)
        self.outbox.put_nowait(registry_pb2.HeartbeatResponse(drain=notice))

    def reconnect(self, reason: str) -> None:
        request = registry_pb2.ReconnectRequest(reason=reason)
        self.outbox.put_nowait(registry_pb2.HeartbeatResponse(reconnect=request))

    def close(self, reason: CloseReason, message: str) -> None:
        if self.ended is None:
            self.ended = (CLOSE_CODES[reason], message)
            if self._handler is not None and not self._handler.done():
                self._handler.cancel()


@functools.lru_cache(maxsize=64)
def seconds(value: float) -> Any:
    """`value` as a Duration. The values are the configured intervals; a field set from the cached
    message copies it, so one serves every answer."""
    from google.protobuf import duration_pb2

    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, config: Config, registry: Registry, tasks: TaskScheduler) -> None:
        self._config = config
        self._registry = registry
        self._tasks = tasks
        # Streams that have not sent their hello yet: they carry no identity, so the
        # per-principal stream cap cannot count them; this does (MAX_PENDING_HELLOS).
        self._awaiting_hello = 0
        # Set when the server begins to drain: new sessions are refused with a reconnect hint.
        self._refusing_sessions = False
        # Session writers, held strongly until they finish: a writer the loop only references
        # weakly is collected mid-await when its call dies ("Task was destroyed but it is pending").
        self._writers: set[asyncio.Task[None]] = set()

    @property
    def pending_hellos(self) -> int:
        """Open Heartbeat streams that have not sent their hello yet."""
        return self._awaiting_hello

    def refuse_new_sessions(self) -> None:
        """From now on every new Heartbeat stream is answered UNAVAILABLE with a retry hint."""
        self._refusing_sessions = True

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

    async def _list_agents_encoded(self, request: registry_pb2.ListAgentsRequest, context: Context) -> bytes:
        agents, token = self._registry.list_agents(request)
        return _LIST_AGENTS.encode(agents, token)

    def encoded_methods(self) -> EncodedMethods:
        """What the in-process gateway may take as bytes (`grpc_api.pages`)."""
        return {"ListAgents": self._list_agents_encoded}

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
        _UNARY_BEATS.inc()
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
        if self._refusing_sessions:
            raise Unavailable(
                "the orchestrator is draining for a restart; reconnect shortly", DRAIN_RETRY_AFTER
            )
        hello = await self._read_hello(context)
        if hello is None:
            return  # the client left before its hello: nobody to answer
        # Which attempts the agent keeps is known once the tasks agents hold are restored.
        await self._tasks.until_attachable()
        port = StreamPort()
        session, kept = await self._registry.open_session(
            hello.agent_id,
            hello.agent_token,
            context.peer(),
            hello.running_attempt_ids,
            hello.incarnation,
            port=port,
        )
        welcome = registry_pb2.SessionWelcome(
            epoch=session.epoch,
            heartbeat_interval=seconds(self._config.heartbeat_interval),
            heartbeat_timeout=seconds(self._config.heartbeat_timeout),
            kept_attempt_ids=kept,
            agent=self._registry.get(session.agent_id),
        )
        writer = asyncio.create_task(
            self._pump(session, port, context, registry_pb2.HeartbeatResponse(welcome=welcome))
        )
        self._writers.add(writer)
        writer.add_done_callback(self._writers.discard)
        reason = "stream closed"
        port.attach(asyncio.current_task())
        try:
            await self._serve(session, port, context)
        except asyncio.CancelledError:
            if port.ended is None:
                reason = "stream cancelled"
                raise
            # Ended by the server (fenced, timed out, deregistered): finish with its status below.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            reason = port.ended[1]
        finally:
            await self._end(session, port, reason, writer)
        if port.ended is not None:
            try:
                await context.abort(*port.ended)
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # the peer left as the server ended it: nobody to tell
                log.debug("session %s: could not send its end: %s", session.agent_id, error)

    async def _end(self, session: Session, port: StreamPort, reason: str, writer: asyncio.Task[None]) -> None:
        """Marks the agent DOWN (unless fenced) and stops the writer, even if the call is cancelled
        again meanwhile: a killed peer's call may be cancelled more than once, and neither step
        may be skipped (a DOWN never recorded, a writer left pending)."""
        closing = asyncio.ensure_future(self._registry.close_session(session, reason))
        try:
            await asyncio.shield(closing)
        finally:
            await self._stop_writer(port, writer)

    async def _read_hello(self, context: Context) -> registry_pb2.SessionHello | None:
        limit = self._config.max_pending_hellos
        if self._awaiting_hello >= limit:
            raise ResourceExhausted(
                f"{limit} session streams are already waiting for their hello (MAX_PENDING_HELLOS)",
                retry_after=1.0,
            )
        self._awaiting_hello += 1
        try:
            first = await asyncio.wait_for(context.read(), self._config.hello_timeout)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no hello within {self._config.hello_timeout:g} s (HELLO_TIMEOUT)",
            )
        finally:
            self._awaiting_hello -= 1
        if first is EOF:
            return None
        if first.WhichOneof("message") != "hello":
            await abort_with(context, InvalidArgument.field("message", "the first message must be a hello"))
        hello: registry_pb2.SessionHello = first.hello
        return hello

    async def _serve(self, session: Session, port: StreamPort, context: Context) -> None:
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
                    port.outbox.put_nowait(ack)
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
    async def _stop_writer(port: StreamPort, writer: asyncio.Task[None]) -> None:
        """Lets the writer flush what is queued and finish its write in flight before the call ends.

        Cancelling it mid-write leaves the write's operation pending in grpc core; ending the call
        then fails with GRPC_CALL_ERROR_TOO_MANY_OPERATIONS and the client never gets a status."""
        port.outbox.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(writer), WRITER_FLUSH_TIMEOUT)
        except TimeoutError:
            writer.cancel()  # a peer that does not read: give up on it
        except asyncio.CancelledError:
            writer.cancel()
            raise

    @staticmethod
    async def _pump(
        session: Session, port: StreamPort, context: Context, first: registry_pb2.HeartbeatResponse
    ) -> None:
        """Writes the welcome, then everything pushed to the session, in order, until None.

        A message that cannot be delivered ends the session (the agent goes DOWN and reconnects):
        a session whose writer died would otherwise stay READY with nobody writing to it."""
        message: registry_pb2.HeartbeatResponse | None = first
        try:
            while message is not None:
                if message.WhichOneof("message") == "assignment":
                    _check_readable(message)
                await context.write(message)
                message = await port.outbox.get()
        except asyncio.CancelledError:
            raise
        except ProtobufError as error:
            # The stream works but this message cannot cross it: end the session so it shows.
            log.warning("session %s: cannot deliver %s: %s", session.agent_id, _kind(message), error)
            session.close(
                CloseReason.UNDELIVERABLE, f"the session could not deliver a {_kind(message)}: {error}"
            )
        except Exception as error:  # the stream is gone; the reader sees it end too
            log.debug("session %s: write failed: %s", session.agent_id, error)


def _kind(message: registry_pb2.HeartbeatResponse | None) -> str:
    return (message.WhichOneof("message") or "message") if message is not None else "message"


def _check_readable(message: registry_pb2.HeartbeatResponse) -> None:
    """Raises if a client could not parse `message`: an assignment carries the caller's payload, and
    one nested deeper than protobuf parsers accept is written fine here but breaks the agent's
    stream silently on its side (it hangs with no status), leaving a READY agent that gets nothing."""
    registry_pb2.HeartbeatResponse.FromString(message.SerializeToString())
