"""The reconnect pacing (`ReconnectPacing`): how long agents wait before their next session.

The first test scripts two replicas (real gRPC servers whose answers the test decides) and records
the pause the agent chose. The second restarts a real server process under a fleet of real agents
with the SDK's default pacing and measures when each came back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import FixedRandom, SleepRecorder
from google.protobuf import duration_pb2
from scripted_orchestrator import ScriptedOrchestrator, assignment

from orchestrator_client import Agent, Backoff, TaskContext, v1
from orchestrator_client.agent import DEFAULT_RECONNECT_BACKOFF
from tests.conftest import ServerProcess, async_wait_for


@pytest.fixture
async def second_replica() -> AsyncIterator[ScriptedOrchestrator]:
    server = ScriptedOrchestrator()
    await server.start()
    yield server
    await server.stop()


async def test_a_planned_reconnect_moves_to_the_other_replica_at_once_with_the_attempts_it_holds(
    orchestrator: ScriptedOrchestrator,
    second_replica: ScriptedOrchestrator,
    make_agent: Callable[..., Agent],
    sleeps: SleepRecorder,
) -> None:
    agent = make_agent(
        target=[orchestrator.target, second_replica.target],
        reconnect_backoff=Backoff(initial=0.5, maximum=8.0, random=FixedRandom(0.25)),
    )
    release = asyncio.Event()

    @agent.task("slow")
    async def slow(ctx: TaskContext) -> dict[str, str]:
        await release.wait()
        return {"status": "done"}

    await agent.start()
    holder, other = (
        (orchestrator, second_replica)
        if agent.target == orchestrator.target
        else (second_replica, orchestrator)
    )
    first = holder.sessions[0]
    first.push(assignment("slow", "a-1"))
    await first.next_of("task_update")
    first.push(
        v1.HeartbeatResponse(
            reconnect=v1.ReconnectRequest(
                reason="shutting down", retry_after=duration_pb2.Duration(seconds=5)
            )
        )
    )
    moved = await asyncio.wait_for(other.new_session.get(), 10)
    assert agent.target == other.target
    assert list(moved.hello.running_attempt_ids) == ["a-1"]
    assert moved.hello.incarnation == first.hello.incarnation
    # Spread over the hint's window (0.25 of 5 s) from now: not 5 s + jitter, which is what
    # coming back to the replica that is going away takes (test_agent_resilience).
    assert sleeps.delays == [1.25]
    release.set()
    await other.wait_reports(1)
    assert other.completed[0].attempt_id == "a-1"
    assert not holder.completed


async def test_after_a_restart_a_fleet_comes_back_within_the_cap_and_not_all_at_once(
    tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    """SIGKILL, the server stays away long enough for the backoff to grow past its cap, then comes
    back on the same port: with the default pacing every agent is back within the cap (10 s) of
    the server serving again, spread over it rather than in one burst."""
    server = ServerProcess(tmp_path, HEARTBEAT_TIMEOUT=30, FAILOVER_GRACE=30).start()
    count = 30
    fleet = [
        Agent(server.target, name=f"fleet-{i}", instance_id=f"fleet-{i}", type="pacing", handle_signals=False)
        for i in range(count)
    ]
    try:
        await asyncio.gather(*(agent.start(connect_timeout=30) for agent in fleet))
        server.kill()
        # Away for long enough that, sleeping the draws of the growing backoff, the agents' next
        # ceilings pass the cap: 0.5 + 1 + 2 + 4 + 8 s of ceilings, half of that expected.
        await asyncio.sleep(8.0)
        await asyncio.to_thread(server.start)
        serving = time.monotonic()
        back: dict[str, float] = {}

        def all_back() -> bool:
            for agent in fleet:
                if agent.name not in back and agent.connected and agent.sessions_opened >= 2:
                    back[agent.name] = time.monotonic() - serving
            return len(back) == count

        await async_wait_for(all_back, within=60, what="every agent back after the restart")
        times = sorted(back.values())
        record_property("reattach_after_serving_seconds", [round(t, 2) for t in times])
        print(
            f"\n{count} agents back {times[0]:.2f}-{times[-1]:.2f}s after the server served again "
            f"(median {times[count // 2]:.2f}s)"
        )
        cap = DEFAULT_RECONNECT_BACKOFF.maximum
        # Bounded by the cap, plus grpc's own first channel reconnect (1 s) and a busy machine.
        assert times[-1] < cap + 3.0, times
        # Not all at once: the middle half of the fleet spread over more than a second, and no
        # half-second holds half of the fleet.
        assert times[(3 * count) // 4] - times[count // 4] > 1.0, times
        assert max(sum(1 for t in times if start <= t < start + 0.5) for start in times) <= count // 2, times
    finally:
        await asyncio.gather(*(agent.stop(grace=0) for agent in fleet))
        server.stop()
