"""A scripted orchestrator: real grpc.aio server on 127.0.0.1:0 whose answers the test decides.

It speaks RegistryService (RegisterAgent, the Heartbeat session) and TasksService (CompleteTask,
FailTask, ReportTaskProgress) just far enough for the SDK's agent, records what it receives, and
fails calls with real rich statuses built by grpcio-status (`rpc_status.to_status`).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from orchestrator_client import v1


def rich_status(code: grpc.StatusCode, message: str, *details: Message) -> grpc.Status:
    """A grpc.Status carrying a google.rpc.Status with `details`, as a real server sends it."""
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=packed)
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    await context.abort(status.code, status.details, status.trailing_metadata)


@dataclass
class ScriptedSession:
    """One Heartbeat stream as the server sees it."""

    hello: v1.SessionHello
    metadata: dict[str, str]
    received: asyncio.Queue[v1.HeartbeatRequest] = field(default_factory=asyncio.Queue)
    outbox: asyncio.Queue[v1.HeartbeatResponse | grpc.Status | None] = field(default_factory=asyncio.Queue)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    goodbye: v1.SessionGoodbye | None = None

    def push(self, message: v1.HeartbeatResponse) -> None:
        self.outbox.put_nowait(message)

    def end(self, status: grpc.Status | None = None) -> None:
        """Close the stream: OK (None) or with an error status."""
        self.outbox.put_nowait(status)

    async def next_of(self, kind: str, within: float = 10.0) -> v1.HeartbeatRequest:
        """The next client message of one kind (beat, task_update, goodbye), skipping others."""
        async with asyncio.timeout(within):
            while True:
                message = await self.received.get()
                if message.WhichOneof("message") == kind:
                    return message


class ScriptedOrchestrator(v1.RegistryServiceServicer, v1.TasksServiceServicer):
    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.port = 0
        self.registrations: list[v1.RegisterAgentRequest] = []
        self.register_metadata: list[dict[str, str]] = []
        self.register_failures: deque[grpc.Status] = deque()
        self.hello_failures: deque[grpc.Status] = deque()
        self.report_failures: deque[grpc.Status] = deque()
        self.refused_attempts: set[str] = set()
        self.sessions: list[ScriptedSession] = []
        self.new_session: asyncio.Queue[ScriptedSession] = asyncio.Queue()
        self.completed: list[v1.CompleteTaskRequest] = []
        self.failed: list[v1.FailTaskRequest] = []
        self.progress: list[v1.ReportTaskProgressRequest] = []
        self.report_metadata: list[dict[str, str]] = []
        self.reported = asyncio.Condition()
        self.kept_attempts: Sequence[str] | None = None  # None: keep whatever the hello lists
        self.heartbeat_interval = 0.05
        self.heartbeat_timeout = 5.0
        self.auto_ack = True
        self._epochs = itertools.count(1)
        self._tokens = itertools.count(1)
        self.token = ""
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        v1.add_RegistryServiceServicer_to_server(self, self.server)
        v1.add_TasksServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(None)

    # -------------------------------------------------------------------------------- registry
    async def RegisterAgent(self, request: Any, context: Any) -> v1.RegisterAgentResponse:
        self.registrations.append(request)
        self.register_metadata.append(dict(context.invocation_metadata()))
        if self.register_failures:
            await abort(context, self.register_failures.popleft())
        self.token = f"token-{next(self._tokens)}"
        return v1.RegisterAgentResponse(
            agent=v1.Agent(agent_id="agent-1", name=request.name, instance_id=request.instance_id),
            agent_token=self.token,
            heartbeat_interval=duration_pb2.Duration(nanos=int(self.heartbeat_interval * 1e9)),
            heartbeat_timeout=duration_pb2.Duration(seconds=int(self.heartbeat_timeout)),
            created=len(self.registrations) == 1,
        )

    async def Heartbeat(self, request_iterator: Any, context: Any) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        if self.hello_failures:
            await abort(context, self.hello_failures.popleft())
        session = ScriptedSession(hello=first.hello, metadata=dict(context.invocation_metadata()))
        self.sessions.append(session)
        kept = first.hello.running_attempt_ids if self.kept_attempts is None else self.kept_attempts
        await context.write(
            v1.HeartbeatResponse(
                welcome=v1.SessionWelcome(
                    epoch=next(self._epochs),
                    heartbeat_interval=duration_pb2.Duration(nanos=int(self.heartbeat_interval * 1e9)),
                    heartbeat_timeout=duration_pb2.Duration(seconds=int(self.heartbeat_timeout)),
                    kept_attempt_ids=kept,
                )
            )
        )
        self.new_session.put_nowait(session)
        reader = asyncio.create_task(self._read(session, context))
        try:
            while True:
                outgoing = await session.outbox.get()
                if outgoing is None:
                    return
                if isinstance(outgoing, grpc.Status):
                    await abort(context, outgoing)
                await context.write(outgoing)
        finally:
            reader.cancel()
            session.ended.set()

    async def _read(self, session: ScriptedSession, context: Any) -> None:
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                session.end()
                return
            session.received.put_nowait(message)
            kind = message.WhichOneof("message")
            if kind == "beat" and self.auto_ack:
                session.push(v1.HeartbeatResponse(ack=v1.SessionAck(sequence=message.beat.sequence)))
            elif kind == "goodbye":
                session.goodbye = message.goodbye

    # ----------------------------------------------------------------------------------- tasks
    async def _report(self, request: Any, context: Any, sink: list[Any]) -> None:
        self.report_metadata.append(dict(context.invocation_metadata()))
        if self.report_failures:
            await abort(context, self.report_failures.popleft())
        if request.attempt_id in self.refused_attempts:
            await abort(context, rich_status(grpc.StatusCode.FAILED_PRECONDITION, "attempt superseded"))
        async with self.reported:
            sink.append(request)
            self.reported.notify_all()

    async def CompleteTask(self, request: Any, context: Any) -> v1.CompleteTaskResponse:
        await self._report(request, context, self.completed)
        return v1.CompleteTaskResponse()

    async def FailTask(self, request: Any, context: Any) -> v1.FailTaskResponse:
        await self._report(request, context, self.failed)
        return v1.FailTaskResponse()

    async def ReportTaskProgress(self, request: Any, context: Any) -> v1.ReportTaskProgressResponse:
        self.progress.append(request)
        return v1.ReportTaskProgressResponse()

    async def wait_reports(self, count: int, within: float = 10.0) -> None:
        """Until `count` results (completions plus failures) have landed."""
        async with asyncio.timeout(within), self.reported:
            await self.reported.wait_for(lambda: len(self.completed) + len(self.failed) >= count)


def assignment(
    task_type: str, attempt_id: str, payload: dict[str, Any] | None = None
) -> v1.HeartbeatResponse:
    task = v1.Task(task_id=f"task-{attempt_id}", spec=v1.TaskSpec(type=task_type))
    if payload:
        task.spec.payload.update(payload)
    task.attempts.add(attempt_id=attempt_id, number=1)
    return v1.HeartbeatResponse(assignment=v1.TaskAssignment(task=task, attempt_id=attempt_id))
