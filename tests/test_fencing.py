"""A session superseded by a newer one of the same agent is fenced: a beat or a task report that
was already read off its stream when the newer session opened changes nothing."""

from __future__ import annotations

from orchestrator.v1 import agent_pb2, registry_pb2
from orchestrator_server.agents import CloseReason
from tests.conftest import Running
from tests.support import DOWN, READY, SessionClient


async def test_a_beat_on_a_superseded_session_changes_nothing(running: Running) -> None:
    stubs = running.stubs
    registered = await stubs.register("fenced")
    agent_id, token = registered.agent.agent_id, registered.agent_token
    old_client = SessionClient(stubs.registry, agent_id, token)
    assert (await old_client.receive()).WhichOneof("message") == "welcome"
    registry = running.server.registry
    old = registry.session_of(agent_id)
    assert old is not None

    new_client = SessionClient(stubs.registry, agent_id, token)
    welcome = await new_client.receive()
    assert welcome.welcome.epoch == old.epoch + 1
    assert old.ended is CloseReason.FENCED  # ends the stream with ABORTED
    before = agent_pb2.Agent()
    before.CopyFrom(registry.get(agent_id))
    assert before.status == READY

    # What the old stream's reader would do with a beat it had read just before the fence.
    stale = registry_pb2.SessionBeat(
        sequence=7,
        load=agent_pb2.Load(active_tasks=3, cpu=0.9),
        checks=[agent_pb2.Check(name="disk", status=agent_pb2.CHECK_STATUS_FAILING)],
    )
    assert registry.session_beat(old, stale) == DOWN
    # A task report on the old stream is applied only if `touch` accepts the session.
    assert registry.touch(old) is False
    assert registry.get(agent_id) == before, "a fenced beat changed the agent"

    # The current session is unaffected and still counts.
    current = registry.session_of(agent_id)
    assert current is not None and current is not old
    assert registry.touch(current) is True
    new_client.send(beat=registry_pb2.SessionBeat(sequence=1))
    ack = await new_client.receive_kind("ack")
    assert ack.ack.sequence == 1 and ack.ack.status == READY
    await new_client.goodbye()
    old_client.close()
