"""Reconnects, backoff, re-registration and result delivery across outages (scripted server)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import grpc
import pytest
from conftest import FixedRandom, SleepRecorder
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from scripted_orchestrator import ScriptedOrchestrator, assignment, rich_status

from orchestrator_client import Agent, Backoff, TaskContext, v1
from tests.conftest import async_wait_for

UNAVAILABLE = rich_status(grpc.StatusCode.UNAVAILABLE, "orchestrator restarting")


def test_backoff_delays_are_full_jitter_under_an_exponential_ceiling_with_a_cap() -> None:
    backoff = Backoff(initial=1.0, multiplier=2.0, maximum=4.0, random=FixedRandom(1.0))
    assert [backoff.ceiling(n) for n in range(5)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.ceiling(10_000) == 4.0  # no float overflow after a very long outage

    rng = random.Random(7)
    jittered = Backoff(initial=1.0, multiplier=2.0, maximum=4.0, random=rng.random)
    delays = [jittered.delay(6) for _ in range(500)]
    assert all(0.0 <= delay <= 4.0 for delay in delays)
    # Full jitter spreads over the whole window, not just near the ceiling.
    assert min(delays) < 0.4 and max(delays) > 3.6
    assert 1.6 < sum(delays) / len(delays) < 2.4


async def test_registration_retries_use_full_jitter_and_the_cap(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent], sleeps: SleepRecorder
) -> None:
    for _ in range(6):
        orchestrator.register_failures.append(UNAVAILABLE)
    backoff = Backoff(
        initial=1.0, multiplier=2.0, maximum=4.0, random=FixedRandom(0.5, 1.0, 0.25, 1.0, 0.75, 1.0)
    )
    agent = make_agent(reconnect_backoff=backoff)
    await agent.start()
    assert sleeps.delays == [0.5, 2.0, 1.0, 4.0, 3.0, 4.0]
    assert len(orchestrator.registrations) == 7
    assert agent.connected


async def test_registration_waits_at_least_the_retry_info_of_a_rate_limit(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent], sleeps: SleepRecorder
) -> None:
    hint = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=300_000_000))
    orchestrator.register_failures.append(rich_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", hint))
    orchestrator.register_failures.append(rich_status(grpc.StatusCode.UNKNOWN, "connection lost"))
    agent = make_agent(reconnect_backoff=Backoff(initial=0.01, maximum=0.05, random=FixedRandom(1.0)))
    await agent.start()
    # The rate limit's hint, not the 0.01 s backoff draw; then UNKNOWN, transient like every loop's.
    assert sleeps.delays == pytest.approx([0.3, 0.02])
    assert len(orchestrator.registrations) == 3 and agent.connected


async def test_connects_once_the_server_starts_listening(
    make_agent: Callable[..., Agent], sleeps: SleepRecorder
) -> None:
    # Take a free loopback port, then leave it closed: connection attempts are refused for real.
    placeholder = ScriptedOrchestrator()
    await placeholder.start()
    port = placeholder.port
    await placeholder.stop()
    late = ScriptedOrchestrator()

    async def start_after_three_refusals(count: int) -> None:
        if count == 3:
            await late.start(port)

    sleeps.on_sleep = start_after_three_refusals
    agent = make_agent(target=f"127.0.0.1:{port}", reconnect_backoff=Backoff(initial=0.05, maximum=0.2))
    try:
        await asyncio.wait_for(agent.start(), 15)
        assert len(sleeps.delays) >= 3
        assert all(0.0 <= delay <= 0.2 for delay in sleeps.delays)
        assert late.sessions[0].hello.agent_id == "agent-1"
    finally:
        await agent.stop(grace=0)
        await late.stop()


async def test_broken_stream_reconnects_with_the_same_identity_and_its_running_attempts(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent], sleeps: SleepRecorder
) -> None:
    agent = make_agent()
    release = asyncio.Event()

    @agent.task("slow")
    async def slow(ctx: TaskContext) -> dict[str, str]:
        await release.wait()
        return {"status": "done"}

    await agent.start()
    first = orchestrator.sessions[0]
    first.push(assignment("slow", "a-1"))
    await first.next_of("task_update")
    first.end(UNAVAILABLE)
    assert orchestrator.new_session.get_nowait() is first
    second = await asyncio.wait_for(orchestrator.new_session.get(), 5)
    assert list(second.hello.running_attempt_ids) == ["a-1"]
    assert second.hello.agent_token == first.hello.agent_token
    assert len(orchestrator.registrations) == 1  # same identity: no new registration
    assert len(sleeps.delays) == 1
    release.set()
    await orchestrator.wait_reports(1)
    assert orchestrator.completed[0].attempt_id == "a-1"
    assert agent.sessions_opened == 2


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED])
async def test_a_hello_the_server_refuses_makes_the_agent_register_again(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent], code: grpc.StatusCode
) -> None:
    orchestrator.hello_failures.append(rich_status(code, "who are you?"))
    agent = make_agent()
    await agent.start()
    assert [(r.name, r.instance_id) for r in orchestrator.registrations] == [("test-agent", "instance-1")] * 2
    assert orchestrator.sessions[0].hello.agent_token == orchestrator.token == "token-2"


async def test_a_reconnect_request_waits_retry_after_plus_jitter(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent], sleeps: SleepRecorder
) -> None:
    agent = make_agent(reconnect_backoff=Backoff(initial=0.5, maximum=8.0, random=FixedRandom(0.25)))
    await agent.start()
    orchestrator.sessions[0].push(
        v1.HeartbeatResponse(
            reconnect=v1.ReconnectRequest(
                reason="shutting down", retry_after=duration_pb2.Duration(seconds=2)
            )
        )
    )
    await asyncio.wait_for(orchestrator.new_session.get(), 5)  # the first session
    await asyncio.wait_for(orchestrator.new_session.get(), 5)
    # retry_after (2 s) plus jitter drawn over a window as long as retry_after: 2 + 0.25 * 2.
    assert sleeps.delays == [2.5]


async def test_attempts_moved_while_disconnected_are_stopped_not_reported(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    cancelled = asyncio.Event()

    @agent.task("slow")
    async def slow(ctx: TaskContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    await agent.start()
    first = orchestrator.sessions[0]
    first.push(assignment("slow", "a-1"))
    await first.next_of("task_update")
    orchestrator.kept_attempts = []  # the server gave a-1 to someone else meanwhile
    first.end(UNAVAILABLE)
    await asyncio.wait_for(cancelled.wait(), 5)
    await async_wait_for(lambda: agent.running_attempt_ids == [])
    assert orchestrator.completed == [] and orchestrator.failed == []


async def test_results_are_retried_until_they_land_and_retry_info_is_honoured(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent], sleeps: SleepRecorder
) -> None:
    retry_info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3))
    orchestrator.report_failures.extend(
        [
            UNAVAILABLE,
            UNAVAILABLE,
            rich_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", retry_info),
        ]
    )
    agent = make_agent(reconnect_backoff=Backoff(initial=0.1, maximum=1.0, random=FixedRandom(1.0)))

    @agent.task("quick")
    async def quick(ctx: TaskContext) -> dict[str, int]:
        return {"answer": 42}

    await agent.start()
    orchestrator.sessions[0].push(assignment("quick", "a-1"))
    await orchestrator.wait_reports(1)
    assert dict(orchestrator.completed[0].result) == {"answer": 42.0}
    assert sleeps.delays == [0.1, 0.2, 3.0]
    assert len(orchestrator.report_metadata) == 4


async def test_work_survives_a_server_restart_and_its_result_lands_afterwards(
    orchestrator: ScriptedOrchestrator, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    entered = asyncio.Event()
    release = asyncio.Event()

    @agent.task("slow")
    async def slow(ctx: TaskContext) -> dict[str, str]:
        entered.set()
        await release.wait()
        return {"survived": "yes"}

    await agent.start()
    orchestrator.sessions[0].push(assignment("slow", "a-1"))
    await entered.wait()
    port = orchestrator.port
    await orchestrator.stop()
    await async_wait_for(lambda: not agent.connected)
    release.set()  # finishes while the server is away: the report keeps retrying

    restarted = ScriptedOrchestrator()
    await restarted.start(port)
    try:
        await restarted.wait_reports(1, within=15)
        assert restarted.completed[0].attempt_id == "a-1"
        await async_wait_for(lambda: agent.connected, within=15)
    finally:
        await agent.stop(grace=0)
        await restarted.stop()
