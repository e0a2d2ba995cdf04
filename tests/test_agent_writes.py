"""The agents' write path: command → conditional commit → event → projection.

The server runs on the real SQLite store; `GatedStore` (a subclass) can hold commits back until the
test releases them, and `RacingStore` lets "another process" commit first, as a shared store would,
before checking the command's `Expect` the way the store contract says."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from orchestrator.v1 import agent_pb2, event_pb2, registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.cluster import Cluster
from orchestrator_server.server import OrchestratorServer
from orchestrator_server.store import Change, CommitListener, ConditionFailed, LoadedState
from orchestrator_server.store.sqlite import SqliteStore
from tests.conftest import Running, Stubs, async_wait_for, make_config
from tests.support import DEREGISTERED, DOWN, DRAINING, READY, SessionClient, open_session


class GatedStore(SqliteStore):
    """The real store, whose commits wait while the gate is shut."""

    def __init__(self, path: str) -> None:
        super().__init__(path, synchronous="NORMAL")
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0

    async def commit(self, change: Change) -> int:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        return await super().commit(change)


class RacingStore(SqliteStore):
    """The real store, where another writer can get in first: before the next conditional commit
    about an agent, `rival` builds a change of that agent from its stored record, which commits
    first; then the command's `Expect` is checked against the stored revision, as the store
    contract requires (the shared-store backend does it inside the transaction)."""

    def __init__(self, path: str) -> None:
        super().__init__(path, synchronous="NORMAL")
        self.revisions: dict[str, int] = {}
        self.stored: dict[str, agent_pb2.Agent] = {}
        self.rival: Callable[[agent_pb2.Agent], event_pb2.Event] | None = None
        self.conflicts = 0

    async def open(self, on_commit: CommitListener) -> LoadedState:
        def remember(events: Sequence[event_pb2.Event]) -> None:
            for event in events:
                if event.HasField("agent"):
                    self.revisions[event.agent.agent_id] = event.revision
                    self.stored[event.agent.agent_id] = event.agent
            on_commit(events)

        loaded = await super().open(remember)
        for agent in loaded.agents:
            self.revisions[agent.agent_id] = agent.revision
            self.stored[agent.agent_id] = agent
        return loaded

    async def commit(self, change: Change) -> int:
        rival, self.rival = self.rival, None
        if rival is not None and change.expect:
            await super().commit(Change(events=[rival(self.stored[change.expect[0].entity_id])]))
        for expect in change.expect:
            actual = self.revisions.get(expect.entity_id, 0)
            if actual != expect.revision:
                self.conflicts += 1
                raise ConditionFailed(expect.entity_id, "changed", expected=expect.revision, actual=actual)
        return await super().commit(change)


class HeldCredentialReads(SqliteStore):
    """The real store, whose reads of agent credentials wait, while `holding`, until the test lets
    each go (`release`), in the order they were asked for."""

    def __init__(self, path: str) -> None:
        super().__init__(path, synchronous="NORMAL")
        self.holding = True
        self.held: list[asyncio.Future[None]] = []
        self.finished = 0

    async def agent_token_hashes(self, agent_ids: Sequence[str]) -> dict[str, str]:
        if self.holding:
            turn = asyncio.get_running_loop().create_future()
            self.held.append(turn)
            await turn
        try:
            return await super().agent_token_hashes(agent_ids)
        finally:
            self.finished += 1

    async def release_first(self) -> None:
        """Lets the first held read go and waits until it has answered."""
        self.held[0].set_result(None)
        await async_wait_for(lambda: self.finished >= 1, 10, "the first credential read")

    def release_all(self) -> None:
        self.holding = False
        for turn in self.held:
            if not turn.done():
                turn.set_result(None)


@pytest.fixture
async def start_with(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Running] = []

    async def start(store: SqliteStore, **overrides: Any) -> Running:
        server = OrchestratorServer(make_config(tmp_path, **overrides), store=store)
        await server.start()
        running = Running(server, Stubs(grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stubs.channel.close()
        await running.server.stop(0.1)


async def get_agent(stubs: Stubs, agent_id: str) -> agent_pb2.Agent:
    return (await stubs.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))).agent


def update_request(agent_id: str, paths: list[str], **update: Any) -> registry_pb2.UpdateAgentRequest:
    return registry_pb2.UpdateAgentRequest(
        agent_id=agent_id,
        update=registry_pb2.AgentUpdate(**update),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )


async def blocked(store: GatedStore, count: int) -> None:
    await async_wait_for(lambda: store.waiting >= count, 10, f"{count} commits waiting at the gate")


async def test_the_cache_changes_only_after_its_commit(
    tmp_path: Path, start_with: Callable[..., Any]
) -> None:
    store = GatedStore(str(tmp_path / "gated.db"))
    running: Running = await start_with(store)
    stubs = running.stubs
    registered = await stubs.register("slow-disk", labels={"zone": "a"})
    agent_id = registered.agent.agent_id
    session = await open_session(stubs.registry, agent_id, registered.agent_token)
    before = await get_agent(stubs, agent_id)
    assert before.status == READY

    store.gate.clear()
    update = asyncio.ensure_future(
        stubs.registry.UpdateAgent(
            update_request(agent_id, ["labels", "version"], labels={"zone": "b"}, version="2")
        )
    )
    await blocked(store, 1)
    drain = asyncio.ensure_future(
        stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=agent_id))
    )
    # The update waits for its commit, the drain for the update: nothing is committed, nothing shows.
    seen = await get_agent(stubs, agent_id)
    assert seen.labels == {"zone": "a"} and seen.version == before.version
    assert seen.status == READY and not seen.draining
    assert seen.revision == before.revision
    listed = await stubs.registry.ListAgents(registry_pb2.ListAgentsRequest(label_selector="zone=b"))
    assert list(listed.agents) == []

    store.gate.set()
    updated = (await update).agent
    assert updated.labels == {"zone": "b"} and updated.version == "2"
    drained = (await drain).agent
    assert drained.status == DRAINING and drained.labels == {"zone": "b"}
    now = await get_agent(stubs, agent_id)
    assert now.revision > updated.revision > before.revision
    notice = await session.receive_kind("drain")
    assert notice.drain.draining
    await session.goodbye()


async def test_concurrent_commands_on_one_agent_all_land(
    tmp_path: Path, start_with: Callable[..., Any]
) -> None:
    store = GatedStore(str(tmp_path / "gated.db"))
    running: Running = await start_with(store)
    stubs = running.stubs
    agent_id = (await stubs.register("busy")).agent.agent_id

    store.gate.clear()
    calls = [
        stubs.registry.UpdateAgent(update_request(agent_id, ["labels"], labels={"team": "x"})),
        stubs.registry.UpdateAgent(update_request(agent_id, ["version"], version="7")),
        stubs.registry.UpdateAgent(
            update_request(agent_id, ["max_concurrent_tasks"], max_concurrent_tasks=9)
        ),
        stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=agent_id, reason="upgrade")),
    ]
    pending = asyncio.gather(*calls)
    await blocked(store, 1)
    store.gate.set()
    await pending

    agent = await get_agent(stubs, agent_id)
    assert agent.labels == {"team": "x"}
    assert agent.version == "7"
    assert agent.max_concurrent_tasks == 9
    assert agent.draining and agent.status == DRAINING and agent.status_reason == "upgrade"
    # What the store holds (and a restart would load) is the same agent.
    assert running.server.bus is not None
    committed = running.server.bus.committed_agents[agent_id]
    assert (committed.labels, committed.version, committed.max_concurrent_tasks, committed.draining) == (
        {"team": "x"},
        "7",
        9,
        True,
    )


async def test_registers_racing_for_one_name_make_one_agent(
    tmp_path: Path, start_with: Callable[..., Any]
) -> None:
    store = GatedStore(str(tmp_path / "gated.db"))
    running: Running = await start_with(store)
    stubs = running.stubs

    store.gate.clear()
    racing = asyncio.gather(*(stubs.register("twin", "same", version=str(n)) for n in range(5)))
    await blocked(store, 1)
    store.gate.set()
    answers = await racing

    assert len({answer.agent.agent_id for answer in answers}) == 1
    assert sum(answer.created for answer in answers) == 1
    listed = await stubs.registry.ListAgents(registry_pb2.ListAgentsRequest())
    assert [agent.name for agent in listed.agents] == ["twin"]
    # Only the last credential issued works: each registration replaced the previous one.
    agent_id = answers[0].agent.agent_id
    latest = max(answers, key=lambda answer: answer.agent.revision)
    assert len({answer.agent.revision for answer in answers}) == 5, "each registration is its own commit"
    last = SessionClient(stubs.registry, agent_id, latest.agent_token)
    assert (await last.receive()).WhichOneof("message") == "welcome"
    await last.goodbye()


async def test_a_command_that_loses_a_race_decides_again(
    tmp_path: Path, start_with: Callable[..., Any]
) -> None:
    store = RacingStore(str(tmp_path / "racing.db"))
    running: Running = await start_with(store)
    stubs = running.stubs
    agent_id = (await stubs.register("contended", labels={"zone": "a"})).agent.agent_id

    def relabel(stored: agent_pb2.Agent) -> event_pb2.Event:
        event = event_pb2.Event(type=event_pb2.EVENT_TYPE_AGENT_UPDATED)
        event.agent.CopyFrom(stored)
        event.agent.labels["owner"] = "other-process"
        return event

    store.rival = relabel
    drained = (await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=agent_id))).agent
    assert store.conflicts == 1
    # The drain was decided again on top of the rival's change: both are there.
    assert drained.draining and drained.status == DRAINING
    assert drained.labels == {"zone": "a", "owner": "other-process"}
    assert await get_agent(stubs, agent_id) == drained

    store.rival = relabel
    again = await stubs.register("contended", labels={"zone": "c"})
    assert store.conflicts == 2 and not again.created and again.agent.agent_id == agent_id
    assert again.agent.labels == {"zone": "c"}


async def test_another_process_commit_updates_the_cache_and_fires_observers(running: Running) -> None:
    stubs = running.stubs
    registered = await stubs.register("shared", task_types=["job"])
    agent_id = registered.agent.agent_id
    session = await open_session(stubs.registry, agent_id, registered.agent_token)
    await stubs.registry.DrainAgent(registry_pb2.DrainAgentRequest(agent_id=agent_id))
    # A beat after the last commit: its load is newer than any committed copy of the agent.
    session.send(beat=registry_pb2.SessionBeat(sequence=1, load=agent_pb2.Load(cpu=0.5)))
    await session.receive_kind("ack")
    task = (
        await stubs.tasks.CreateTask(tasks_pb2.CreateTaskRequest(spec=task_pb2.TaskSpec(type="job")))
    ).task
    assert task.status == task_pb2.TASK_STATUS_PENDING  # nothing takes work: the agent drains

    # Another process undrains the agent: its event reaches this one only through the store.
    server = running.server
    assert server.bus is not None
    stored = server.bus.committed_agents[agent_id]
    event = event_pb2.Event(type=event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED, previous_status=DRAINING)
    event.agent.CopyFrom(stored)
    event.agent.draining = False
    event.agent.status = READY
    event.agent.status_reason = "undrained elsewhere"
    event.agent.labels["by"] = "replica-2"
    await server.store.commit(Change(events=[event]))

    agent = await get_agent(stubs, agent_id)
    assert agent.status == READY and not agent.draining and agent.labels["by"] == "replica-2"
    assert agent.load.cpu == 0.5, "the soft fields of this process's newer beat were lost"
    # The agent hears of it on its session here, as of a drain ended by this process.
    notice = (await session.receive_kind("drain")).drain
    assert not notice.draining and notice.reason == "undrained elsewhere"
    # The scheduler heard the agent is available again and placed the waiting task on it.
    assignment = (await session.receive_kind("assignment")).assignment
    assert assignment.task.task_id == task.task_id

    # Another process deregisters it: the session here ends and the work moves at once.
    stored = server.bus.committed_agents[agent_id]
    event = event_pb2.Event(type=event_pb2.EVENT_TYPE_AGENT_DEREGISTERED, previous_status=READY)
    event.agent.CopyFrom(stored)
    event.agent.status = DEREGISTERED
    event.agent.status_reason = "deregistered"
    await server.store.commit(Change(events=[event], agent_token_hashes={agent_id: ""}))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            await session.receive()
    assert ended.value.code() == grpc.StatusCode.NOT_FOUND

    async def requeued() -> bool:
        got = await stubs.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task.task_id))
        return got.task.status == task_pb2.TASK_STATUS_PENDING

    await async_wait_for(requeued, 10, "the task back in the queue")
    assert (await get_agent(stubs, agent_id)).status == DEREGISTERED
    assert server.registry.session_of(agent_id) is None


async def test_a_newer_session_committed_elsewhere_fences_the_one_held_here(running: Running) -> None:
    stubs = running.stubs
    registered = await stubs.register("moving")
    agent_id = registered.agent.agent_id
    session = await open_session(stubs.registry, agent_id, registered.agent_token)
    server = running.server
    assert server.bus is not None
    # The agent reconnects to another process, which commits its newer session.
    event = event_pb2.Event(type=event_pb2.EVENT_TYPE_AGENT_UPDATED)
    event.agent.CopyFrom(server.bus.committed_agents[agent_id])
    event.agent.session.epoch += 1
    event.agent.session.owner = "replica-2"
    await server.store.commit(Change(events=[event]))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            await session.receive()
    assert ended.value.code() == grpc.StatusCode.ABORTED
    assert "replica-2" in (ended.value.details() or "")
    assert server.registry.session_of(agent_id) is None
    agent = await get_agent(stubs, agent_id)  # alive on the other process: not DOWN here
    assert agent.status == READY and agent.session.owner == "replica-2"


async def test_a_session_end_commits_down_before_the_agent_shows_down(
    tmp_path: Path, start_with: Callable[..., Any]
) -> None:
    store = GatedStore(str(tmp_path / "gated.db"))
    running: Running = await start_with(store)
    stubs = running.stubs
    registered = await stubs.register("leaving")
    agent_id = registered.agent.agent_id
    session = await open_session(stubs.registry, agent_id, registered.agent_token)

    store.gate.clear()
    session.call.cancel()
    await blocked(store, 1)
    assert (await get_agent(stubs, agent_id)).status == READY
    store.gate.set()

    async def down() -> bool:
        return (await get_agent(stubs, agent_id)).status == DOWN

    await async_wait_for(down, 10, "the agent DOWN once its commit lands")


async def test_checks_that_recover_while_degraded_commits_end_ready(
    tmp_path: Path, start_with: Callable[..., Any]
) -> None:
    store = GatedStore(str(tmp_path / "gated.db"))
    running: Running = await start_with(store)
    stubs = running.stubs
    registered = await stubs.register("flappy")
    agent_id = registered.agent.agent_id
    session = await open_session(stubs.registry, agent_id, registered.agent_token)
    before = await get_agent(stubs, agent_id)

    store.gate.clear()
    failing = agent_pb2.Check(name="disk", status=agent_pb2.CHECK_STATUS_FAILING)
    session.send(beat=registry_pb2.SessionBeat(sequence=1, checks=[failing]))
    assert (await session.receive_kind("ack")).ack.status == agent_pb2.AGENT_STATUS_DEGRADED
    await blocked(store, 1)  # DEGRADED is being committed
    passing = agent_pb2.Check(name="disk", status=agent_pb2.CHECK_STATUS_PASSING)
    session.send(beat=registry_pb2.SessionBeat(sequence=2, checks=[passing]))
    assert (await session.receive_kind("ack")).ack.status == READY
    store.gate.set()

    async def recovered() -> bool:
        agent = await get_agent(stubs, agent_id)
        return agent.status == READY and agent.transitions == before.transitions + 2

    # No further beat: the DEGRADED commit alone must not leave the agent DEGRADED.
    await async_wait_for(recovered, 10, "DEGRADED committed, then READY again")
    await session.goodbye()


async def _registered_elsewhere(
    tmp_path: Path, start_with: Callable[..., Any]
) -> tuple[Running, Running, HeldCredentialReads, registry_pb2.RegisterAgentResponse]:
    """Replica A registers an agent; replica B (same SQLite file) has projected it and its
    background read of the credential, which A issued, is held."""
    path = str(tmp_path / "shared.db")
    a: Running = await start_with(SqliteStore(path, synchronous="NORMAL"), process_id="replica-a")
    b_store = HeldCredentialReads(path)
    b: Running = await start_with(b_store, process_id="replica-b")
    registered = await a.stubs.register("roaming")
    await async_wait_for(lambda: len(b_store.held) >= 1, 10, "B to read the new agent's credential")
    return a, b, b_store, registered


async def test_a_hello_on_another_replica_is_checked_against_the_store_after_a_background_read(
    tmp_path: Path, start_with: Callable[..., Any]
) -> None:
    _, b, b_store, registered = await _registered_elsewhere(tmp_path, start_with)
    hello = asyncio.ensure_future(
        open_session(b.stubs.registry, registered.agent.agent_id, registered.agent_token)
    )
    await async_wait_for(lambda: len(b_store.held) >= 2, 10, "the hello to read the credential")
    # The background read lands first and finds the credential; the hello's own read then finds
    # nothing new, and the hello must still be checked against what was read.
    await b_store.release_first()
    b_store.release_all()
    session = await hello
    await session.goodbye()


async def test_a_hello_whose_credential_read_races_a_change_of_its_agent_reads_again(
    tmp_path: Path, start_with: Callable[..., Any]
) -> None:
    a, b, b_store, registered = await _registered_elsewhere(tmp_path, start_with)
    agent_id = registered.agent.agent_id
    hello = asyncio.ensure_future(open_session(b.stubs.registry, agent_id, registered.agent_token))
    await async_wait_for(lambda: len(b_store.held) >= 2, 10, "the hello to read the credential")
    # A changes the agent while B's reads are in flight: B drops them (they may predate it).
    await a.stubs.registry.UpdateAgent(update_request(agent_id, ["labels"], labels={"zone": "b"}))

    async def b_sees_the_update() -> bool:
        return (await get_agent(b.stubs, agent_id)).labels.get("zone") == "b"

    await async_wait_for(b_sees_the_update, 10, "B to apply A's update")
    b_store.release_all()
    session = await hello
    await session.goodbye()


async def test_commits_made_elsewhere_while_a_replica_starts_reach_its_projections(
    tmp_path: Path, start_with: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store delivers other processes' commits from `open()` on, before the event bus exists
    (membership starts in between): they are published once the projections listen, not lost."""
    path = str(tmp_path / "shared.db")
    a: Running = await start_with(SqliteStore(path, synchronous="NORMAL"), process_id="replica-a")
    b_server = OrchestratorServer(
        make_config(tmp_path, process_id="replica-b"), store=SqliteStore(path, synchronous="NORMAL")
    )
    starting_membership = Cluster.start
    registered: list[registry_pb2.RegisterAgentResponse] = []

    async def start_after_a_commit_arrives(cluster: Cluster) -> None:
        if cluster is b_server.cluster:
            registered.append(await a.stubs.register("early"))
            await async_wait_for(lambda: len(b_server._early_events) >= 1, 10, "B to get A's commit")
        await starting_membership(cluster)

    monkeypatch.setattr(Cluster, "start", start_after_a_commit_arrives)
    await b_server.start()
    b = Running(b_server, Stubs(grpc.aio.insecure_channel(f"127.0.0.1:{b_server.grpc_port}")))
    try:
        assert (await get_agent(b.stubs, registered[0].agent.agent_id)).name == "early"
    finally:
        await b.stubs.channel.close()
        await b_server.stop(0.1)
