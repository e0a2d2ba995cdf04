"""The task state machine, as changes to a draft.

A command copies the committed task, applies one of these to the copy, and commits the copy; only
the committed event changes what the scheduler holds. None of these touches timers, queues or
sessions: those follow from the committed state (scheduler.py), the same way whether this process
or another one made the change.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from google.protobuf import struct_pb2, timestamp_pb2

from orchestrator.v1 import task_pb2
from orchestrator_server.errors import FailedPrecondition, PermissionDenied
from orchestrator_server.tasks.model import (
    ASSIGNED,
    CANCELLED,
    FAILED,
    MAX_ATTEMPT_ERROR,
    MAX_KEPT_ATTEMPTS,
    MAX_REJECTIONS,
    PENDING,
    RUNNING,
    SUCCEEDED,
    TIMED_OUT,
    current_attempt,
    find_attempt,
    set_now,
    stamp_at,
)

#: Seconds to wait before the n-th retry (n counts failures, or refusals, in a row).
Backoff = Callable[[int], float]


def draft_of(task: task_pb2.Task) -> task_pb2.Task:
    draft = task_pb2.Task()
    draft.CopyFrom(task)
    return draft


def now_timestamp() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    set_now(stamp)
    return stamp


class UnknownAttempt(FailedPrecondition):
    """An attempt the task does not have, as this process knows it (another replica may have just
    placed it)."""


def holder_attempt(task: task_pb2.Task, attempt_id: str, agent_id: str | None) -> task_pb2.Attempt:
    """The current attempt if it is `attempt_id` (and belongs to `agent_id` when an agent reports);
    FAILED_PRECONDITION for a superseded or unknown attempt, PERMISSION_DENIED for another's."""
    attempt = current_attempt(task)
    if attempt is None or attempt.attempt_id != attempt_id:
        known = find_attempt(task, attempt_id) is not None
        raise (FailedPrecondition if known else UnknownAttempt)(
            f"attempt {attempt_id} is {'superseded' if known else 'not an attempt of this task'}; "
            f"task {task.task_id} is {task_pb2.TaskStatus.Name(task.status)}"
        )
    if agent_id is not None and attempt.agent_id != agent_id:
        raise PermissionDenied(f"attempt {attempt_id} belongs to another agent")
    return attempt


def check_holder_of_finished(task: task_pb2.Task, attempt_id: str, agent_id: str | None) -> None:
    """A report on a finished task: an agent credential may only hear about its own attempts
    (what any other agent's task looks like is none of its business, finished or not)."""
    if agent_id is None:
        return
    attempt = find_attempt(task, attempt_id)
    if attempt is None or attempt.agent_id != agent_id:
        raise PermissionDenied(f"attempt {attempt_id} belongs to another agent")


def place(task: task_pb2.Task, agent_id: str, attempt_id: str) -> task_pb2.Attempt:
    now = now_timestamp()
    task.attempt_count += 1
    attempt = task_pb2.Attempt(
        attempt_id=attempt_id,
        number=task.attempt_count,
        agent_id=agent_id,
        status=task_pb2.ATTEMPT_STATUS_ASSIGNED,
    )
    attempt.assigned_at.CopyFrom(now)
    task.attempts.append(attempt)
    if len(task.attempts) > MAX_KEPT_ATTEMPTS:
        del task.attempts[: len(task.attempts) - MAX_KEPT_ATTEMPTS]
    task.current_attempt_id = attempt_id
    task.status = ASSIGNED
    task.updated_at.CopyFrom(now)
    task.ClearField("not_before")
    task.ClearField("progress")
    task.ClearField("pending_reason")
    return task.attempts[-1]


def mark_running(task: task_pb2.Task, attempt: task_pb2.Attempt) -> bool:
    """The agent started the attempt; False if it already had."""
    if attempt.status != task_pb2.ATTEMPT_STATUS_ASSIGNED:
        return False
    attempt.status = task_pb2.ATTEMPT_STATUS_RUNNING
    set_now(attempt.started_at)
    task.status = RUNNING
    set_now(task.updated_at)
    return True


def report_progress(task: task_pb2.Task, attempt: task_pb2.Attempt, progress: task_pb2.TaskProgress) -> None:
    mark_running(task, attempt)
    task.progress.CopyFrom(progress)
    set_now(task.progress.reported_at)


def complete(task: task_pb2.Task, attempt: task_pb2.Attempt, result: struct_pb2.Struct) -> None:
    now = now_timestamp()
    attempt.status = task_pb2.ATTEMPT_STATUS_SUCCEEDED
    attempt.finished_at.CopyFrom(now)
    task.result.CopyFrom(result)
    finish(task, SUCCEEDED, now)


def fail(task: task_pb2.Task, attempt: task_pb2.Attempt, error: task_pb2.TaskError, backoff: Backoff) -> None:
    now = now_timestamp()
    attempt.status = task_pb2.ATTEMPT_STATUS_FAILED
    attempt.finished_at.CopyFrom(now)
    attempt.error.CopyFrom(error)
    attempt.error.message = error.message[:MAX_ATTEMPT_ERROR]
    _end_attempt(task, error, FAILED, now, backoff)


def run_timed_out(task: task_pb2.Task, attempt: task_pb2.Attempt, backoff: Backoff) -> None:
    now = now_timestamp()
    error = task_pb2.TaskError(message="attempt exceeded its run timeout", reason="RUN_TIMEOUT")
    attempt.status = task_pb2.ATTEMPT_STATUS_TIMED_OUT
    attempt.finished_at.CopyFrom(now)
    attempt.error.CopyFrom(error)
    _end_attempt(task, error, TIMED_OUT, now, backoff)


def reject(task: task_pb2.Task, attempt: task_pb2.Attempt, why: str, backoff: Backoff) -> None:
    """The agent refused the attempt (no handler, shutting down, full): the task backs off and a
    retry prefers another agent; past the rejection budget (not `max_attempts`) the task fails."""
    task.rejection_count += 1
    now = now_timestamp()
    error = task_pb2.TaskError(
        message=f"rejected by agent {attempt.agent_id}: {why}"[:MAX_ATTEMPT_ERROR], reason="REJECTED"
    )
    attempt.status = task_pb2.ATTEMPT_STATUS_REJECTED
    attempt.finished_at.CopyFrom(now)
    attempt.error.CopyFrom(error)
    if task.rejection_count >= MAX_REJECTIONS:
        error.message = f"rejected {task.rejection_count} times; last: {error.message}"
        task.error.CopyFrom(error)
        finish(task, FAILED, now)
        return
    _retry_later(task, task.rejection_count, now, backoff)


def lose(task: task_pb2.Task, reason: str) -> None:
    """The attempt's agent went away: the task goes back to the queue at once."""
    attempt = current_attempt(task)
    if attempt is not None:
        attempt.status = task_pb2.ATTEMPT_STATUS_LOST
        set_now(attempt.finished_at)
        attempt.error.CopyFrom(task_pb2.TaskError(message=reason, reason="LOST"))
    task.status = PENDING
    task.current_attempt_id = ""
    set_now(task.updated_at)
    task.ClearField("not_before")


def cancel(task: task_pb2.Task, message: str, reason: str, status: int = CANCELLED) -> None:
    """Ends the task by the server's decision (an operator's cancel, or its queue timeout)."""
    now = now_timestamp()
    attempt = current_attempt(task)
    if attempt is not None:
        attempt.status = task_pb2.ATTEMPT_STATUS_CANCELLED
        attempt.finished_at.CopyFrom(now)
    task.error.CopyFrom(task_pb2.TaskError(message=message[:4096], reason=reason))
    finish(task, status, now)


def finish(task: task_pb2.Task, status: int, now: timestamp_pb2.Timestamp) -> None:
    task.status = status  # type: ignore[assignment]
    task.current_attempt_id = ""
    task.updated_at.CopyFrom(now)
    task.finished_at.CopyFrom(now)
    task.ClearField("pending_reason")


def _end_attempt(
    task: task_pb2.Task,
    error: task_pb2.TaskError,
    exhausted_status: int,
    now: timestamp_pb2.Timestamp,
    backoff: Backoff,
) -> None:
    """After a failed or timed-out attempt: retry with backoff, or finish the task."""
    task.failure_count += 1
    if error.non_retryable or task.failure_count >= task.spec.max_attempts:
        task.error.CopyFrom(error)
        finish(task, exhausted_status, now)
        return
    _retry_later(task, task.failure_count, now, backoff)


def _retry_later(task: task_pb2.Task, setbacks: int, now: timestamp_pb2.Timestamp, backoff: Backoff) -> None:
    """Back to the queue after the backoff for the `setbacks`-th failure (or refusal) in a row."""
    task.status = PENDING
    task.current_attempt_id = ""
    task.updated_at.CopyFrom(now)
    task.not_before.CopyFrom(stamp_at(time.time() + backoff(setbacks)))
