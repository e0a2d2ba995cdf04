"""TasksService over gRPC."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from orchestrator.v1 import tasks_pb2, tasks_pb2_grpc
from orchestrator_server.events import EventBus
from orchestrator_server.grpc_api.interceptors import acting_agent_id, caller_scope
from orchestrator_server.tasks import TaskScheduler
from orchestrator_server.watches import watch_task

Context = grpc.aio.ServicerContext[Any, Any]


class TasksServicer(tasks_pb2_grpc.TasksServiceServicer):
    def __init__(self, tasks: TaskScheduler, bus: EventBus) -> None:
        self._tasks = tasks
        self._bus = bus

    async def CreateTask(
        self, request: tasks_pb2.CreateTaskRequest, context: Context
    ) -> tasks_pb2.CreateTaskResponse:
        task, created = await self._tasks.create(request.spec, caller_scope())
        return tasks_pb2.CreateTaskResponse(task=task, created=created)

    async def GetTask(self, request: tasks_pb2.GetTaskRequest, context: Context) -> tasks_pb2.GetTaskResponse:
        return tasks_pb2.GetTaskResponse(task=await self._tasks.get(request.task_id))

    async def ListTasks(
        self, request: tasks_pb2.ListTasksRequest, context: Context
    ) -> tasks_pb2.ListTasksResponse:
        tasks, token = await self._tasks.list_tasks(request)
        return tasks_pb2.ListTasksResponse(tasks=tasks, next_page_token=token)

    async def AssignTask(
        self, request: tasks_pb2.AssignTaskRequest, context: Context
    ) -> tasks_pb2.AssignTaskResponse:
        return tasks_pb2.AssignTaskResponse(task=await self._tasks.assign(request.task_id, request.agent_id))

    async def CancelTask(
        self, request: tasks_pb2.CancelTaskRequest, context: Context
    ) -> tasks_pb2.CancelTaskResponse:
        return tasks_pb2.CancelTaskResponse(task=await self._tasks.cancel(request.task_id, request.reason))

    async def CompleteTask(
        self, request: tasks_pb2.CompleteTaskRequest, context: Context
    ) -> tasks_pb2.CompleteTaskResponse:
        task = await self._tasks.complete(
            request.task_id, request.attempt_id, request.result, acting_agent_id()
        )
        return tasks_pb2.CompleteTaskResponse(task=task)

    async def FailTask(
        self, request: tasks_pb2.FailTaskRequest, context: Context
    ) -> tasks_pb2.FailTaskResponse:
        task = await self._tasks.fail(request.task_id, request.attempt_id, request.error, acting_agent_id())
        return tasks_pb2.FailTaskResponse(task=task)

    async def ReportTaskProgress(
        self, request: tasks_pb2.ReportTaskProgressRequest, context: Context
    ) -> tasks_pb2.ReportTaskProgressResponse:
        task = await self._tasks.progress(
            request.task_id, request.attempt_id, request.progress, acting_agent_id()
        )
        return tasks_pb2.ReportTaskProgressResponse(task=task)

    async def WatchTask(
        self, request: tasks_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[tasks_pb2.WatchTaskResponse]:
        async with contextlib.aclosing(watch_task(self._bus, request.task_id, self._tasks.get)) as states:
            async for state in states:
                yield tasks_pb2.WatchTaskResponse(task=state.task, revision=state.revision)
