"""What this process holds about unfinished tasks, fed only by committed events.

Every committed task event, whoever committed it, goes through `apply` in revision order, and
everything that follows from a task's state is derived here from the difference between its
previous and its new committed state: which agent's capacity it holds, whether it waits in the
queue or for its backoff, its queue and run timers, the assignment pushed down the agent's
session, and the cancellation an agent is told about when the server ended its attempt. So a
change made by another process (a cancel, a placement on an agent whose session is here) takes
effect here exactly as a local one does.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

from orchestrator.v1 import agent_pb2, event_pb2, task_pb2
from orchestrator_server.agents import Registry
from orchestrator_server.config import Config
from orchestrator_server.errors import OrchestratorError
from orchestrator_server.idempotency import ScopedKey
from orchestrator_server.metrics import DISPATCH_LATENCY, TASKS_FINISHED
from orchestrator_server.selectors import parse_selector
from orchestrator_server.store import StoredTask
from orchestrator_server.tasks.changes import merge
from orchestrator_server.tasks.failover import GONE, Failover
from orchestrator_server.tasks.model import (
    PENDING,
    RUNNING,
    TERMINAL,
    ActiveTask,
    TaskNotActive,
    current_attempt,
    find_attempt,
    set_now,
    wall_seconds,
)
from orchestrator_server.tasks.placement import Placer

log = logging.getLogger(__name__)

# Seconds of restoring tasks between two turns of the event loop: the process answers other calls
# in between, and the restore still gets its share of a loop busy with thousands of reconnecting
# agents. The clock is read every RESTORE_CHECK tasks (~1 ms).
RESTORE_SLICE = 0.01
RESTORE_CHECK = 64


class TaskProjection(abc.ABC):
    """Unfinished tasks as committed, and the consequences of their changes."""

    def __init__(self, config: Config, registry: Registry, rng: random.Random) -> None:
        self._config = config
        self._registry = registry
        self._active: dict[str, ActiveTask] = {}
        self._held: dict[str, set[str]] = {}  # agent id -> ids of the tasks whose attempt it holds
        self._placed = 0  # tasks held by some agent (the sum of the sets above)
        self._sequence = 0
        # Whole records of this process's task commits in flight, by task id: when the event of one
        # is delivered, the record is taken as it is instead of being rebuilt from the event.
        self._committing: dict[str, task_pb2.Task] = {}
        # Idempotency keys of tasks this process is creating, until their creation is projected.
        self._created_keys: dict[str, ScopedKey | None] = {}
        self._placer = Placer(
            config,
            rng,
            agents=registry.agents,
            has_session=lambda agent_id: registry.session_of(agent_id) is not None,
            held=lambda agent_id: len(self._held.get(agent_id, ())),
            entry_of=self._active.get,
            start=self._start_placement,
        )
        self._failover = Failover(config, registry.find, registry.agents, self._move_work)
        self._background: set[asyncio.Task[object]] = set()
        # The store's snapshot of unfinished tasks (`load`), restored in the background: committed
        # events on a task not restored yet wait here for it (in revision order), and so do
        # commands on it (`_restored`: every task of the snapshot restored).
        self._snapshot: Sequence[StoredTask] = ()
        self._unrestored: set[str] = set()
        self._held_back: dict[str, list[event_pb2.Event]] = {}
        self._restored = asyncio.Event()

    # -- what the commands provide -------------------------------------------------------------

    @abc.abstractmethod
    def _start_placement(self, entry: ActiveTask, agent: agent_pb2.Agent) -> None:
        """Commits the placement pass's decision to place `entry` on an agent."""

    @abc.abstractmethod
    def _move_work(self, agent_id: str, reason: str) -> None:
        """Takes every attempt the agent holds away from it (failover)."""

    @abc.abstractmethod
    def _queue_timed_out(self, task_id: str) -> None: ...

    @abc.abstractmethod
    def _run_timed_out(self, task_id: str, attempt_id: str) -> None: ...

    # -- startup -------------------------------------------------------------------------------

    def load(self, snapshot: Sequence[StoredTask]) -> None:
        """Takes the store's snapshot of unfinished tasks, to restore in the background
        (`restore_held`, then `restore_pending`); nothing is placed until all are restored."""
        self._snapshot = snapshot
        self._unrestored = {task_id for task_id, _, _ in snapshot}
        self._sequence = len(snapshot)  # restored tasks keep their place in creation order
        self._placer.paused = True

    async def restore_held(self) -> None:
        """Restores the tasks that agents hold: all that a session's welcome and failover need."""
        await self._restore(lambda status: status != PENDING)

    async def restore_pending(self) -> None:
        """Restores the rest (usually nearly all); then placement starts."""
        started, cpu_started = time.perf_counter(), time.process_time()
        restored = await self._restore(lambda status: status == PENDING)
        self._snapshot = ()
        self._restored.set()
        self._placer.paused = False
        self._placer.kick()
        log.info(
            "restored %d pending tasks in %.2f s (%.2f s of process CPU)",
            restored,
            time.perf_counter() - started,
            time.process_time() - cpu_started,
        )

    async def _restore(self, selected: Callable[[int], bool]) -> int:
        """Restores the selected tasks of the snapshot, a time slice per event-loop turn, so the
        process serves meanwhile; returns how many."""
        restored = 0
        slice_ends = time.perf_counter() + RESTORE_SLICE
        for sequence, (_, status, record) in enumerate(self._snapshot, 1):
            if selected(status):
                self._restore_one(task_pb2.Task.FromString(record), sequence)
                restored += 1
            if sequence % RESTORE_CHECK == 0 and time.perf_counter() > slice_ends:
                await asyncio.sleep(0)
                slice_ends = time.perf_counter() + RESTORE_SLICE
        return restored

    def _restore_one(self, task: task_pb2.Task, sequence: int) -> None:
        if not task.attempt_count and task.attempts:
            # Recorded before attempts were counted: every attempt was still listed then.
            task.attempt_count = len(task.attempts)
            task.failure_count = sum(
                1
                for attempt in task.attempts
                if attempt.status in (task_pb2.ATTEMPT_STATUS_FAILED, task_pb2.ATTEMPT_STATUS_TIMED_OUT)
            )
        if task.status != PENDING and current_attempt(task) is None:
            task.status = PENDING  # an inconsistent record: it goes back to the queue
        self._settle(self._track(task, sequence), None)
        self._unrestored.discard(task.task_id)
        for event in self._held_back.pop(task.task_id, ()):
            self.apply(event)

    def agents_down_holding_work(self) -> list[str]:
        """Agents that hold attempts but are down (or gone) as far as this process knows."""
        down = []
        for agent_id in self._held:
            agent = self._registry.find(agent_id)
            if agent is None or agent.status in GONE:
                down.append(agent_id)
        return down

    # -- the projection ------------------------------------------------------------------------

    def apply(self, event: event_pb2.Event) -> None:
        """Takes in one committed event (of any process), in revision order."""
        if not event.HasField("task"):
            return
        if event.task.task_id in self._unrestored:
            # Not restored yet: taken in right after it is.
            self._held_back.setdefault(event.task.task_id, []).append(event)
            return
        task_id = event.task.task_id
        entry = self._active.get(task_id)
        if entry is None:
            if event.task.status in TERMINAL:
                return  # finished before this process ever held it
            self._settle(self._track(self._whole(event, None)), None)
            return
        previous = entry.task
        if event.revision <= previous.revision:
            return  # already held (loaded at start after this event was committed)
        entry.task = self._whole(event, previous)
        self._settle(entry, previous)

    def _whole(self, event: event_pb2.Event, previous: task_pb2.Task | None) -> task_pb2.Task:
        """The whole task after `event`: the record of this process's own commit (the store stamped
        it with the event's revision), else rebuilt from the previous state and the event."""
        local = self._committing.get(event.task.task_id)
        if local is not None and local.revision == event.revision:
            return local
        return merge(previous, event.task)

    def _track(self, task: task_pb2.Task, sequence: int = 0) -> ActiveTask:
        """`sequence`: the task's place in creation order (0: a new task, after every other)."""
        if not sequence:
            self._sequence += 1
            sequence = self._sequence
        key = self._created_keys.get(task.task_id)
        entry = ActiveTask(task, sequence, parse_selector(task.spec.label_selector), key)
        # Placeable from now on: dispatch latency counts from here for a task placed as it is created.
        entry.placeable_since = asyncio.get_running_loop().time()
        self._active[task.task_id] = entry
        return entry

    def _settle(self, entry: ActiveTask, previous: task_pb2.Task | None) -> None:
        """Brings holds, queue, timers and sessions in line with the task's new committed state."""
        task = entry.task
        before = current_attempt(previous) if previous is not None else None
        now = entry.current_attempt
        if before is not None and (now is None or now.attempt_id != before.attempt_id):
            self._attempt_ended(entry, before)
        if now is not None and (before is None or before.attempt_id != now.attempt_id):
            self._attempt_started(entry, now)
        if task.status in TERMINAL:
            self._forget(entry)
            return
        if previous is None:
            self._arm_queue_timer(entry)
        if task.status == RUNNING and entry.queue_timer is not None:
            entry.queue_timer.cancel()
            entry.queue_timer = None
        if task.status != PENDING and entry.backoff_timer is not None:
            entry.backoff_timer.cancel()
            entry.backoff_timer = None
        if task.status == PENDING and (previous is None or previous.status != PENDING):
            self._enqueue(entry)

    def _attempt_started(self, entry: ActiveTask, attempt: task_pb2.Attempt) -> None:
        self._hold(attempt.agent_id, entry.task.task_id)
        self._arm_run_timer(entry, attempt)
        entry.pushed_epoch = 0
        self._push_assignment(entry, attempt)

    def _attempt_ended(self, entry: ActiveTask, before: task_pb2.Attempt) -> None:
        """The agent no longer holds the attempt; if the server ended it, the agent is told."""
        if entry.run_timer is not None:
            entry.run_timer.cancel()
            entry.run_timer = None
        self._release(before.agent_id, entry.task.task_id)
        ended = find_attempt(entry.task, before.attempt_id)
        if ended is None:
            return
        if ended.status == task_pb2.ATTEMPT_STATUS_TIMED_OUT:
            self._tell_cancel(before.agent_id, entry.task.task_id, before.attempt_id, "run timeout")
        elif ended.status == task_pb2.ATTEMPT_STATUS_CANCELLED:
            error = entry.task.error
            why = "queue timeout" if error.reason == "QUEUE_TIMEOUT" else error.message or "cancelled"
            self._tell_cancel(before.agent_id, entry.task.task_id, before.attempt_id, why)

    def _forget(self, entry: ActiveTask) -> None:
        task = entry.task
        entry.cancel_timers()
        TASKS_FINISHED.labels(
            task_pb2.TaskStatus.Name(task.status).removeprefix("TASK_STATUS_").lower()
        ).inc()
        del self._active[task.task_id]
        self._on_finished(entry)

    @abc.abstractmethod
    def _on_finished(self, entry: ActiveTask) -> None:
        """A task this process held finished (its record stays in the store)."""

    # -- capacity held on agents ---------------------------------------------------------------

    def _hold(self, agent_id: str, task_id: str) -> None:
        held = self._held.setdefault(agent_id, set())
        if task_id not in held:
            held.add(task_id)
            self._placed += 1
        self._registry.set_assigned_tasks(agent_id, len(held))

    def _release(self, agent_id: str, task_id: str) -> None:
        held = self._held.get(agent_id)
        if held is None or task_id not in held:
            return
        held.discard(task_id)
        self._placed -= 1
        if not held:
            del self._held[agent_id]
        self._registry.set_assigned_tasks(agent_id, len(held))
        self._placer.kick()

    # -- the queue and the timers --------------------------------------------------------------

    def _enqueue(self, entry: ActiveTask) -> None:
        if entry.backoff_timer is not None:
            entry.backoff_timer.cancel()
            entry.backoff_timer = None
        task = entry.task
        if task.HasField("not_before") and wall_seconds(task.not_before) > time.time():
            entry.backoff_timer = self._call_at_wall(
                wall_seconds(task.not_before), self._backoff_elapsed, task.task_id
            )
            return
        self._placer.push(entry)

    def _backoff_elapsed(self, task_id: str) -> None:
        entry = self._active.get(task_id)
        if entry is None:
            return
        entry.backoff_timer = None
        if entry.task.status == PENDING:
            self._placer.push(entry)

    def _arm_queue_timer(self, entry: ActiveTask) -> None:
        spec = entry.task.spec
        if not spec.HasField("queue_timeout") or entry.task.status == RUNNING:
            return
        if spec.queue_timeout.ToNanoseconds() <= 0:
            return
        deadline = wall_seconds(entry.task.created_at) + spec.queue_timeout.ToNanoseconds() / 1e9
        entry.queue_timer = self._call_at_wall(deadline, self._queue_timed_out, entry.task.task_id)

    def _arm_run_timer(self, entry: ActiveTask, attempt: task_pb2.Attempt) -> None:
        if entry.run_timer is not None:
            entry.run_timer.cancel()
            entry.run_timer = None
        spec = entry.task.spec
        if not spec.HasField("run_timeout") or spec.run_timeout.ToNanoseconds() <= 0:
            return
        deadline = wall_seconds(attempt.assigned_at) + spec.run_timeout.ToNanoseconds() / 1e9
        entry.run_timer = self._call_at_wall(
            deadline, self._run_timed_out, entry.task.task_id, attempt.attempt_id
        )

    @staticmethod
    def _call_at_wall(deadline: float, callback: Callable[..., None], *args: str) -> asyncio.TimerHandle:
        """Deadlines are stored as wall-clock times, so they hold across restarts and processes."""
        return asyncio.get_running_loop().call_later(max(0.0, deadline - time.time()), callback, *args)

    # -- sessions ------------------------------------------------------------------------------

    def _push_assignment(self, entry: ActiveTask, attempt: task_pb2.Attempt) -> None:
        """Pushes the attempt down its agent's session if the session is here and has not had it."""
        session = self._registry.session_of(attempt.agent_id)
        if session is not None and entry.pushed_epoch != session.epoch:
            if entry.pushed_epoch == 0:
                DISPATCH_LATENCY.observe(asyncio.get_running_loop().time() - entry.placeable_since)
            entry.pushed_epoch = session.epoch
            session.assign(entry.task, attempt.attempt_id)

    def _tell_cancel(self, agent_id: str, task_id: str, attempt_id: str, reason: str) -> None:
        session = self._registry.session_of(agent_id)
        if session is not None:
            session.cancel(task_id, attempt_id, reason)

    # -- pending reasons -----------------------------------------------------------------------

    def _explained(self, entry: ActiveTask) -> task_pb2.Task:
        """The live task, with a fresh pending reason while it waits. The reason is soft state: it
        rides along with the task's next commit, and a read refreshes it when older than a second."""
        task = entry.task
        if task.status != PENDING:
            return task
        if entry.backoff_timer is not None and task.HasField("not_before"):
            last = task.attempts[-1] if task.attempts else None
            waited = f" after attempt {last.number}: {last.error.message}" if last is not None else ""
            task.pending_reason.Clear()
            task.pending_reason.message = (
                f"waiting for its retry backoff until {task.not_before.ToJsonString()}{waited}"
            )[:1024]
            set_now(task.pending_reason.evaluated_at)
        else:
            task.pending_reason.CopyFrom(self._placer.explain(self._placer.group_for(entry)))
        return task

    # -- background work -----------------------------------------------------------------------

    def _spawn(self, work: Awaitable[object]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[object]) -> None:
        self._background.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, OrchestratorError):
            log.info("task command refused: %s", error.message)
        elif error is not None and not isinstance(error, TaskNotActive):
            log.error("task command failed: %r", error)

    def shutdown(self) -> None:
        for entry in self._active.values():
            entry.cancel_timers()
        self._failover.shutdown()
