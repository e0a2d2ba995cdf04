"""The write path every agent command takes: decide on a copy, commit on a condition, retry.

A command's `decide` reads the committed record (`state.agent`) and returns a `Plan`: an event
carrying the changed copy, and the revision it read. The commit holds only if the stored agent
still has that revision (0: a new agent); otherwise the store raises ConditionFailed after it has
delivered the conflicting event, so deciding again reads the newer record. The cache itself is
changed only by the projection of the committed event (`AgentProjection.apply`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.v1 import event_pb2
from orchestrator_server.agents.index import AgentState
from orchestrator_server.errors import Aborted
from orchestrator_server.store import Change, ConditionFailed, Expect, Store

log = logging.getLogger(__name__)

#: How often a command decides again after losing a race to another writer before giving up.
COMMAND_ATTEMPTS = 5


@dataclass
class Plan:
    """What a command decided: the event carrying the new agent, and the revision it read."""

    event: event_pb2.Event
    expected_revision: int
    #: The credential hash to store with the change (None: unchanged).
    token_hash: str | None = None


def draft_event(state: AgentState, event_type: int) -> event_pb2.Event:
    """An event carrying a copy of the agent, for a command to change and commit."""
    event = event_pb2.Event(type=event_type)  # type: ignore[arg-type]
    event.agent.CopyFrom(state.agent)
    return event


def note_status(event: event_pb2.Event, previous: int | None) -> None:
    """Makes `event` a status change when the draft's status moved from `previous`."""
    if previous is not None:
        event.type = event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED
        event.previous_status = previous  # type: ignore[assignment]


async def commit_plan(store: Store, plan: Plan) -> None:
    """Commits the plan if the agent still has the revision it was decided on; raises
    ConditionFailed (the projection is then as new as the conflicting commit) otherwise."""
    agent_id = plan.event.agent.agent_id
    change = Change(events=[plan.event], expect=[Expect(agent_id, plan.expected_revision)])
    if plan.token_hash is not None:
        change.agent_token_hashes[agent_id] = plan.token_hash
    await store.commit(change)


async def decide_and_commit(
    store: Store, state: AgentState, decide: Callable[[AgentState], Plan | None]
) -> bool:
    """Runs `decide` on the committed record and commits its plan, deciding again after a lost
    race; returns whether anything was committed (`decide` returned a plan).

    This process's commands on one agent take turns (`state.lock`): they would only lose races to
    each other. Other processes' are caught by the revision condition."""
    async with state.lock:
        for _ in range(COMMAND_ATTEMPTS):
            plan = decide(state)
            if plan is None:
                return False
            try:
                await commit_plan(store, plan)
            except ConditionFailed as conflict:
                log.debug("agent %s changed meanwhile, deciding again: %s", state.agent.agent_id, conflict)
                continue
            return True
    raise Aborted(f"agent {state.agent.agent_id} keeps changing; try again")
