"""The PostgreSQL store under a real server, across a PostgreSQL restart, and its configuration.
(The store contract suite, tests/store_contract, runs on PostgreSQL as well.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2

from orchestrator.v1 import event_pb2, health_pb2, registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.config import Config, ConfigError
from orchestrator_server.errors import Unavailable
from orchestrator_server.server import OrchestratorServer
from orchestrator_server.store import Change, open_store
from orchestrator_server.store.postgres import PostgresStore
from orchestrator_server.store.postgres_schema import session_settings
from tests.conftest import Stubs, make_config, open_session
from tests.postgres_cluster import cluster, new_database
from tests.store_contract.builders import Recorder, agent_event, task_event


@pytest.fixture
async def database_url() -> str:
    return await new_database()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql://db/orchestrator", "postgresql://"),
        ("orchestrator.db", "postgresql://"),
        ("postgresql://db:port/orchestrator", "not a valid URL"),
    ],
)
def test_a_bad_database_url_names_the_variable(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        Config.from_env({"DATABASE_URL": url})
    assert error.value.variable == "DATABASE_URL" and problem in str(error.value)


def test_database_url_selects_postgres_and_sqlite_stays_the_default(tmp_path: Path) -> None:
    url = "postgresql://orchestrator:secret@db.internal:5433/orchestrator"
    config = Config.from_env({"DATABASE_URL": url, "DATABASE_POOL_SIZE": "4"})
    assert (config.database_url, config.database_pool_size) == (url, 4)
    assert "secret" not in repr(config)
    assert isinstance(open_store(config.database_url), PostgresStore)
    assert Config.from_env({}).database_url == ""
    assert not isinstance(open_store(str(tmp_path / "o.db")), PostgresStore)


async def start_server(tmp_path: Path, url: str) -> tuple[OrchestratorServer, Stubs]:
    server = OrchestratorServer(make_config(tmp_path, database_url=url))
    await server.start()
    return server, Stubs(grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}"))


async def stop_server(server: OrchestratorServer, stubs: Stubs) -> None:
    await stubs.channel.close()
    await server.stop(0.1)


async def test_a_server_runs_on_postgres_and_finds_its_state_after_a_restart(
    tmp_path: Path, database_url: str
) -> None:
    server, stubs = await start_server(tmp_path, database_url)
    try:
        session, agent_id = await open_session(stubs, "pg-agent", max_concurrent_tasks=1)
        created = await stubs.tasks.CreateTask(
            tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="job", idempotency_key="k1"))
        )
        task_id = created.task.task_id
        while not (message := await session.receive()).HasField("assignment"):
            pass
        assignment = message.assignment
        assert assignment.task.task_id == task_id
        session.send(
            task_update=registry_pb2.SessionTaskUpdate(
                task_id=task_id, attempt_id=assignment.attempt_id, kind=registry_pb2.TASK_UPDATE_KIND_STARTED
            )
        )
        result = struct_pb2.Struct()
        result.update({"answer": 42})
        done = await stubs.tasks.CompleteTask(
            tasks_pb2.CompleteTaskRequest(task_id=task_id, attempt_id=assignment.attempt_id, result=result)
        )
        assert done.task.status == task_pb2.TASK_STATUS_SUCCEEDED
        # Queued behind the busy agent's single slot: still pending at the restart.
        waiting = await stubs.tasks.CreateTask(
            tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="other"))
        )
        revision = (await stubs.health.GetSystemHealth(health_pb2.GetSystemHealthRequest())).revision
        await session.goodbye()
    finally:
        await stop_server(server, stubs)

    server, stubs = await start_server(tmp_path, database_url)
    try:
        found = (await stubs.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task
        assert found.status == task_pb2.TASK_STATUS_SUCCEEDED and found.result["answer"] == 42
        assert found.attempts[0].agent_id == agent_id
        pending = (await stubs.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=waiting.task.task_id))).task
        assert pending.status in (task_pb2.TASK_STATUS_PENDING, task_pb2.TASK_STATUS_ASSIGNED)
        agent = (await stubs.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))).agent
        assert agent.name == "pg-agent"
        again = await stubs.tasks.CreateTask(
            tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="job", idempotency_key="k1"))
        )
        assert again.task.task_id == task_id  # the idempotency key survived the restart too
        health = await stubs.health.GetSystemHealth(health_pb2.GetSystemHealthRequest())
        assert health.revision >= revision
    finally:
        await stop_server(server, stubs)


async def commit_until_it_works(store: PostgresStore, change: Change, within: float = 60.0) -> int:
    deadline = time.monotonic() + within
    while True:
        try:
            return await store.commit(change)
        except Unavailable:
            assert time.monotonic() < deadline, f"the store did not recover within {within} s"
            await asyncio.sleep(0.1)


async def test_the_store_recovers_from_a_postgres_restart_by_itself(database_url: str) -> None:
    """Commits fail with Unavailable while PostgreSQL is down, then work again on the same store
    objects; the revisions stay contiguous and another store's commits still reach the listener."""
    here, there = Recorder(), Recorder()
    store = PostgresStore(database_url, poll_interval=0.2, connect_timeout=2.0)
    other = PostgresStore(database_url, poll_interval=0.2, connect_timeout=2.0)
    await store.open(here)
    await other.open(there)
    try:
        assert await store.commit(Change(events=[agent_event("before")])) == 1
        await asyncio.to_thread(cluster().stop)
        try:
            with pytest.raises(Unavailable):
                await store.commit(Change(events=[task_event("while-down")]))
            with pytest.raises(Unavailable):
                await store.ping()
        finally:
            await asyncio.to_thread(cluster().start)
        assert await commit_until_it_works(store, Change(events=[agent_event("after")])) == 2
        assert await commit_until_it_works(other, Change(events=[task_event("from-other")])) == 3
        await here.reached(3)
        await there.reached(3)
        assert here.revisions == there.revisions == [1, 2, 3]
        assert [e.revision for e in await store.events_after(0, 10)] == [1, 2, 3]
        assert await store.get_task("while-down") is None
        assert (await store.events_after(2, 1))[0].type == event_pb2.EVENT_TYPE_TASK_CREATED
    finally:
        await other.close()
        await store.close()


async def test_a_writer_frozen_inside_a_transaction_is_cut_off_by_the_timeouts(database_url: str) -> None:
    """Another process holds the revision counter and stops (a frozen replica): this store's
    commits fail with Unavailable after `lock_timeout` rather than hang, and the server ends the
    frozen transaction after `idle_in_transaction_session_timeout`, after which they go through."""
    store = PostgresStore(database_url, lock_timeout=0.3, idle_in_transaction_timeout=4.0)
    recorder = Recorder()
    await store.open(recorder)
    frozen = await asyncpg.connect(
        database_url,
        server_settings=session_settings(
            statement_timeout=30, lock_timeout=0.3, idle_in_transaction_timeout=4.0
        ),
    )
    try:
        await frozen.execute("BEGIN")
        await frozen.execute("SELECT value FROM meta WHERE key = 'revision' FOR UPDATE")
        started = time.monotonic()
        with pytest.raises(Unavailable, match="lock"):
            await store.commit(Change(events=[agent_event("blocked")]))
        assert time.monotonic() - started < 3.0
        assert await commit_until_it_works(store, Change(events=[agent_event("after")])) == 1
        assert recorder.revisions == [1]
    finally:
        frozen.terminate()
        await store.close()


async def test_another_stores_commits_arrive_by_notify_without_polling(database_url: str) -> None:
    """With the poll fallback an hour away, only the NOTIFY of the other store's commit batch can
    wake this store to read the events table."""
    here = Recorder()
    store = PostgresStore(database_url, poll_interval=3600)
    other = PostgresStore(database_url)
    await store.open(here)
    await other.open(Recorder())
    try:
        listening = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'"
        admin = await asyncpg.connect(database_url)
        try:
            deadline = time.monotonic() + 30
            while await admin.fetchval(listening) < 2:  # both stores' LISTEN connections are up
                assert time.monotonic() < deadline, "the stores did not LISTEN within 30 s"
                await asyncio.sleep(0.05)
        finally:
            await admin.close()
        for n in range(1, 4):
            assert await other.commit(Change(events=[agent_event(f"there-{n}")])) == n
            await here.reached(n, within=10.0)
        assert here.revisions == [1, 2, 3]
    finally:
        await other.close()
        await store.close()
