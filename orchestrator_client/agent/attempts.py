"""The attempts an agent holds: run each handler, report its outcome until the report lands.

The SDK's side of at-least-once delivery: an assignment seen twice runs once, a result reported
while the server is away is retried until it lands or is refused (a refusal means the attempt moved
on, and it is dropped quietly), and a cancellation or a move stops the handler without a report.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.protobuf import struct_pb2

from orchestrator_client import v1
from orchestrator_client.context import SyncTaskContext, TaskContext, TaskFailure
from orchestrator_client.errors import OrchestratorError, from_grpc_error
from orchestrator_client.retry import TRANSIENT_CODES, Retry

if TYPE_CHECKING:
    from orchestrator_client.v1 import TasksServiceAsyncStub

log = logging.getLogger("orchestrator_client.agent")

TaskResult = Mapping[str, Any] | None
AsyncHandler = Callable[[TaskContext], Awaitable[TaskResult]]
SyncHandler = Callable[[SyncTaskContext], TaskResult]

# A result report answered with these will never land: the attempt was moved, cancelled or is gone.
_REPORT_REFUSED_CODES = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND})
# A report is retried on the transient codes, and on UNAUTHENTICATED: the session is renewing the
# credential (it registers again on that code), and the next attempt carries the new one.
REPORT_RETRY_CODES = TRANSIENT_CODES | {grpc.StatusCode.UNAUTHENTICATED}


@dataclass
class _Handler:
    function: Callable[..., Any]
    is_async: bool


@dataclass
class _Attempt:
    """An attempt this agent holds: its handler is running, or its result is being reported."""

    assignment: v1.TaskAssignment
    supervisor: asyncio.Task[None] | None = None
    handler: asyncio.Future[Any] | None = None
    sync_context: SyncTaskContext | None = None
    # Why the SDK stopped the handler: "cancelled" (the task was cancelled), "moved" (the server
    # placed the attempt elsewhere), "shutdown" (handed back on a graceful stop).
    stop_reason: str | None = None

    @property
    def attempt_id(self) -> str:
        return self.assignment.attempt_id

    @property
    def task_id(self) -> str:
        return self.assignment.task.task_id

    @property
    def handler_running(self) -> bool:
        return self.handler is None or not self.handler.done()


@dataclass
class _SessionState:
    """The open session as the attempts see it: the queue of messages to the server."""

    outbox: asyncio.Queue[v1.HeartbeatRequest | None] = field(default_factory=asyncio.Queue)


class _AttemptRunner:
    """The attempts half of `Agent` (its state is set up in `Agent.__init__`)."""

    name: str
    max_concurrent_tasks: int
    _handlers: dict[str, _Handler]
    _attempts: dict[str, _Attempt]
    _session: _SessionState | None
    _stopping: bool
    _executor: ThreadPoolExecutor | None
    _tasks: TasksServiceAsyncStub | None
    _call_timeout: float
    _report_retry: Retry
    _token: str | None

    def _agent_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token}"),) if self._token else ()

    def _busy_handlers(self) -> int:
        return sum(1 for attempt in self._attempts.values() if attempt.handler_running)

    def _send_update(self, attempt: _Attempt, kind: v1.TaskUpdateKind.ValueType, **fields: Any) -> bool:
        """Queue a task update on the open session; False when there is none."""
        session = self._session
        if session is None:
            return False
        update = v1.SessionTaskUpdate(
            task_id=attempt.task_id, attempt_id=attempt.attempt_id, kind=kind, **fields
        )
        session.outbox.put_nowait(v1.HeartbeatRequest(task_update=update))
        return True

    def _on_assignment(self, assignment: v1.TaskAssignment, session: _SessionState) -> None:
        attempt = _Attempt(assignment)
        if attempt.attempt_id in self._attempts:
            return  # delivery is at-least-once: this attempt is already ours
        task_type = assignment.task.spec.type
        refusal = None
        if self._stopping:
            refusal = "agent shutting down"
        elif task_type not in self._handlers:
            refusal = f"no handler for task type {task_type!r}"
        elif self._busy_handlers() >= self.max_concurrent_tasks:
            refusal = f"at capacity ({self.max_concurrent_tasks} tasks)"
        if refusal is not None:
            log.info("rejecting attempt %s: %s", attempt.attempt_id, refusal)
            update = v1.SessionTaskUpdate(
                task_id=attempt.task_id,
                attempt_id=attempt.attempt_id,
                kind=v1.TaskUpdateKind.TASK_UPDATE_KIND_REJECTED,
                reason=refusal,
            )
            session.outbox.put_nowait(v1.HeartbeatRequest(task_update=update))
            return
        self._attempts[attempt.attempt_id] = attempt
        attempt.supervisor = asyncio.create_task(
            self._supervise(attempt), name=f"attempt-{attempt.attempt_id}"
        )

    def _stop_attempt(self, attempt_id: str, reason: str) -> None:
        attempt = self._attempts.get(attempt_id)
        if attempt is None or attempt.stop_reason is not None:
            return
        attempt.stop_reason = reason
        if attempt.sync_context is not None:
            attempt.sync_context.cancelled.set()
        if attempt.handler is not None and not attempt.handler.done():
            attempt.handler.cancel()
        elif reason != "shutdown" and attempt.supervisor is not None:
            # The handler already finished; its report would be refused anyway.
            attempt.supervisor.cancel()

    async def _supervise(self, attempt: _Attempt) -> None:
        """Run one attempt's handler and report its outcome; the SDK's side of at-least-once."""
        try:
            if not self._send_update(attempt, v1.TaskUpdateKind.TASK_UPDATE_KIND_STARTED):
                await self._report_progress_unary(attempt, 0.0, "started")
            handler = self._handlers[attempt.assignment.task.spec.type]
            attempt.handler = self._start_handler(handler, attempt)
            try:
                outcome = await attempt.handler
            except asyncio.CancelledError:
                if not attempt.handler.cancelled():
                    raise  # this supervisor itself is being cancelled
                if attempt.stop_reason is not None:
                    log.info("attempt %s stopped (%s)", attempt.attempt_id, attempt.stop_reason)
                    return
                await self._fail_attempt(
                    attempt, "handler cancelled itself", "CANCELLED", non_retryable=False
                )
                return
            except TaskFailure as exc:
                await self._fail_attempt(attempt, exc.message, exc.reason, exc.non_retryable)
                return
            except Exception as exc:
                log.exception("handler for attempt %s failed", attempt.attempt_id)
                await self._fail_attempt(
                    attempt, str(exc) or repr(exc), type(exc).__name__, non_retryable=False
                )
                return
            if attempt.stop_reason in ("cancelled", "moved"):
                return  # the handler ignored the cancellation; its result would be refused
            await self._complete_attempt(attempt, outcome)
        finally:
            self._attempts.pop(attempt.attempt_id, None)

    def _start_handler(self, handler: _Handler, attempt: _Attempt) -> asyncio.Future[Any]:
        if handler.is_async:
            context = TaskContext(attempt.assignment, functools.partial(self._progress, attempt))
            return asyncio.ensure_future(cast(Awaitable[Any], handler.function(context)))
        loop = asyncio.get_running_loop()
        sync_context = SyncTaskContext(attempt.assignment, functools.partial(self._progress, attempt), loop)
        attempt.sync_context = sync_context
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=max(1, self.max_concurrent_tasks), thread_name_prefix=f"{self.name}-handler"
            )
        return loop.run_in_executor(self._executor, handler.function, sync_context)

    async def _progress(self, attempt: _Attempt, fraction: float, message: str) -> None:
        progress = v1.TaskProgress(fraction=fraction, message=message)
        if not self._send_update(attempt, v1.TaskUpdateKind.TASK_UPDATE_KIND_PROGRESS, progress=progress):
            await self._report_progress_unary(attempt, fraction, message)

    async def _report_progress_unary(self, attempt: _Attempt, fraction: float, message: str) -> None:
        """Progress (or STARTED) when no session is open; best effort, the result report matters."""
        assert self._tasks is not None
        request = v1.ReportTaskProgressRequest(
            task_id=attempt.task_id,
            attempt_id=attempt.attempt_id,
            progress=v1.TaskProgress(fraction=fraction, message=message),
        )
        try:
            await self._tasks.ReportTaskProgress(
                request, metadata=self._agent_metadata(), timeout=self._call_timeout
            )
        except grpc.RpcError as err:
            log.debug("progress of %s not delivered: %s", attempt.attempt_id, from_grpc_error(err))

    async def _complete_attempt(self, attempt: _Attempt, outcome: Any) -> None:
        result = struct_pb2.Struct()
        try:
            if outcome is not None:
                if not isinstance(outcome, Mapping):
                    raise TypeError(f"a handler returns a mapping or None, not {type(outcome).__name__}")
                result.update(outcome)
        except (TypeError, ValueError) as exc:
            await self._fail_attempt(attempt, f"invalid result: {exc}", "INVALID_RESULT", non_retryable=True)
            return
        request = v1.CompleteTaskRequest(
            task_id=attempt.task_id, attempt_id=attempt.attempt_id, result=result
        )
        try:
            await self._report(attempt, lambda deadline: self._complete_call(request, deadline))
        except OrchestratorError as error:
            # The server refused the result itself (too large, not valid): fail rather than hang.
            await self._fail_attempt(attempt, f"result rejected: {error.message}", "RESULT_REJECTED", True)

    async def _complete_call(self, request: v1.CompleteTaskRequest, deadline: float) -> object:
        assert self._tasks is not None
        return await self._tasks.CompleteTask(request, metadata=self._agent_metadata(), timeout=deadline)

    async def _fail_attempt(self, attempt: _Attempt, message: str, reason: str, non_retryable: bool) -> None:
        request = v1.FailTaskRequest(
            task_id=attempt.task_id,
            attempt_id=attempt.attempt_id,
            error=v1.TaskError(message=message[:4096], reason=reason, non_retryable=non_retryable),
        )

        async def call(deadline: float) -> object:
            assert self._tasks is not None
            return await self._tasks.FailTask(request, metadata=self._agent_metadata(), timeout=deadline)

        try:
            await self._report(attempt, call)
        except OrchestratorError as error:
            log.error("failure of attempt %s not accepted: %s", attempt.attempt_id, error)

    async def _report(self, attempt: _Attempt, call: Callable[[float], Awaitable[object]]) -> None:
        """Deliver a result: retried while the server is away, until it lands or is refused.

        Refusals (FAILED_PRECONDITION, NOT_FOUND) mean the attempt is no longer ours (moved, handed
        back, cancelled): dropped quietly. Other errors are raised to the caller.
        """

        def retrying(error: OrchestratorError) -> None:
            log.info("report for attempt %s failed (%s); retrying", attempt.attempt_id, error)

        async def deliver(_: float | None) -> object:
            # No deadline over the retries (the result must land); each attempt has its own.
            return await call(self._call_timeout)

        try:
            await replace(self._report_retry, on_error=retrying).run(deliver)
        except OrchestratorError as error:
            if error.grpc_code not in _REPORT_REFUSED_CODES:
                raise
            log.info("report for attempt %s refused (%s): it moved on", attempt.attempt_id, error)
