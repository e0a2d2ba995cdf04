"""Events, changes and a recording listener for the store contract suite (and its peer process)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from orchestrator.v1 import agent_pb2, event_pb2, task_pb2

READY = agent_pb2.AGENT_STATUS_READY
DEREGISTERED = agent_pb2.AGENT_STATUS_DEREGISTERED
PENDING = task_pb2.TASK_STATUS_PENDING
ASSIGNED = task_pb2.TASK_STATUS_ASSIGNED
RUNNING = task_pb2.TASK_STATUS_RUNNING
SUCCEEDED = task_pb2.TASK_STATUS_SUCCEEDED


def agent_event(
    agent_id: str,
    *,
    name: str | None = None,
    instance: str = "1",
    status: int = READY,
    epoch: int = 0,
    capacity: int = 0,
    labels: dict[str, str] | None = None,
) -> event_pb2.Event:
    agent = agent_pb2.Agent(
        agent_id=agent_id,
        name=name or agent_id,
        instance_id=instance,
        status=status,  # type: ignore[arg-type]
        max_concurrent_tasks=capacity,
        session=agent_pb2.Session(epoch=epoch),
        labels=labels,
    )
    return event_pb2.Event(type=event_pb2.EVENT_TYPE_AGENT_REGISTERED, agent=agent)


def task_event(
    task_id: str, *, status: int = PENDING, key: str = "", agent_id: str = "", type: str = "job"
) -> event_pb2.Event:
    """A task; with `agent_id`, its current attempt is on that agent."""
    task = task_pb2.Task(task_id=task_id, spec=task_pb2.TaskSpec(type=type, idempotency_key=key))
    task.status = status  # type: ignore[assignment]
    if agent_id:
        attempt = task.attempts.add(attempt_id=f"{task_id}-1", agent_id=agent_id)
        task.current_attempt_id = attempt.attempt_id
    return event_pb2.Event(type=event_pb2.EVENT_TYPE_TASK_CREATED, task=task)


class Recorder:
    """The on_commit listener: every delivered event's revision, in delivery order, and how they
    were grouped into calls."""

    def __init__(self) -> None:
        self.revisions: list[int] = []
        self.events: list[event_pb2.Event] = []
        self.batches: list[list[int]] = []

    def __call__(self, events: Sequence[event_pb2.Event]) -> None:
        self.batches.append([event.revision for event in events])
        self.events.extend(events)
        self.revisions.extend(event.revision for event in events)

    @property
    def last(self) -> int:
        return self.revisions[-1] if self.revisions else 0

    async def reached(self, revision: int, within: float = 30.0) -> None:
        """Waits (with a deadline) until the listener has seen `revision`."""
        deadline = time.monotonic() + within
        while self.last < revision:
            if time.monotonic() > deadline:
                raise AssertionError(f"listener saw up to {self.last}, not {revision}, within {within} s")
            await asyncio.sleep(0.01)
