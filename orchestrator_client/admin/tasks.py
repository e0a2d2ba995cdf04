"""`AdminClient`'s task methods: create, get, list, assign, cancel, and following a task to its end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2

from orchestrator_client import v1
from orchestrator_client.admin.calls import AdminCalls

TERMINAL_TASK_STATUSES = frozenset(
    {
        v1.TaskStatus.TASK_STATUS_SUCCEEDED,
        v1.TaskStatus.TASK_STATUS_FAILED,
        v1.TaskStatus.TASK_STATUS_CANCELLED,
        v1.TaskStatus.TASK_STATUS_TIMED_OUT,
    }
)


def _duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(seconds=seconds))
    return duration


class TaskAdmin(AdminCalls):
    """Submitting and operating tasks, and following one to its end."""

    async def create_task(
        self,
        task_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        required_capabilities: Iterable[str] = (),
        label_selector: str = "",
        target_agent_id: str = "",
        priority: int = 0,
        queue_timeout: float | None = None,
        run_timeout: float | None = None,
        max_attempts: int = 0,
        idempotency_key: str = "",
        routing_key: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> v1.Task:
        """Create a task. With an `idempotency_key` the call is retried safely (the same key and spec
        from the same credential return the same task; the same key with another spec raises the
        ALREADY_EXISTS error); without one it is tried once."""
        spec = v1.TaskSpec(
            type=task_type,
            required_capabilities=required_capabilities,
            label_selector=label_selector,
            target_agent_id=target_agent_id,
            priority=priority,
            queue_timeout=_duration(queue_timeout),
            run_timeout=_duration(run_timeout),
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
            routing_key=routing_key,
            labels=labels,
        )
        if payload is not None:
            spec.payload.update(payload)
        request = v1.CreateTaskRequest(spec=spec)
        response = await self._unary(
            lambda: self.tasks.CreateTask, request, timeout=timeout, idempotent=bool(idempotency_key)
        )
        return response.task

    async def get_task(self, task_id: str, *, timeout: float | None = None) -> v1.Task:
        request = v1.GetTaskRequest(task_id=task_id)
        response = await self._unary(lambda: self.tasks.GetTask, request, timeout=timeout, idempotent=True)
        return response.task

    def list_tasks(
        self,
        *,
        status: v1.TaskStatus.ValueType = v1.TaskStatus.TASK_STATUS_UNSPECIFIED,
        type: str = "",
        agent_id: str = "",
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[v1.Task]:
        """Every matching task, newest first, fetched a page at a time."""

        async def fetch(page_token: str) -> tuple[Sequence[v1.Task], str]:
            request = v1.ListTasksRequest(
                status=status, type=type, agent_id=agent_id, page_size=page_size, page_token=page_token
            )
            response = await self._unary(
                lambda: self.tasks.ListTasks, request, timeout=timeout, idempotent=True
            )
            return response.tasks, response.next_page_token

        return self._paginate(fetch)

    async def assign_task(self, task_id: str, agent_id: str, *, timeout: float | None = None) -> v1.Task:
        request = v1.AssignTaskRequest(task_id=task_id, agent_id=agent_id)
        response = await self._unary(
            lambda: self.tasks.AssignTask, request, timeout=timeout, idempotent=False
        )
        return response.task

    async def cancel_task(self, task_id: str, reason: str = "", *, timeout: float | None = None) -> v1.Task:
        request = v1.CancelTaskRequest(task_id=task_id, reason=reason)
        response = await self._unary(
            lambda: self.tasks.CancelTask, request, timeout=timeout, idempotent=False
        )
        return response.task

    async def watch_task(self, task_id: str) -> AsyncIterator[v1.Task]:
        """The task now, then after every change, until it is terminal; survives disconnects."""

        def open_stream(revision: int) -> grpc.aio.UnaryStreamCall[Any, v1.WatchTaskResponse]:
            return self.tasks.WatchTask(v1.WatchTaskRequest(task_id=task_id), metadata=self._metadata)

        def next_revision(message: v1.WatchTaskResponse, revision: int) -> int:
            return message.revision or revision

        last_revision = -1
        async for message in self._resumable_watch(open_stream, 0, next_revision):
            # A reopened watch starts with the current task, which the caller may have seen.
            if message.task.revision and message.task.revision == last_revision:
                continue
            last_revision = message.task.revision
            yield message.task
            if message.task.status in TERMINAL_TASK_STATUSES:
                return

    async def wait_for_result(self, task_id: str, *, timeout: float | None = None) -> v1.Task:
        """Wait until the task is terminal and return it (check `status`, `result`, `error`).

        Raises `TimeoutError` after `timeout` seconds (None: wait as long as it takes).
        """
        latest: v1.Task | None = None
        async with asyncio.timeout(timeout):
            async for task in self.watch_task(task_id):
                latest = task
        assert latest is not None, "watch_task ends only after yielding the terminal task"
        return latest
