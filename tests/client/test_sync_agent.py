"""SyncAgent: the same session on a background loop thread, plain-function handlers on a pool."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from scripted_orchestrator import ScriptedOrchestrator, assignment

from orchestrator_client import Backoff, SyncAgent, SyncTaskContext, v1

PROGRESS = v1.TaskUpdateKind.TASK_UPDATE_KIND_PROGRESS


def make_sync_agent(orchestrator: ScriptedOrchestrator, **options: Any) -> SyncAgent:
    return SyncAgent(
        orchestrator.target,
        name="sync-agent",
        type="test",
        instance_id="sync-1",
        max_concurrent_tasks=2,
        reconnect_backoff=Backoff(initial=0.01, maximum=0.05),
        **options,
    )


async def test_sync_handlers_run_on_worker_threads_and_report(orchestrator: ScriptedOrchestrator) -> None:
    agent = make_sync_agent(orchestrator)
    handler_threads: list[str] = []

    @agent.task("square")
    def square(ctx: SyncTaskContext) -> dict[str, Any]:
        handler_threads.append(threading.current_thread().name)
        ctx.report_progress(0.5, "squaring")
        return {"square": ctx.payload["n"] ** 2}

    await asyncio.to_thread(agent.start)
    try:
        session = orchestrator.sessions[0]
        session.push(assignment("square", "a-1", {"n": 7}))
        await orchestrator.wait_reports(1)
        assert dict(orchestrator.completed[0].result) == {"square": 49.0}
        progress = await session.next_of("task_update")
        while progress.task_update.kind != PROGRESS:
            progress = await session.next_of("task_update")
        assert progress.task_update.progress.message == "squaring"
        assert handler_threads == ["sync-agent-handler_0"]
    finally:
        await asyncio.to_thread(agent.stop, 1.0)
    assert session.goodbye is not None


async def test_sync_handler_sees_cancellation_through_its_context(orchestrator: ScriptedOrchestrator) -> None:
    agent = make_sync_agent(orchestrator)
    entered = threading.Event()
    noticed = threading.Event()

    @agent.task("poll")
    def poll(ctx: SyncTaskContext) -> None:
        entered.set()
        if ctx.cancelled.wait(10):
            noticed.set()

    await asyncio.to_thread(agent.start)
    try:
        session = orchestrator.sessions[0]
        session.push(assignment("poll", "a-1"))
        assert await asyncio.to_thread(entered.wait, 10)
        session.push(
            v1.HeartbeatResponse(cancellation=v1.TaskCancellation(task_id="task-a-1", attempt_id="a-1"))
        )
        assert await asyncio.to_thread(noticed.wait, 10)
        assert orchestrator.completed == [] and orchestrator.failed == []
    finally:
        await asyncio.to_thread(agent.stop, 1.0)
