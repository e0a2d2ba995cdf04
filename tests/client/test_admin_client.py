"""AdminClient against a scripted server: retries by idempotency, shrinking deadlines, pagination,
watches that resume from their last revision and re-snapshot on resync."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from conftest import FixedRandom, SleepRecorder
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from scripted_orchestrator import abort, rich_status

from orchestrator_client import (
    AdminClient,
    Backoff,
    InvalidArgument,
    OrchestratorError,
    Retry,
    RetryPolicy,
    Unavailable,
    Unknown,
    v1,
)

UNAVAILABLE = rich_status(grpc.StatusCode.UNAVAILABLE, "try again")


class ScriptedAdmin(
    v1.RegistryServiceServicer, v1.TasksServiceServicer, v1.DiscoveryServiceServicer, v1.HealthServiceServicer
):
    def __init__(self) -> None:
        self.failures: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.time_remaining: list[float] = []
        self.agents = [v1.Agent(agent_id=f"agent-{n}", name=f"a{n}") for n in range(5)]
        self.watch_starts: list[int] = []
        self.watch_scripts: list[list[Any]] = []

    async def _count(self, method: str, context: Any) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.failures.get(method, 0) > 0:
            self.failures[method] -= 1
            await abort(context, UNAVAILABLE)

    async def GetAgent(self, request: Any, context: Any) -> v1.GetAgentResponse:
        self.time_remaining.append(context.time_remaining())
        await self._count("GetAgent", context)
        return v1.GetAgentResponse(agent=v1.Agent(agent_id=request.agent_id))

    async def DrainAgent(self, request: Any, context: Any) -> v1.DrainAgentResponse:
        await self._count("DrainAgent", context)
        return v1.DrainAgentResponse(agent=v1.Agent(agent_id=request.agent_id, draining=True))

    async def CreateTask(self, request: Any, context: Any) -> v1.CreateTaskResponse:
        await self._count("CreateTask", context)
        if not request.spec.type:
            await abort(context, rich_status(grpc.StatusCode.INVALID_ARGUMENT, "type required"))
        return v1.CreateTaskResponse(task=v1.Task(task_id="task-1", spec=request.spec), created=True)

    async def ListAgents(self, request: Any, context: Any) -> v1.ListAgentsResponse:
        await self._count("ListAgents", context)
        start = int(request.page_token or 0)
        end = start + request.page_size
        next_token = str(end) if end < len(self.agents) else ""
        return v1.ListAgentsResponse(agents=self.agents[start:end], next_page_token=next_token)

    async def _watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.watch_starts.append(request.start_revision)
        for item in self.watch_scripts.pop(0):
            if isinstance(item, grpc.Status):
                await abort(context, item)
            yield item
        await asyncio.Event().wait()  # then silence, like a live watch with nothing to say

    # grpc.aio recognises server-streaming handlers by being async generator functions.
    async def WatchAgents(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for message in self._watch(request, context):
            yield message

    async def WatchAgentHealth(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for message in self._watch(request, context):
            yield message


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedAdmin, str]]:
    servicer = ScriptedAdmin()
    server = grpc.aio.server()
    v1.add_RegistryServiceServicer_to_server(servicer, server)
    v1.add_TasksServiceServicer_to_server(servicer, server)
    v1.add_DiscoveryServiceServicer_to_server(servicer, server)
    v1.add_HealthServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


async def test_idempotent_gets_retry_with_a_deadline_that_shrinks(
    scripted: tuple[ScriptedAdmin, str],
) -> None:
    servicer, target = scripted
    servicer.failures["GetAgent"] = 3
    policy = RetryPolicy(backoff=Backoff(initial=0.05, maximum=1.0, random=FixedRandom(1.0)))
    async with AdminClient(target, retry=policy) as admin:
        deadlines: list[float] = []
        get_agent = admin.registry.GetAgent

        def recording(request: Any, *, timeout: float, metadata: Any) -> Any:
            deadlines.append(timeout)
            return get_agent(request, timeout=timeout, metadata=metadata)

        admin.registry.GetAgent = recording  # type: ignore[assignment]
        agent = await admin.get_agent("agent-7", timeout=3.0)
    assert agent.agent_id == "agent-7"
    assert servicer.calls["GetAgent"] == 4
    # Each attempt gets what is left of the one 3 s deadline, less the pauses (0.05, 0.1, 0.2 s).
    assert 2.9 < deadlines[0] <= 3.0
    for before, after, pause in zip(deadlines, deadlines[1:], [0.05, 0.1, 0.2], strict=False):
        assert after <= before - pause


async def test_retries_stop_when_the_deadline_leaves_no_room(scripted: tuple[ScriptedAdmin, str]) -> None:
    servicer, target = scripted
    servicer.failures["GetAgent"] = 10
    sleeps = SleepRecorder(real=True)
    policy = RetryPolicy(backoff=Backoff(initial=0.2, maximum=5.0, random=FixedRandom(1.0)), sleep=sleeps)
    async with AdminClient(target, retry=policy) as admin:
        with pytest.raises(Unavailable) as caught:
            await admin.get_agent("agent-1", timeout=0.5)
    # Pauses 0.2 then 0.4: the second would end past the 0.5 s deadline, so the call gives up.
    assert sleeps.delays == [0.2]
    assert servicer.calls["GetAgent"] == 2
    assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)


async def test_non_idempotent_calls_are_tried_once(scripted: tuple[ScriptedAdmin, str]) -> None:
    servicer, target = scripted
    servicer.failures["CreateTask"] = 1
    servicer.failures["DrainAgent"] = 1
    async with AdminClient(target, retry=RetryPolicy(sleep=SleepRecorder())) as admin:
        with pytest.raises(Unavailable):
            await admin.create_task("resize", {"width": 100})
        with pytest.raises(Unavailable):
            await admin.drain_agent("agent-1")
    assert servicer.calls == {"CreateTask": 1, "DrainAgent": 1}


async def test_create_task_with_an_idempotency_key_is_retried(scripted: tuple[ScriptedAdmin, str]) -> None:
    servicer, target = scripted
    servicer.failures["CreateTask"] = 2
    async with AdminClient(target, retry=RetryPolicy(sleep=SleepRecorder())) as admin:
        task = await admin.create_task("resize", {"width": 100}, idempotency_key="resize-42", run_timeout=1.5)
        with pytest.raises(InvalidArgument):
            await admin.create_task("", idempotency_key="bad")  # not retryable: one call
    assert task.task_id == "task-1" and task.spec.idempotency_key == "resize-42"
    assert task.spec.run_timeout.ToTimedelta().total_seconds() == 1.5
    assert dict(task.spec.payload) == {"width": 100.0}
    assert servicer.calls["CreateTask"] == 4


async def test_lists_are_async_iterators_over_pages(scripted: tuple[ScriptedAdmin, str]) -> None:
    servicer, target = scripted
    servicer.failures["ListAgents"] = 1  # a page fetch is retried like any idempotent call
    async with AdminClient(target, retry=RetryPolicy(sleep=SleepRecorder())) as admin:
        names = [agent.name async for agent in admin.list_agents(page_size=2)]
    assert names == ["a0", "a1", "a2", "a3", "a4"]
    assert servicer.calls["ListAgents"] == 4  # 3 pages + 1 retry


def _snapshot(revision: int, *names: str) -> v1.WatchAgentsResponse:
    agents = [v1.Agent(name=name) for name in names]
    return v1.WatchAgentsResponse(revision=revision, snapshot=v1.AgentSnapshot(agents=agents))


def _delta(revision: int, name: str) -> v1.WatchAgentsResponse:
    return v1.WatchAgentsResponse(revision=revision, delta=v1.AgentDelta(agent=v1.Agent(name=name)))


async def test_watch_resumes_from_its_last_revision_and_resnapshots_on_resync(
    scripted: tuple[ScriptedAdmin, str],
) -> None:
    servicer, target = scripted
    servicer.watch_scripts = [
        [_snapshot(5, "a"), _delta(6, "b"), UNAVAILABLE],
        [
            v1.WatchAgentsResponse(resync=v1.ResyncRequired(oldest_revision=10, reason="compacted")),
            UNAVAILABLE,  # lost before the snapshot that follows a resync
        ],
        [_snapshot(20, "a", "b", "c"), _delta(21, "d")],
    ]
    sleeps = SleepRecorder()
    async with AdminClient(target, watch_backoff=Backoff(initial=0.01, maximum=0.05), sleep=sleeps) as admin:
        watch = admin.watch_agents(type="worker")
        kinds = [
            (message.WhichOneof("kind"), message.revision)
            for message in [await anext(watch) for _ in range(5)]
        ]
        await watch.aclose()
    assert kinds == [("snapshot", 5), ("delta", 6), ("resync", 0), ("snapshot", 20), ("delta", 21)]
    # Resumed after revision 6; after the resync, asked for a fresh snapshot (0), not revision 6.
    assert servicer.watch_starts == [0, 6, 0]
    assert len(sleeps.delays) == 2


async def test_watch_resumes_on_every_transient_code_and_waits_the_servers_retry_info(
    scripted: tuple[ScriptedAdmin, str],
) -> None:
    servicer, target = scripted
    retry_info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=400_000_000))
    servicer.watch_scripts = [
        [_snapshot(5, "a"), rich_status(grpc.StatusCode.UNKNOWN, "connection lost")],
        [rich_status(grpc.StatusCode.UNAVAILABLE, "draining", retry_info)],
        [_delta(6, "b")],
    ]
    sleeps = SleepRecorder()
    errors: list[OrchestratorError] = []
    async with AdminClient(
        target,
        retry=Retry(on_error=errors.append),
        watch_backoff=Backoff(initial=0.01, maximum=0.01, random=FixedRandom(1.0)),
        sleep=sleeps,
    ) as admin:
        watch = admin.watch_agents()
        revisions = [(await anext(watch)).revision for _ in range(2)]
        await watch.aclose()
    assert revisions == [5, 6]
    assert servicer.watch_starts == [0, 5, 5]
    # The same policy type and transient codes as the agent's session: UNKNOWN is resumed, and a
    # draining server's RetryInfo is waited out; the client's on_error hears both breaks.
    assert sleeps.delays == pytest.approx([0.01, 0.4])
    assert [type(error) for error in errors] == [Unknown, Unavailable]


def _health(revision: int, name: str = "", **flags: bool) -> v1.WatchAgentHealthResponse:
    health = v1.AgentHealth(name=name) if name else None
    return v1.WatchAgentHealthResponse(revision=revision, health=health, **flags)


async def test_health_watch_replays_an_interrupted_initial_state_then_resumes_after_transitions(
    scripted: tuple[ScriptedAdmin, str],
) -> None:
    servicer, target = scripted
    servicer.watch_scripts = [
        [_health(10, "a", initial=True), UNAVAILABLE],  # broken inside the initial state
        [
            _health(10, "a", initial=True),
            _health(10, "b", initial=True),
            _health(10, caught_up=True),
            _health(11, "a"),
            UNAVAILABLE,
        ],
        [_health(12, "b")],
    ]
    async with AdminClient(
        target, watch_backoff=Backoff(initial=0.01, maximum=0.05), sleep=SleepRecorder()
    ) as admin:
        watch = admin.watch_agent_health()
        seen = [
            (m.revision, m.health.name, m.initial, m.caught_up)
            for m in [await anext(watch) for _ in range(6)]
        ]
        await watch.aclose()
    assert servicer.watch_starts == [0, 0, 11]
    assert seen[-1] == (12, "b", False, False)
