"""What a task handler receives (its context) and what it raises to fail on purpose."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from google.protobuf import json_format

from orchestrator_client import v1

ProgressReporter = Callable[[float, str], Coroutine[Any, Any, None]]


class TaskFailure(Exception):
    """Raise from a handler to fail the attempt with a reason code of your choosing.

    Any other exception fails the attempt too (reason: the exception's class name); the task is then
    retried by the orchestrator until it runs out of attempts.
    """

    def __init__(self, message: str, *, reason: str = "", non_retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.non_retryable = non_retryable


class NonRetryableError(TaskFailure):
    """Raise from a handler when retrying cannot help (bad input): the task fails at once."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message, reason=reason, non_retryable=True)


class _TaskInfo:
    """The facts about an attempt that both handler flavours see."""

    def __init__(self, assignment: v1.TaskAssignment) -> None:
        self.task: v1.Task = assignment.task
        """The task as the orchestrator pushed it (raw message)."""
        self.attempt_id: str = assignment.attempt_id
        self.payload: dict[str, Any] = json_format.MessageToDict(assignment.task.spec.payload)
        """The task's payload as plain Python values (JSON numbers arrive as floats)."""

    @property
    def task_id(self) -> str:
        return self.task.task_id

    @property
    def task_type(self) -> str:
        return self.task.spec.type

    @property
    def attempt_number(self) -> int:
        """1-based number of this attempt; above 1 the task was retried or moved."""
        for attempt in self.task.attempts:
            if attempt.attempt_id == self.attempt_id:
                return attempt.number
        return len(self.task.attempts) or 1

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.task.spec.labels)


class TaskContext(_TaskInfo):
    """Passed to an async handler. Cancellation arrives as `asyncio.CancelledError` in the handler."""

    def __init__(self, assignment: v1.TaskAssignment, report: ProgressReporter) -> None:
        super().__init__(assignment)
        self._report = report

    async def report_progress(self, fraction: float, message: str = "") -> None:
        """Tell the orchestrator how far the attempt is (0.0 to 1.0). Best effort: never raises."""
        await self._report(min(1.0, max(0.0, fraction)), message)


class SyncTaskContext(_TaskInfo):
    """Passed to a sync handler, which runs on a worker thread.

    A thread cannot be interrupted, so cancellation is cooperative: long handlers should check
    `cancelled` (a `threading.Event`) now and then and return early when it is set; whatever they
    return after that is discarded.
    """

    def __init__(
        self,
        assignment: v1.TaskAssignment,
        report: ProgressReporter,
        loop: asyncio.AbstractEventLoop,
        progress_timeout: float = 10.0,
    ) -> None:
        super().__init__(assignment)
        self._report = report
        self._loop = loop
        self._progress_timeout = progress_timeout
        self.cancelled = threading.Event()

    def report_progress(self, fraction: float, message: str = "") -> None:
        """Tell the orchestrator how far the attempt is (0.0 to 1.0). Best effort: never raises."""
        future: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(
            self._report(min(1.0, max(0.0, fraction)), message), self._loop
        )
        try:
            future.result(self._progress_timeout)
        except Exception:
            future.cancel()
