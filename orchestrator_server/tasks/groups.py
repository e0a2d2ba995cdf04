"""Requirement groups of pending tasks, and why a group cannot be placed.

Pending tasks wait in one priority heap per group (same type, capabilities, selector and target),
so the scheduler decides per group, not per task, which agents fit. When no agent can take a
group's next task, `explain` says why the way Nomad explains a placement failure: how many agents
each constraint filtered out. An explanation costs O(agents), so it is computed at most once per
`EXPLAIN_INTERVAL` per group, and the pass stays O(groups) otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from orchestrator.v1 import agent_pb2, task_pb2
from orchestrator_server.agents import DRAINING, READY
from orchestrator_server.selectors import Selector

# Seconds an explanation is reused before agents are looked at again.
EXPLAIN_INTERVAL = 1.0

GroupKey = tuple[str, frozenset[str], str, str]

_REASONS = (
    ("filtered_by_target", "not the target"),
    ("filtered_by_type", "do not handle the type"),
    ("filtered_by_capability", "lack a capability"),
    ("filtered_by_selector", "do not match the selector"),
    ("not_ready", "not ready or without a session"),
    ("draining", "draining"),
    ("at_capacity", "at capacity"),
)


def handles(agent: agent_pb2.Agent, task_type: str) -> bool:
    """An agent that declares no task types takes every type (REST agents, older SDKs)."""
    return not agent.task_types or task_type in agent.task_types


@dataclass
class Group:
    """Pending tasks with the same requirements, highest priority first, FIFO within a priority."""

    type: str
    capabilities: frozenset[str]
    selector: Selector
    target: str
    heap: list[tuple[int, int, str]] = field(default_factory=list)
    reason: task_pb2.PendingReason | None = None
    explained_at: float = float("-inf")

    # Agent id -> (the agent's revision, whether it fits): what `fits` reads changes only with a
    # commit of the agent, and reading it from the message each time was a tenth of a placement.
    _fits: dict[str, tuple[int, bool]] = field(default_factory=dict)

    def fits(self, agent: agent_pb2.Agent) -> bool:
        """The agent meets the group's static constraints (not whether it is free now)."""
        known = self._fits.get(agent.agent_id)
        if known is not None and known[0] == agent.revision:
            return known[1]
        fits = self._mismatch(agent) is None
        self._fits[agent.agent_id] = (agent.revision, fits)
        return fits

    def _mismatch(self, agent: agent_pb2.Agent) -> str | None:
        if self.target and agent.agent_id != self.target:
            return "filtered_by_target"
        if not handles(agent, self.type):
            return "filtered_by_type"
        if not self.capabilities.issubset(agent.capabilities):
            return "filtered_by_capability"
        if not self.selector.matches(agent.labels):
            return "filtered_by_selector"
        return None

    def explain(
        self,
        agents: Iterable[agent_pb2.Agent],
        has_session: Callable[[str], bool],
        free_capacity: Callable[[agent_pb2.Agent], int],
        now: float,
    ) -> task_pb2.PendingReason:
        """Why the group's tasks wait; reuses the last answer within EXPLAIN_INTERVAL."""
        if self.reason is not None and now - self.explained_at < EXPLAIN_INTERVAL:
            return self.reason
        reason = task_pb2.PendingReason()
        for agent in agents:
            if agent.status == agent_pb2.AGENT_STATUS_DEREGISTERED:
                continue
            reason.agents_evaluated += 1
            counter = self._mismatch(agent)
            if counter is None:
                if agent.status not in (READY, DRAINING) or not has_session(agent.agent_id):
                    counter = "not_ready"
                elif agent.draining or agent.status == DRAINING:
                    counter = "draining"
                elif free_capacity(agent) <= 0:
                    counter = "at_capacity"
            if counter is not None:
                setattr(reason, counter, getattr(reason, counter) + 1)
        reason.message = self._message(reason)
        reason.evaluated_at.GetCurrentTime()
        self.reason, self.explained_at = reason, now
        return reason

    def _message(self, reason: task_pb2.PendingReason) -> str:
        evaluated = reason.agents_evaluated
        tail = f"({evaluated} agent{'s' if evaluated != 1 else ''} evaluated)"
        if evaluated == 0:
            return "no agents are registered"
        if self.target and reason.filtered_by_target == evaluated:
            return f"target agent {self.target!r} is not registered {tail}"
        if reason.filtered_by_type == evaluated - reason.filtered_by_target:
            return f"no agent handles task type {self.type!r} {tail}"
        counts = [(getattr(reason, name), label) for name, label in _REASONS]
        filtered = [f"{count} {label}" for count, label in counts if count]
        if not filtered:
            return f"an agent fits; waiting for the next placement pass {tail}"
        return f"no agent can take it now: {', '.join(filtered)} {tail}"
