"""The agent against a scripted orchestrator: session protocol, handlers, cancellation, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from conftest import SleepRecorder
from google.rpc import error_details_pb2
from scripted_orchestrator import ScriptedOrchestrator, assignment, rich_status

from orchestrator_client import (
    Agent,
    AgentStopped,
    InvalidArgument,
    NonRetryableError,
    PermissionDenied,
    TaskContext,
    v1,
)
from tests.conftest import async_wait_for

STARTED = v1.TaskUpdateKind.TASK_UPDATE_KIND_STARTED
PROGRESS = v1.TaskUpdateKind.TASK_UPDATE_KIND_PROGRESS
REJECTED = v1.TaskUpdateKind.TASK_UPDATE_KIND_REJECTED


async def test_registers_says_hello_beats_and_reports_a_result_with_its_token(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent(capabilities=["gpu"], labels={"zone": "a"}, max_concurrent_tasks=2)

    @agent.task("double")
    async def double(ctx: TaskContext) -> dict[str, Any]:
        await ctx.report_progress(0.5, "halfway")
        return {"value": ctx.payload["value"] * 2, "attempt": ctx.attempt_number}

    await agent.start()
    registration = orchestrator.registrations[0]
    assert (registration.name, registration.instance_id, registration.type) == (
        "test-agent",
        "instance-1",
        "test",
    )
    assert list(registration.capabilities) == ["gpu"] and dict(registration.labels) == {"zone": "a"}
    assert registration.max_concurrent_tasks == 2

    session = orchestrator.sessions[0]
    assert session.hello.agent_id == "agent-1"
    assert session.hello.agent_token == orchestrator.token
    assert agent.agent_id == "agent-1" and agent.epoch == 1 and agent.connected

    beat = await session.next_of("beat")
    assert beat.beat.sequence == 1
    assert beat.beat.load.active_tasks == 0
    # The welcome's interval (50 ms) drives the beats, each acked with the same sequence.
    second = await session.next_of("beat")
    assert second.beat.sequence == 2

    session.push(assignment("double", "attempt-1", {"value": 21}))
    started = await session.next_of("task_update")
    assert started.task_update.kind == STARTED and started.task_update.attempt_id == "attempt-1"
    progress = await session.next_of("task_update")
    assert progress.task_update.kind == PROGRESS
    assert (
        progress.task_update.progress.fraction == 0.5 and progress.task_update.progress.message == "halfway"
    )

    await orchestrator.wait_reports(1)
    completed = orchestrator.completed[0]
    assert (completed.task_id, completed.attempt_id) == ("task-attempt-1", "attempt-1")
    assert dict(completed.result) == {"value": 42.0, "attempt": 1.0}
    assert orchestrator.report_metadata[0]["authorization"] == f"Bearer {orchestrator.token}"
    await async_wait_for(lambda: agent.running_attempt_ids == [])


async def test_handler_exceptions_fail_the_attempt_and_non_retryable_is_marked(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent(max_concurrent_tasks=2)

    @agent.task("flaky")
    async def flaky(ctx: TaskContext) -> None:
        raise ConnectionError("backend down")

    @agent.task("strict")
    async def strict(ctx: TaskContext) -> None:
        raise NonRetryableError("payload.size must be positive", reason="BAD_INPUT")

    await agent.start()
    session = orchestrator.sessions[0]
    session.push(assignment("flaky", "a-flaky"))
    session.push(assignment("strict", "a-strict"))
    await orchestrator.wait_reports(2)
    errors = {request.attempt_id: request.error for request in orchestrator.failed}
    assert errors["a-flaky"].reason == "ConnectionError"
    assert errors["a-flaky"].message == "backend down"
    assert not errors["a-flaky"].non_retryable
    assert errors["a-strict"].reason == "BAD_INPUT"
    assert errors["a-strict"].non_retryable
    assert orchestrator.completed == []


async def test_a_result_that_is_not_a_mapping_fails_non_retryably(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()

    @agent.task("wrong")
    async def wrong(ctx: TaskContext) -> Any:
        return [1, 2, 3]

    await agent.start()
    orchestrator.sessions[0].push(assignment("wrong", "a-1"))
    await orchestrator.wait_reports(1)
    assert orchestrator.failed[0].error.reason == "INVALID_RESULT"
    assert orchestrator.failed[0].error.non_retryable


async def test_unknown_task_types_and_work_beyond_capacity_are_rejected(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent(max_concurrent_tasks=1)
    release = asyncio.Event()

    @agent.task("slow")
    async def slow(ctx: TaskContext) -> None:
        await release.wait()

    await agent.start()
    session = orchestrator.sessions[0]
    session.push(assignment("unknown", "a-unknown"))
    rejected = await session.next_of("task_update")
    assert rejected.task_update.kind == REJECTED and rejected.task_update.attempt_id == "a-unknown"
    assert "no handler" in rejected.task_update.reason

    session.push(assignment("slow", "a-1"))
    assert (await session.next_of("task_update")).task_update.kind == STARTED
    session.push(assignment("slow", "a-2"))
    rejected = await session.next_of("task_update")
    assert (rejected.task_update.kind, rejected.task_update.attempt_id) == (REJECTED, "a-2")
    assert "capacity" in rejected.task_update.reason

    # A repeated push of an attempt the agent already runs is not a second task.
    session.push(assignment("slow", "a-1"))
    release.set()
    await orchestrator.wait_reports(1)
    assert [request.attempt_id for request in orchestrator.completed] == ["a-1"]


async def test_cancellation_reaches_the_running_handler_and_is_not_reported(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    entered = asyncio.Event()
    saw_cancellation = asyncio.Event()

    @agent.task("long")
    async def long(ctx: TaskContext) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            saw_cancellation.set()
            raise

    await agent.start()
    session = orchestrator.sessions[0]
    session.push(assignment("long", "a-1"))
    await entered.wait()
    session.push(
        v1.HeartbeatResponse(
            cancellation=v1.TaskCancellation(task_id="task-a-1", attempt_id="a-1", reason="user asked")
        )
    )
    await asyncio.wait_for(saw_cancellation.wait(), 5)
    await async_wait_for(lambda: agent.running_attempt_ids == [])
    assert orchestrator.completed == [] and orchestrator.failed == []
    assert agent.connected


async def test_graceful_stop_finishes_short_work_then_says_goodbye(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent(shutdown_grace=5.0)
    entered = asyncio.Event()
    release = asyncio.Event()

    @agent.task("short")
    async def short(ctx: TaskContext) -> dict[str, str]:
        entered.set()
        await release.wait()
        return {"done": "yes"}

    await agent.start()
    session = orchestrator.sessions[0]
    session.push(assignment("short", "a-1"))
    await entered.wait()
    stopping = asyncio.create_task(agent.stop())
    # While stopping, the agent takes no new work.
    session.push(assignment("short", "a-2"))
    rejected = await session.next_of("task_update")
    while rejected.task_update.kind != REJECTED:
        rejected = await session.next_of("task_update")
    assert rejected.task_update.attempt_id == "a-2"
    release.set()
    await stopping
    assert [request.attempt_id for request in orchestrator.completed] == ["a-1"]
    assert session.goodbye is not None and session.goodbye.reason == "agent shutting down"
    await asyncio.wait_for(session.ended.wait(), 5)


async def test_graceful_stop_hands_back_unfinished_work_with_a_goodbye(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    entered = asyncio.Event()
    cleaned_up = asyncio.Event()

    @agent.task("endless")
    async def endless(ctx: TaskContext) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned_up.set()

    await agent.start()
    session = orchestrator.sessions[0]
    session.push(assignment("endless", "a-1"))
    await entered.wait()
    await agent.stop(grace=0.05)
    assert cleaned_up.is_set()
    # Handed back by the goodbye (the server requeues at once), not reported as a failure.
    assert session.goodbye is not None
    assert orchestrator.completed == [] and orchestrator.failed == []
    goodbye_position = [m.WhichOneof("message") for m in _drain(session.received)]
    assert goodbye_position[-1] == "goodbye"


async def test_a_result_refused_after_hand_back_is_dropped_quietly(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    orchestrator.refused_attempts.add("a-1")

    @agent.task("echo")
    async def echo(ctx: TaskContext) -> dict[str, Any]:
        return ctx.payload

    await agent.start()
    orchestrator.sessions[0].push(assignment("echo", "a-1", {"x": 1}))
    await async_wait_for(lambda: len(orchestrator.report_metadata) == 1)
    await async_wait_for(lambda: agent.running_attempt_ids == [])
    # Refused with FAILED_PRECONDITION: not retried, not turned into a failure, agent still fine.
    assert len(orchestrator.report_metadata) == 1
    assert orchestrator.failed == [] and agent.connected


async def test_invalid_registration_stops_the_agent_with_the_mapped_error(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    violation = error_details_pb2.BadRequest.FieldViolation(field="name", description="must not contain '/'")
    orchestrator.register_failures.append(
        rich_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid agent",
            error_details_pb2.BadRequest(field_violations=[violation]),
        )
    )
    agent = make_agent()
    with pytest.raises(AgentStopped) as caught:
        await agent.start()
    error = caught.value.__cause__
    assert isinstance(error, InvalidArgument)
    assert [(v.field, v.description) for v in error.field_violations] == [("name", "must not contain '/'")]
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)


async def test_sessions_carry_checks_and_load(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    orchestrator.heartbeat_interval = 2.0  # checks get half of it: room enough on a busy machine
    agent = make_agent()

    @agent.check("database")
    async def database() -> bool:
        return True

    @agent.check("disk")
    def disk() -> bool:
        raise OSError("read-only file system")

    await agent.start()
    beat = (await orchestrator.sessions[0].next_of("beat")).beat
    checks = {check.name: check for check in beat.checks}
    assert checks["database"].status == v1.CheckStatus.CHECK_STATUS_PASSING
    assert checks["disk"].status == v1.CheckStatus.CHECK_STATUS_FAILING
    assert "read-only" in checks["disk"].message
    assert 0.0 <= beat.load.cpu <= 1.0 and 0.0 <= beat.load.memory <= 1.0


def _drain(queue: asyncio.Queue[v1.HeartbeatRequest]) -> list[v1.HeartbeatRequest]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


async def test_sleep_recorder_is_not_used_when_nothing_fails(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent], sleeps: SleepRecorder
) -> None:
    agent = make_agent()
    await agent.start()
    await orchestrator.sessions[0].next_of("beat")
    assert sleeps.delays == []


async def test_run_forever_connects_serves_and_returns_after_a_stop_request(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    serving = asyncio.create_task(agent.run_forever())
    await asyncio.wait_for(agent.wait_connected(), 5)
    agent.request_stop("test is done")
    await asyncio.wait_for(serving, 5)
    assert orchestrator.sessions[0].goodbye is not None
    assert orchestrator.sessions[0].goodbye.reason == "test is done"


async def test_run_forever_raises_the_error_that_stopped_the_agent(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    orchestrator.register_failures.append(rich_status(grpc.StatusCode.PERMISSION_DENIED, "not an agent key"))
    agent = make_agent(api_key="reader-key")
    with pytest.raises(AgentStopped) as caught:
        await agent.run_forever()
    assert isinstance(caught.value.__cause__, PermissionDenied)
    assert orchestrator.register_metadata[0]["authorization"] == "Bearer reader-key"


async def test_a_check_slower_than_half_the_interval_reports_failing(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    orchestrator.heartbeat_interval = 0.2
    agent = make_agent()

    @agent.check("hung")
    async def hung() -> bool:
        await asyncio.Event().wait()
        return True

    await agent.start()
    beat = (await orchestrator.sessions[0].next_of("beat")).beat
    assert beat.checks[0].status == v1.CheckStatus.CHECK_STATUS_FAILING
    assert beat.checks[0].message == "no answer within 0.1s"
