"""What the scheduler keeps per unfinished task, and the task constants every module shares."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf import timestamp_pb2

from orchestrator.v1 import task_pb2
from orchestrator_server.idempotency import ScopedKey
from orchestrator_server.selectors import Selector
from orchestrator_server.tasks.groups import GroupKey

if TYPE_CHECKING:
    from orchestrator_server.tasks.commands import Command

PENDING = task_pb2.TASK_STATUS_PENDING
ASSIGNED = task_pb2.TASK_STATUS_ASSIGNED
RUNNING = task_pb2.TASK_STATUS_RUNNING
SUCCEEDED = task_pb2.TASK_STATUS_SUCCEEDED
FAILED = task_pb2.TASK_STATUS_FAILED
CANCELLED = task_pb2.TASK_STATUS_CANCELLED
TIMED_OUT = task_pb2.TASK_STATUS_TIMED_OUT
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT})
HELD = frozenset({ASSIGNED, RUNNING})

MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_ATTEMPTS_LIMIT = 100
# A task keeps its most recent attempts only (`attempt_count` counts them all), so a task row
# stays bounded however often the task is retried or moved.
MAX_KEPT_ATTEMPTS = 16
# Characters of an attempt's error message kept in the attempt (the task's own error keeps 4096).
MAX_ATTEMPT_ERROR = 512
# Refusals by agents (no handler, shutting down, full) a task survives. A refusal backs off like a
# failure but has its own budget instead of using `max_attempts`: an agent that is shutting down or
# briefly full refuses work it would otherwise run, and that must not fail a task. Past the budget
# the task ends FAILED ("REJECTED"), so nothing cycles between the scheduler and an agent.
MAX_REJECTIONS = 10


class TaskNotActive(Exception):
    """The task is not unfinished in this process (finished, or unknown)."""


def wall_seconds(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def set_now(stamp: timestamp_pb2.Timestamp) -> None:
    """Sets `stamp` to now. Protobuf's GetCurrentTime goes through a datetime, which made clock
    reads a tenth of a command's cost; the integer clock gives the same value without one."""
    stamp.FromNanoseconds(time.time_ns())


def stamp_at(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def current_attempt(task: task_pb2.Task) -> task_pb2.Attempt | None:
    """The attempt an agent holds now (the last one), if the task is placed."""
    if not task.current_attempt_id or not task.attempts:
        return None
    return task.attempts[-1]


def find_attempt(task: task_pb2.Task, attempt_id: str) -> task_pb2.Attempt | None:
    return next((attempt for attempt in task.attempts if attempt.attempt_id == attempt_id), None)


@dataclass(eq=False)
class ActiveTask:
    """An unfinished task as last committed, and this process's bookkeeping around it.

    `task` is replaced by each committed event (never edited in place, except the soft
    `pending_reason`); the rest is soft state: timers, the heap position, whether a placement is in
    flight, and the session epoch the current attempt was last pushed down."""

    task: task_pb2.Task
    sequence: int
    selector: Selector
    key: ScopedKey | None = None
    queue_timer: asyncio.TimerHandle | None = None
    run_timer: asyncio.TimerHandle | None = None
    backoff_timer: asyncio.TimerHandle | None = None
    # Commands on one task run one commit at a time in this process, so they never conflict with
    # each other (a conflict means another process changed the task); those waiting meanwhile are
    # folded into the next commit (commands.py).
    commands: list[Command] = field(default_factory=list)
    writing: bool = False
    # A lazy command (an agent's STARTED) waits this long for company before it commits alone.
    fold_timer: asyncio.TimerHandle | None = None
    # A placement of this task is being committed: the pass must not pick it again meanwhile.
    placing: bool = False
    # Session epoch the current attempt was last pushed down; a reconnect re-pushes only if older.
    pushed_epoch: int = 0
    # Loop time the task last became placeable, for the dispatch latency metric.
    placeable_since: float = 0.0

    # The requirement group: the spec never changes, so it is worked out once.
    group: GroupKey = field(init=False)

    def __post_init__(self) -> None:
        spec = self.task.spec
        self.group = (
            spec.type,
            frozenset(spec.required_capabilities),
            spec.label_selector.strip(),
            spec.target_agent_id,
        )

    @property
    def current_attempt(self) -> task_pb2.Attempt | None:
        return current_attempt(self.task)

    def cancel_timers(self) -> None:
        for timer in (self.queue_timer, self.run_timer, self.backoff_timer):
            if timer is not None:
                timer.cancel()
        self.queue_timer = self.run_timer = self.backoff_timer = None
