"""The SDK against the real orchestrator server, in process: agent, admin client, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from orchestrator_client import (
    AdminClient,
    Agent,
    Backoff,
    FailedPrecondition,
    InvalidArgument,
    NonRetryableError,
    NotFound,
    TaskContext,
    v1,
)
from tests.conftest import Running, async_wait_for

SUCCEEDED = v1.TaskStatus.TASK_STATUS_SUCCEEDED
FAILED = v1.TaskStatus.TASK_STATUS_FAILED
CANCELLED = v1.TaskStatus.TASK_STATUS_CANCELLED


@pytest.fixture
async def server(servers: Callable[..., Any]) -> Running:
    running: Running = await servers()
    return running


@pytest.fixture
async def admin(server: Running) -> AsyncIterator[AdminClient]:
    async with AdminClient(server.target, timeout=5.0) as client:
        yield client


@pytest.fixture
async def agents(server: Running) -> AsyncIterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(name: str = "worker", **options: Any) -> Agent:
        options.setdefault("type", "worker")
        options.setdefault("instance_id", name)
        options.setdefault("handle_signals", False)
        options.setdefault("max_concurrent_tasks", 2)
        options.setdefault("reconnect_backoff", Backoff(initial=0.05, maximum=0.5))
        agent = Agent(server.target, name=name, **options)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        await agent.stop(grace=0)


async def test_agent_runs_tasks_and_the_submitter_gets_results(
    agents: Callable[..., Agent], admin: AdminClient
) -> None:
    agent = agents()

    @agent.task("add")
    async def add(ctx: TaskContext) -> dict[str, Any]:
        await ctx.report_progress(0.5, "adding")
        return {"sum": ctx.payload["a"] + ctx.payload["b"]}

    @agent.task("reject")
    async def reject(ctx: TaskContext) -> None:
        raise NonRetryableError("cannot do that", reason="UNSUPPORTED")

    async with agent:
        task = await admin.create_task("add", {"a": 2, "b": 3}, idempotency_key="sum-1")
        again = await admin.create_task("add", {"a": 2, "b": 3}, idempotency_key="sum-1")
        assert again.task_id == task.task_id
        done = await admin.wait_for_result(task.task_id, timeout=10)
        assert done.status == SUCCEEDED
        assert dict(done.result) == {"sum": 5.0}
        assert done.attempts[0].agent_id == agent.agent_id

        failing = await admin.create_task("reject", max_attempts=3)
        failed = await admin.wait_for_result(failing.task_id, timeout=10)
        assert failed.status == FAILED
        assert failed.error.reason == "UNSUPPORTED" and len(failed.attempts) == 1


async def test_cancelling_a_task_cancels_its_handler(
    agents: Callable[..., Agent], admin: AdminClient
) -> None:
    agent = agents()
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    @agent.task("wait")
    async def wait(ctx: TaskContext) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with agent:
        task = await admin.create_task("wait")
        await asyncio.wait_for(entered.wait(), 10)
        await admin.cancel_task(task.task_id, "no longer needed")
        await asyncio.wait_for(cancelled.wait(), 10)
        final = await admin.get_task(task.task_id)
        assert final.status == CANCELLED


async def test_graceful_stop_hands_unfinished_work_to_another_agent(
    agents: Callable[..., Agent], admin: AdminClient
) -> None:
    leaving = agents("leaving", max_concurrent_tasks=1)
    staying = agents("staying", max_concurrent_tasks=1)
    entered = asyncio.Event()

    @leaving.task("job")
    async def stuck(ctx: TaskContext) -> None:
        entered.set()
        await asyncio.Event().wait()

    @staying.task("job")
    async def finish(ctx: TaskContext) -> dict[str, str]:
        return {"by": "staying"}

    await leaving.start()
    task = await admin.create_task("job")
    await asyncio.wait_for(entered.wait(), 10)
    await staying.start()
    await leaving.stop(grace=0.1)
    done = await admin.wait_for_result(task.task_id, timeout=10)
    assert done.status == SUCCEEDED and dict(done.result) == {"by": "staying"}
    assert [attempt.agent_id for attempt in done.attempts] == [leaving.agent_id, staying.agent_id]
    assert done.attempts[0].status == v1.AttemptStatus.ATTEMPT_STATUS_LOST


async def test_admin_client_manages_and_discovers_agents(
    agents: Callable[..., Agent], admin: AdminClient
) -> None:
    first = agents("alpha", labels={"zone": "a"}, capabilities=["gpu"])
    second = agents("beta", labels={"zone": "b"})
    await first.start()
    await second.start()

    listed = [agent.name async for agent in admin.list_agents(page_size=1)]
    assert listed == ["alpha", "beta"]  # two pages of one
    assert [a.name async for a in admin.discover_agents(capabilities=["gpu"])] == ["alpha"]
    resolved = await admin.resolve_agent(label_selector="zone=b")
    assert resolved.agent.name == "beta"

    drained = await admin.drain_agent(first.agent_id, "maintenance")
    assert drained.draining
    await async_wait_for(lambda: first.draining)
    assert (await admin.undrain_agent(first.agent_id)).draining is False

    updated = await admin.update_agent(second.agent_id, labels={"zone": "c"})
    assert dict(updated.labels) == {"zone": "c"}
    health = await admin.get_agent_health(first.agent_id)
    assert health.status == v1.AgentStatus.AGENT_STATUS_READY
    system = await admin.get_system_health()
    assert system.total_agents == 2


async def test_watch_agents_sees_a_snapshot_then_changes(
    agents: Callable[..., Agent], admin: AdminClient
) -> None:
    first = agents("alpha")
    await first.start()
    watch = admin.watch_agents(type="worker")
    snapshot = await anext(watch)
    assert snapshot.WhichOneof("kind") == "snapshot"
    assert [agent.name for agent in snapshot.snapshot.agents] == ["alpha"]
    await first.stop(grace=0)
    change = await asyncio.wait_for(anext(watch), 10)
    assert change.WhichOneof("kind") == "delta" and change.revision > snapshot.revision
    assert change.delta.agent.status == v1.AgentStatus.AGENT_STATUS_DOWN
    await watch.aclose()


async def test_server_errors_arrive_as_the_sdk_exceptions(admin: AdminClient) -> None:
    with pytest.raises(NotFound) as missing:
        await admin.get_agent("no-such-agent")
    assert missing.value.http_status == 404
    assert missing.value.__cause__ is not None

    with pytest.raises(InvalidArgument) as invalid:
        await admin.create_task("")
    assert invalid.value.http_status == 400
    assert any(v.field.endswith("type") for v in invalid.value.field_violations)

    task = await admin.create_task("nobody-runs-this")
    await admin.cancel_task(task.task_id)
    with pytest.raises(FailedPrecondition):
        await admin.assign_task(task.task_id, "no-such-agent")
