"""A restart on a store holding many unfinished tasks: the server answers while it restores them in
the background, task calls and agents' sessions wait for the restore, and afterwards every task is
there and runs exactly once (or keeps waiting for an agent that can take it)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2 as grpc_health_pb2
from grpc_health.v1 import health_pb2_grpc as grpc_health_pb2_grpc

from orchestrator.v1 import event_pb2, health_pb2, registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.server import TASKS_SERVICE
from orchestrator_server.store import Change
from orchestrator_server.store.sqlite import SqliteStore
from orchestrator_server.tasks.changes import event_for
from orchestrator_server.tasks.transitions import now_timestamp
from tests.conftest import ServerProcess, Stubs, async_wait_for
from tests.support import SessionClient

# Enough that restoring them takes a few hundred milliseconds of CPU even on a fast core, so the
# first answer (a polling client gets it within a few reconnect backoffs of the bind) comes first.
TASKS = 40_000
# Of which this many can run (the rest need a capability no agent has).
RUNNABLE = 100
# Tasks an agent holds across the restart (created through the API before it).
HELD = 3
BATCH = 2_000


def stored_task(number: int) -> task_pb2.Task:
    runnable = number < RUNNABLE
    task = task_pb2.Task(task_id=f"tsk_restore{number:06d}", status=task_pb2.TASK_STATUS_PENDING)
    task.spec.type = "job"
    task.spec.required_capabilities.append("can-run" if runnable else "nobody-has-it")
    task.spec.max_attempts = 3
    task.spec.payload.update({"number": number})
    task.created_at.CopyFrom(now_timestamp())
    task.updated_at.CopyFrom(task.created_at)
    return task


async def fill(database: Path) -> None:
    """Commits the tasks to the (stopped) server's store, as CreateTask would: through the API it
    would take most of a minute."""
    store = SqliteStore(str(database), synchronous="OFF")
    await store.open(lambda events: None)
    try:
        for first in range(0, TASKS, BATCH):
            tasks = [stored_task(number) for number in range(first, min(TASKS, first + BATCH))]
            events = [event_for(task, event_pb2.EVENT_TYPE_TASK_CREATED) for task in tasks]
            await store.commit(Change(events=events, task_records=tasks))
    finally:
        await store.close()


async def keep_beating(session: SessionClient) -> None:
    """Keeps the agent alive however long a loaded machine takes over the test."""
    for sequence in itertools.count(1):
        session.send(beat=registry_pb2.SessionBeat(sequence=sequence))
        await asyncio.sleep(0.5)


async def first_answer(target: str, within: float) -> tuple[int, health_pb2.GetSystemHealthResponse]:
    """Polls the (re)starting server: its TasksService health and its system health, as soon as it
    answers at all."""
    options = [
        ("grpc.initial_reconnect_backoff_ms", 10),
        ("grpc.min_reconnect_backoff_ms", 10),
        ("grpc.max_reconnect_backoff_ms", 20),
    ]
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        grpc_health = grpc_health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                check = await grpc_health.Check(
                    grpc_health_pb2.HealthCheckRequest(service=TASKS_SERVICE), timeout=5, wait_for_ready=True
                )
                system = await Stubs(channel).health.GetSystemHealth(
                    health_pb2.GetSystemHealthRequest(), timeout=5
                )
                return check.status, system
            except grpc.aio.AioRpcError:
                assert time.monotonic() < deadline, "the restarted server never answered"
                await asyncio.sleep(0.01)


async def test_restart_answers_while_restoring_and_then_runs_every_task_once(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_process()
    await asyncio.to_thread(server.start)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stubs = Stubs(channel)
        registered = await stubs.register("holder", capabilities=["holds"], max_concurrent_tasks=HELD)
        holder_id, holder_token = registered.agent.agent_id, registered.agent_token
        holder = SessionClient(stubs.registry, holder_id, holder_token)
        assert (await holder.receive()).WhichOneof("message") == "welcome"
        for _ in range(HELD):
            spec = task_pb2.TaskSpec(type="job", required_capabilities=["holds"])
            await stubs.tasks.CreateTask(tasks_pb2.CreateTaskRequest(spec=spec))
        held: dict[str, str] = {}  # task id -> attempt id, which the holder keeps running
        while len(held) < HELD:
            message = await holder.receive()
            if message.HasField("assignment"):
                held[message.assignment.task.task_id] = message.assignment.attempt_id
        assert server.terminate() == 0  # drained: the holder stays alive in the store
    await fill(tmp_path / "orchestrator.db")

    probe = asyncio.create_task(first_answer(server.target, within=60))
    restarting = asyncio.create_task(asyncio.to_thread(server.start, 60))
    tasks_health, system = await probe
    # Answered while the tasks were still being restored, and said so.
    assert tasks_health == grpc_health_pb2.HealthCheckResponse.NOT_SERVING, system
    assert system.status == "DEGRADED", system
    assert system.pending_tasks < TASKS, system

    async with grpc.aio.insecure_channel(server.target) as channel:
        stubs = Stubs(channel)
        # The tasks agents hold are restored first (the pending ones need not be, for a session
        # to be welcomed): the holder is welcomed back and keeps its attempts.
        holder = SessionClient(stubs.registry, holder_id, holder_token, running=tuple(held.values()))
        welcome = await holder.receive(within=30)
        assert set(welcome.welcome.kept_attempt_ids) == set(held.values())
        beating = [asyncio.create_task(keep_beating(holder))]

        # Task calls made during the restore wait for it, then answer from the whole projection.
        last = stored_task(TASKS - 1)
        got, created = await asyncio.gather(
            stubs.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=last.task_id), timeout=30),
            stubs.tasks.CreateTask(tasks_pb2.CreateTaskRequest(spec=stored_task(TASKS).spec), timeout=30),
        )
        assert got.task.status == task_pb2.TASK_STATUS_PENDING
        assert got.task.spec.payload == last.spec.payload
        assert created.task.status == task_pb2.TASK_STATUS_PENDING
        await restarting

        # An agent's session is welcomed once every task is back.
        registered = await stubs.register("runner", capabilities=["can-run"], max_concurrent_tasks=25)
        agent_id = registered.agent.agent_id
        session = SessionClient(stubs.registry, agent_id, registered.agent_token)
        assert (await session.receive(within=30)).WhichOneof("message") == "welcome"
        beating.append(asyncio.create_task(keep_beating(session)))

        assigned: list[str] = []
        while len(assigned) < RUNNABLE:
            message = await session.receive(within=30)
            if not message.HasField("assignment"):
                continue
            assignment = message.assignment
            assert assignment.task.task_id not in assigned, "a task was placed twice"
            assigned.append(assignment.task.task_id)
            await stubs.tasks.CompleteTask(
                tasks_pb2.CompleteTaskRequest(
                    task_id=assignment.task.task_id, attempt_id=assignment.attempt_id
                )
            )
        assert sorted(assigned) == [stored_task(number).task_id for number in range(RUNNABLE)]
        for task_id, attempt_id in held.items():
            await stubs.tasks.CompleteTask(
                tasks_pb2.CompleteTaskRequest(task_id=task_id, attempt_id=attempt_id)
            )

        async def settled() -> health_pb2.GetSystemHealthResponse | None:
            health = await stubs.health.GetSystemHealth(health_pb2.GetSystemHealthRequest())
            return health if health.running_tasks == 0 else None

        after = await async_wait_for(settled, 20, "every completion committed")
        assert after.status == "SERVING"
        # Every stored task is held again: the unrunnable ones and the one created meanwhile wait.
        assert after.pending_tasks == TASKS - RUNNABLE + 1
        for task_id in [*assigned, *held]:
            task = (await stubs.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task
            assert task.status == task_pb2.TASK_STATUS_SUCCEEDED
            assert task.attempt_count == 1
        for beats in beating:
            beats.cancel()
        session.close()
        holder.close()
