"""ReplicaProcesses on one PostgreSQL database, as real processes: membership, the leader, liveness across
replicas, credentials issued by another replica, placement on the replica holding the session, and
a replica cut off from the database (docs/ARCHITECTURE.md, "ReplicaProcesses")."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2 as grpc_health_pb2
from grpc_health.v1 import health_pb2_grpc as grpc_health_pb2_grpc

from orchestrator.v1 import agent_pb2, registry_pb2, task_pb2, tasks_pb2
from tests.cluster.replicas import ReplicaProcesses, replica_processes
from tests.conftest import ServerProcess, Stubs, async_wait_for, connect
from tests.support import DOWN, READY, SessionClient, keep_beating, open_session, rpc_error

__all__ = ["replica_processes"]  # the fixture

# Several replicas start and stop as processes in each test: minutes on a busy machine.
pytestmark = [pytest.mark.replicas, pytest.mark.timeout(400)]


async def get_agent(stubs: Stubs, agent_id: str) -> agent_pb2.Agent:
    return (await stubs.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))).agent


async def get_task(stubs: Stubs, task_id: str) -> task_pb2.Task:
    return (await stubs.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def became_leader(server: ServerProcess) -> int:
    """How many times the replica's log says it became leader."""
    return server.log().count("leads the cluster")


async def serving_status(server: ServerProcess) -> int:
    async with connect(server) as stubs:
        health = grpc_health_pb2_grpc.HealthStub(stubs.channel)
        answer = await health.Check(grpc_health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(answer.status)


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
async def test_task_created_on_one_replica_runs_on_the_agent_of_another(
    replica_processes: ReplicaProcesses, backend: str
) -> None:
    a, b = await replica_processes.start(2, sqlite=backend == "sqlite")
    async with connect(a) as on_a, connect(b) as on_b:
        registered = await on_a.register("worker", capabilities=["x"])
        agent_id = registered.agent.agent_id
        # The credential was issued by A; B has only its hash in the store to check it against.
        session = await open_session(on_b.registry, agent_id, registered.agent_token)
        beating = asyncio.create_task(keep_beating(session))
        try:
            created = (
                await on_a.tasks.CreateTask(
                    tasks_pb2.CreateTaskRequest(
                        spec=task_pb2.TaskSpec(type="job", required_capabilities=["x"])
                    )
                )
            ).task
            pushed = (await session.receive_kind("assignment", within=20)).assignment
            assert pushed.task.task_id == created.task_id
            await on_a.tasks.CompleteTask(
                tasks_pb2.CompleteTaskRequest(task_id=created.task_id, attempt_id=pushed.attempt_id)
            )

            # B hears of A's commit through the event log (a replica's reads are not promised to
            # include another's latest commit at once).
            async def finished() -> task_pb2.Task | None:
                task = await get_task(on_b, created.task_id)
                return task if task.status == task_pb2.TASK_STATUS_SUCCEEDED else None

            done = await async_wait_for(finished, within=10, what="B to see the completion")
            assert [attempt.agent_id for attempt in done.attempts] == [agent_id]
            assert (await get_agent(on_a, agent_id)).session.owner != ""
        finally:
            beating.cancel()


async def test_a_replica_does_not_mark_down_the_agents_of_another_live_replica(
    replica_processes: ReplicaProcesses,
) -> None:
    (a,) = await replica_processes.start(1)
    async with connect(a) as on_a:
        registered = await on_a.register("held-by-a")
        agent_id = registered.agent.agent_id
        session = await open_session(on_a.registry, agent_id, registered.agent_token)
        beating = asyncio.create_task(keep_beating(session))
        try:
            # B starts with the agent alive in the store; A holds its session and gets its beats.
            (b,) = await replica_processes.start(1)
            async with connect(b) as on_b:
                assert (await get_agent(on_b, agent_id)).status == READY
                # Three heartbeat timeouts (HEARTBEAT_TIMEOUT=2): B never hears a beat.
                deadline = time.monotonic() + 6.0
                while time.monotonic() < deadline:
                    seen_by_b = await get_agent(on_b, agent_id)
                    assert seen_by_b.status == READY, seen_by_b.status_reason
                    await asyncio.sleep(0.2)
                assert (await get_agent(on_a, agent_id)).transitions == seen_by_b.transitions
        finally:
            beating.cancel()


async def test_agents_of_a_killed_replica_go_down_once_after_the_grace_unless_they_reconnect(
    replica_processes: ReplicaProcesses,
) -> None:
    a, b, c = await replica_processes.start(3)
    async with connect(a) as on_a, connect(b) as on_b:
        orphan = await on_a.register("orphan")
        mover = await on_a.register("mover")
        orphan_session = await open_session(on_a.registry, orphan.agent.agent_id, orphan.agent_token)
        mover_session = await open_session(on_a.registry, mover.agent.agent_id, mover.agent_token)
        before = (await get_agent(on_b, orphan.agent.agent_id)).transitions
        killed_at = time.monotonic()
        await asyncio.to_thread(a.kill)
        orphan_session.call.cancel()
        mover_session.call.cancel()
        # The mover reconnects to B at once (its old epoch on A is fenced by the newer one).
        moved = await open_session(on_b.registry, mover.agent.agent_id, mover.agent_token)
        beating = asyncio.create_task(keep_beating(moved))
        try:

            async def orphan_down() -> agent_pb2.Agent | None:
                agent = await get_agent(on_b, orphan.agent.agent_id)
                return agent if agent.status == DOWN else None

            down = await async_wait_for(orphan_down, within=30, what="the orphan DOWN")
            detected = time.monotonic() - killed_at
            # The replica's lease (REPLICA_TTL=3), a renewal period to notice, then a heartbeat
            # timeout (HEARTBEAT_TIMEOUT=2) for the orphan, with some slack.
            assert 2.0 <= detected <= 12.0, detected
            assert a.process is not None and f":{a.process.pid} was lost" in down.status_reason
            # Committed once for the cluster (by the leader): one transition, to DOWN.
            assert down.transitions == before + 1
            # The mover reconnected within the grace: not an orphan any more, and nobody times it
            # out while B holds its session (checked from C for more than a heartbeat timeout).
            async with connect(c) as on_c:
                end = time.monotonic() + 3.0
                while time.monotonic() < end:
                    assert (await get_agent(on_c, mover.agent.agent_id)).status == READY
                    await asyncio.sleep(0.2)
        finally:
            beating.cancel()


async def test_leader_killed_another_replica_takes_over_and_times_tasks_out_once(
    replica_processes: ReplicaProcesses,
) -> None:
    first, second, third = await replica_processes.start(3)
    assert became_leader(first) == 1 and became_leader(second) == became_leader(third) == 0
    async with connect(second) as on_second:
        spec = task_pb2.TaskSpec(type="nobody-handles-this", queue_timeout=seconds(3.0))
        task = (await on_second.tasks.CreateTask(tasks_pb2.CreateTaskRequest(spec=spec))).task
        killed_at = time.monotonic()
        await asyncio.to_thread(first.kill)

        def new_leader() -> ServerProcess | None:
            leaders = [server for server in (second, third) if became_leader(server)]
            assert len(leaders) <= 1, "two replicas took the lease"
            return leaders[0] if leaders else None

        async def taken() -> ServerProcess | None:
            return new_leader()

        await async_wait_for(taken, within=15, what="a new leader")
        takeover = time.monotonic() - killed_at
        assert takeover <= 8.0, takeover  # REPLICA_TTL=3 plus a renewal period and some slack

        async def timed_out() -> task_pb2.Task | None:
            current = await get_task(on_second, task.task_id)
            return current if current.status == task_pb2.TASK_STATUS_TIMED_OUT else None

        finished = await async_wait_for(timed_out, within=20, what="the queue timeout")
        assert finished.error.reason == "QUEUE_TIMEOUT"
        # Exactly one replica acted: only the leader's log says it timed a task out, and the
        # others never lost a race for it.
        for server in (second, third):
            assert "changed in another process" not in server.log()


async def test_a_placement_committed_before_its_replica_died_reaches_the_agent_elsewhere(
    replica_processes: ReplicaProcesses,
) -> None:
    a, b = await replica_processes.start(2, FAILOVER_GRACE="30")
    async with connect(a) as on_a, connect(b) as on_b:
        registered = await on_a.register("worker")
        agent_id = registered.agent.agent_id
        session = await open_session(on_a.registry, agent_id, registered.agent_token)
        # A freezes: the assignment B commits for the agent is never pushed down A's stream.
        assert a.process is not None
        a.process.send_signal(signal.SIGSTOP)
        try:
            task = (
                await on_b.tasks.CreateTask(
                    tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="job", target_agent_id=agent_id))
                )
            ).task
            assigned = await on_b.tasks.AssignTask(
                tasks_pb2.AssignTaskRequest(task_id=task.task_id, agent_id=agent_id)
            )
            attempt_id = assigned.task.attempts[-1].attempt_id
        finally:
            a.process.send_signal(signal.SIGKILL)
            a.process.wait(10)
        session.call.cancel()
        # The agent reconnects to B holding nothing: the committed assignment is pushed there.
        moved = await open_session(on_b.registry, agent_id, registered.agent_token)
        pushed = (await moved.receive_kind("assignment", within=20)).assignment
        assert (pushed.task.task_id, pushed.attempt_id) == (task.task_id, attempt_id)


async def test_a_replica_cut_off_from_the_database_stops_serving_sessions_until_it_reaches_it(
    replica_processes: ReplicaProcesses,
) -> None:
    a, b = await replica_processes.start(2, via_proxy=(0,))
    proxy = replica_processes.proxies[0]
    async with connect(a) as on_a, connect(b) as on_b:
        registered = await on_a.register("worker")
        agent_id = registered.agent.agent_id
        session = await open_session(on_a.registry, agent_id, registered.agent_token)
        beating = asyncio.create_task(keep_beating(session))
        assert await serving_status(a) == grpc_health_pb2.HealthCheckResponse.SERVING

        # A replica that sees no other keeps serving (nobody to send its agents to): A must have
        # seen B join before it is cut off.
        async def a_sees_b() -> bool:
            assert b.process is not None
            return any(
                line.find("replicas now") >= 0 and f":{b.process.pid}'" in line
                for line in a.log().splitlines()
            )

        await async_wait_for(a_sees_b, within=30, what="A to see B")
        cut_at = time.monotonic()
        proxy.cut()
        try:
            # Within about REPLICA_TTL (3 s) A asks the agent to go elsewhere and ends its stream.
            reconnect = await session.receive_kind("reconnect", within=15)
            stopped = time.monotonic() - cut_at
            assert "lost the database" in reconnect.reconnect.reason
            assert stopped <= 8.0, stopped

            async def not_serving() -> bool:
                return await serving_status(a) == grpc_health_pb2.HealthCheckResponse.NOT_SERVING

            await async_wait_for(not_serving, within=10, what="A NOT_SERVING")
            refused = SessionClient(on_a.registry, agent_id, registered.agent_token)
            error = await rpc_error(refused.receive(), grpc.StatusCode.UNAVAILABLE)
            assert "reconnect to another" in (error.details() or "")
        finally:
            beating.cancel()
        # The agent goes to B and stays READY: A's view (stale) decided nothing.
        moved = await open_session(on_b.registry, agent_id, registered.agent_token)
        beating = asyncio.create_task(keep_beating(moved))
        try:
            assert (await get_agent(on_b, agent_id)).status == READY
            proxy.restore()

            async def serving() -> bool:
                return await serving_status(a) == grpc_health_pb2.HealthCheckResponse.SERVING

            await async_wait_for(serving, within=20, what="A serving again")
            # Back in the cluster, A sees B's session and leaves the agent alone.
            await moved.receive_kind("ack", within=5)
            assert (await get_agent(on_a, agent_id)).status == READY
            assert (await get_agent(on_b, agent_id)).status == READY
        finally:
            beating.cancel()


ADMIN_KEY, AGENT_KEY = "admin-key-0123456789abcdef", "agent-key-0123456789abcdef"


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


async def test_credentials_and_unary_heartbeats_work_on_every_replica(
    replica_processes: ReplicaProcesses,
) -> None:
    """A credential issued by A is accepted by B (its hash is read from the store, never the token
    from anywhere); unary heartbeats spread over replicas keep the agent READY without a flap (the
    replica that got the latest beat times the lease), and it goes DOWN once when they stop."""
    a, b = await replica_processes.start(2, API_KEYS=f"admin:{ADMIN_KEY},agent:{AGENT_KEY}")
    async with connect(a) as on_a, connect(b) as on_b:
        registered = await on_a.registry.RegisterAgent(
            registry_pb2.RegisterAgentRequest(name="rest-agent", instance_id="1", type="worker"),
            metadata=bearer(AGENT_KEY),
        )
        agent_id, token = registered.agent.agent_id, registered.agent_token

        async def known_to_b() -> agent_pb2.Agent | None:
            request = registry_pb2.GetAgentRequest(agent_id=agent_id)
            try:
                return (await on_b.registry.GetAgent(request, metadata=bearer(ADMIN_KEY))).agent
            except grpc.aio.AioRpcError:
                return None

        start = await async_wait_for(known_to_b, within=10, what="B to hear of the registration")
        beat = registry_pb2.SendHeartbeatRequest(agent_id=agent_id)
        replies = []
        deadline = time.monotonic() + 6.0  # three heartbeat timeouts
        turn = 0
        while time.monotonic() < deadline:
            stubs = (on_a, on_b)[turn % 2]
            turn += 1
            replies.append((await stubs.registry.SendHeartbeat(beat, metadata=bearer(token))).status)
            await asyncio.sleep(0.3)
        replies.append((await on_b.registry.SendHeartbeat(beat, metadata=bearer(token))).status)
        assert set(replies) == {READY}
        now = await get_agent_as_admin(on_b, agent_id)
        assert now.status == READY and now.transitions == start.transitions
        assert b.process is not None and now.session.owner.endswith(f":{b.process.pid}")

        async def down() -> agent_pb2.Agent | None:
            agent = await get_agent_as_admin(on_a, agent_id)
            return agent if agent.status == DOWN else None

        stopped = await async_wait_for(down, within=15, what="DOWN after the beats stop")
        assert stopped.status_reason == "heartbeat timeout"
        assert stopped.transitions == start.transitions + 1


async def get_agent_as_admin(stubs: Stubs, agent_id: str) -> agent_pb2.Agent:
    request = registry_pb2.GetAgentRequest(agent_id=agent_id)
    return (await stubs.registry.GetAgent(request, metadata=bearer(ADMIN_KEY))).agent
