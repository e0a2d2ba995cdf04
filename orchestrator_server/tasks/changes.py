"""Task events carry what changed, bounded in size.

The store keeps the whole task as its record; the event log (read by every watcher and by every
other process) gets the task without what the change cannot have touched: the payload (only in
TASK_CREATED; it never changes) and the attempt history (only the attempt that changed, which is
always the last one: placements append, every ending changes the last). An event about a task is
then at most its result (1 MiB, once, on success) plus a few KB, however often the task was retried.

`merge` puts a task back together from the previous state and an event; projections and watchers
use it whether the event was committed here or by another process.
"""

from __future__ import annotations

from orchestrator.v1 import event_pb2, task_pb2
from orchestrator_server.tasks.model import MAX_KEPT_ATTEMPTS


def event_for(task: task_pb2.Task, event_type: int) -> event_pb2.Event:
    """The event announcing `task` (a committed draft), without what it need not carry."""
    event = event_pb2.Event(type=event_type)  # type: ignore[arg-type]
    carried = event.task
    carried.CopyFrom(task)
    if event_type != event_pb2.EVENT_TYPE_TASK_CREATED:
        carried.spec.ClearField("payload")
    if len(carried.attempts) > 1:
        del carried.attempts[:-1]
    return event


def merge(previous: task_pb2.Task | None, changed: task_pb2.Task) -> task_pb2.Task:
    """The whole task after `changed` (an event's task) given the whole task before it."""
    task = task_pb2.Task()
    task.CopyFrom(changed)
    if previous is None:
        return task
    if not task.spec.HasField("payload") and previous.spec.HasField("payload"):
        task.spec.payload.CopyFrom(previous.spec.payload)
    if len(changed.attempts) == 1 and len(previous.attempts) >= 1:
        latest = changed.attempts[0]
        history = list(previous.attempts)
        if history[-1].attempt_id == latest.attempt_id:
            history[-1] = latest
        else:
            history.append(latest)
        del task.attempts[:]
        task.attempts.extend(history[-MAX_KEPT_ATTEMPTS:])
    return task
