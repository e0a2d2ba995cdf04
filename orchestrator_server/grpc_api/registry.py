"""RegistryService over gRPC, including the Heartbeat session stream."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from typing import Any

import grpc
from google.protobuf.message import Error as ProtobufError

from orchestrator.v1 import registry_pb2, registry_pb2_grpc, task_pb2
from orchestrator_server.agents import DRAIN_RETRY_AFTER, CloseReason, Registry, Session
from orchestrator_server.agents.status import stamp_now
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
# The metric child of stream beats, looked up once (labels() costs a lookup per call).
STREAM_HEARTBEATS = HEARTBEATS.labels("stream")


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
    """The domain's `SessionPort` over one Heartbeat stream, and the one way anything is written to it.

    grpc allows one write in flight per call. The stream's reader writes each ack itself, awaiting it
    (as a bare echo loop does): no second task per session and no queue round trip per beat. What
    the domain pushes meanwhile (assignments, cancellations, drain, reconnect) waits in the outbox;
    whoever finishes a write hands the outbox to a short-lived flusher task, which writes it in order
    and ends. Closing cancels the handler, which ends the call with the status the reason maps to,
    except in the middle of its own write (cancelling a write leaves its operation pending in grpc
    core, and the call's status then never reaches the client): it stops when the write is done."""

    def __init__(self, agent_id: str, context: Context) -> None:
        self._agent_id = agent_id
        self._context = context
        self._outbox: collections.deque[registry_pb2.HeartbeatResponse] = collections.deque()
        # Someone owns the stream's one write: the handler (until its welcome is out, then while it
        # writes an ack) or the flusher. Pushes made meanwhile wait in the outbox.
        self._writing = True
        self._handler_writing = False
        self._flusher: asyncio.Task[None] | None = None
        self._stopped = False
        self.ended: tuple[grpc.StatusCode, str] | None = None
        self._handler: asyncio.Task[object] | None = None
        self._session: Session | None = None

    def attach(self, handler: asyncio.Task[object] | None, session: Session) -> None:
        """The task serving the stream, which `close` cancels to end it from now on.

        A session closed before this (while it was opening) is not cancelled here: the handler's
        next await is the welcome's write, and a write cancelled in flight leaves the call unable
        to send its status, so the client would hang after the welcome. The handler sees `ended`
        once the welcome is out and ends the call with its status."""
        self._handler = handler
        self._session = session

    def assign(self, task: task_pb2.Task, attempt_id: str) -> None:
        assignment = registry_pb2.TaskAssignment(task=task, attempt_id=attempt_id)
        self.push(registry_pb2.HeartbeatResponse(assignment=assignment))

    def cancel(self, task_id: str, attempt_id: str, reason: str) -> None:
        cancellation = registry_pb2.TaskCancellation(task_id=task_id, attempt_id=attempt_id, reason=reason)
        self.push(registry_pb2.HeartbeatResponse(cancellation=cancellation))

    def drain(self, draining: bool, reason: str) -> None:
        notice = registry_pb2.DrainNotice(draining=draining, reason=reason)
        self.push(registry_pb2.HeartbeatResponse(drain=notice))

    def reconnect(self, reason: str) -> None:
        request = registry_pb2.ReconnectRequest(reason=reason)
        self.push(registry_pb2.HeartbeatResponse(reconnect=request))

    def close(self, reason: CloseReason, message: str) -> None:
        if self.ended is None:
            self.ended = (CLOSE_CODES[reason], message)
            if self._handler is not None and not self._handler.done() and not self._handler_writing:
                self._handler.cancel()

    async def send(self, message: registry_pb2.HeartbeatResponse) -> None:
        """Written by the handler itself (the welcome, then each ack), or queued behind a push."""
        if self._writing and not self._handler_writing and self._flusher is not None:
            self._outbox.append(message)  # the flusher is busy: it writes this in turn
            return
        self._writing = self._handler_writing = True
        try:
            await self._write(message)
        finally:
            self._handler_writing = False
            self._release()

    async def flush(self) -> None:
        """Lets the flusher write what is queued and finish its write in flight before the call ends.

        Cancelling it mid-write leaves the write's operation pending in grpc core; ending the call
        then fails with GRPC_CALL_ERROR_TOO_MANY_OPERATIONS and the client never gets a status."""
        flusher = self._flusher
        if flusher is None:
            self._stopped = True
            return
        try:
            await asyncio.wait_for(asyncio.shield(flusher), WRITER_FLUSH_TIMEOUT)
        except TimeoutError:
            flusher.cancel()  # a peer that does not read: give up on it
        except asyncio.CancelledError:
            flusher.cancel()
            raise
        finally:
            self._stopped = True  # a push after the end would start a flusher nobody awaits

    def push(self, message: registry_pb2.HeartbeatResponse) -> None:
        """Queues `message` for the stream; written in order after whatever is being written."""
        self._outbox.append(message)
        if not self._writing:
            self._release()

    def _release(self) -> None:
        """The write is done: the outbox goes to a flusher, or the stream is free."""
        if self._outbox and not self._stopped:
            self._writing = True
            self._flusher = asyncio.get_running_loop().create_task(self._flush_outbox())
        else:
            self._writing = False

    async def _flush_outbox(self) -> None:
        try:
            while self._outbox and not self._stopped:
                await self._write(self._outbox.popleft())
        finally:
            self._flusher = None
            self._writing = False

    async def _write(self, message: registry_pb2.HeartbeatResponse) -> None:
        """A message that cannot be delivered ends the session (the agent goes DOWN and reconnects):
        a session that silently lost its pushes would otherwise stay READY with nothing arriving."""
        if self._stopped:
            return
        try:
            if message.WhichOneof("message") == "assignment":
                _check_readable(message)
            await self._context.write(message)
        except asyncio.CancelledError:
            raise
        except ProtobufError as error:
            # The stream works but this message cannot cross it: end the session so it shows.
            log.warning("session %s: cannot deliver %s: %s", self._agent_id, _kind(message), error)
            self._stopped = True
            if self._session is not None:
                self._session.close(
                    CloseReason.UNDELIVERABLE, f"the session could not deliver a {_kind(message)}: {error}"
                )
        except Exception as error:  # the stream is gone; the reader sees it end too
            log.debug("session %s: write failed: %s", self._agent_id, error)
            self._stopped = True


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
        return _LIST_AGENTS.encode(agents, token, self._registry.encoded)

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
        port = StreamPort(hello.agent_id, context)
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
        reason = "stream closed"
        port.attach(asyncio.current_task(), session)
        try:
            await port.send(registry_pb2.HeartbeatResponse(welcome=welcome))
            if port.ended is None:
                await self._serve(session, port, context)
            if port.ended is not None:
                reason = port.ended[1]
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
            await self._end(session, port, reason)
        if port.ended is not None:
            try:
                await context.abort(*port.ended)
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # the peer left as the server ended it: nobody to tell
                log.debug("session %s: could not send its end: %s", session.agent_id, error)

    async def _end(self, session: Session, port: StreamPort, reason: str) -> None:
        """Marks the agent DOWN (unless fenced) and lets queued pushes out, even if the call is
        cancelled again meanwhile: a killed peer's call may be cancelled more than once, and neither
        step may be skipped (a DOWN never recorded, a flusher left pending)."""
        closing = asyncio.ensure_future(self._registry.close_session(session, reason))
        try:
            await asyncio.shield(closing)
        finally:
            await port.flush()

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
        beats = STREAM_HEARTBEATS
        while True:
            message = await context.read()
            if message is EOF:
                return
            kind = message.WhichOneof("message")
            try:
                if kind == "beat":
                    beats.inc()
                    beat = message.beat
                    ack = registry_pb2.HeartbeatResponse()
                    ack.ack.sequence = beat.sequence
                    ack.ack.status = self._registry.session_beat(session, beat)
                    stamp_now(ack.ack.server_time)
                    await port.send(ack)
                    if port.ended is not None:
                        return  # closed while the ack was being written
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


def _kind(message: registry_pb2.HeartbeatResponse | None) -> str:
    return (message.WhichOneof("message") or "message") if message is not None else "message"


def _check_readable(message: registry_pb2.HeartbeatResponse) -> None:
    """Raises if a client could not parse `message`: an assignment carries the caller's payload, and
    one nested deeper than protobuf parsers accept is written fine here but breaks the agent's
    stream silently on its side (it hangs with no status), leaving a READY agent that gets nothing."""
    registry_pb2.HeartbeatResponse.FromString(message.SerializeToString())
