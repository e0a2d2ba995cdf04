"""Tasks: queueing, placement, attempts, retries, timeouts and failover.

Unfinished tasks live in memory (a cache of the store, rebuilt at start); finished ones are read
from the store. Pending tasks wait in one priority heap per *requirement group* (same type,
capabilities, selector and target; see placement.py), so a placement pass costs O(groups) per
placement however many tasks wait: a group no agent fits is skipped whole, and says why.

Placement is event-driven: a pass runs when something changes (task created, agent available,
capacity freed, backoff elapsed), never on a polling loop. Each placement is an attempt with its
own id, committed before it is pushed down the agent's session; only the holder of the current
attempt may complete or fail it.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf import struct_pb2, timestamp_pb2

from orchestrator.v1 import agent_pb2, discovery_pb2, event_pb2, registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.config import Config
from orchestrator_server.discovery import load_score, rendezvous_pick
from orchestrator_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from orchestrator_server.health import WorkloadSummary
from orchestrator_server.idempotency import IdempotencyKeys, ScopedKey, check_same_spec
from orchestrator_server.metrics import DISPATCH_LATENCY, FAILOVER_PAUSES, FAILOVERS, TASKS_FINISHED
from orchestrator_server.placement import Group, GroupKey
from orchestrator_server.registry import READY, Registry, new_id, now_timestamp
from orchestrator_server.selectors import Selector, parse_selector
from orchestrator_server.store import Change, Store, TaskQuery
from orchestrator_server.validation import (
    MAX_CAPABILITIES,
    Violations,
    decode_position_token,
    encode_page_token,
)

log = logging.getLogger(__name__)

PENDING = task_pb2.TASK_STATUS_PENDING
ASSIGNED = task_pb2.TASK_STATUS_ASSIGNED
RUNNING = task_pb2.TASK_STATUS_RUNNING
SUCCEEDED = task_pb2.TASK_STATUS_SUCCEEDED
FAILED = task_pb2.TASK_STATUS_FAILED
CANCELLED = task_pb2.TASK_STATUS_CANCELLED
TIMED_OUT = task_pb2.TASK_STATUS_TIMED_OUT
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT})

MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_ATTEMPTS_LIMIT = 100
# A task keeps its most recent attempts only (`attempt_count` counts them all), so a task row and
# every event carrying it stay bounded however often the task is retried or moved.
MAX_KEPT_ATTEMPTS = 16
# Characters of an attempt's error message kept in the attempt (the task's own error keeps 4096).
MAX_ATTEMPT_ERROR = 512
# Refusals by agents (no handler, shutting down, full) a task survives. A refusal backs off like a
# failure but has its own budget instead of using `max_attempts`: an agent that is shutting down or
# briefly full refuses work it would otherwise run, and that must not fail a task. Past the budget
# the task ends FAILED ("REJECTED"), so nothing cycles between the scheduler and an agent.
MAX_REJECTIONS = 10
STRATEGIES = {
    "least_loaded": discovery_pb2.LOAD_BALANCING_STRATEGY_LEAST_LOADED,
    "round_robin": discovery_pb2.LOAD_BALANCING_STRATEGY_ROUND_ROBIN,
    "random": discovery_pb2.LOAD_BALANCING_STRATEGY_RANDOM,
    "consistent_hash": discovery_pb2.LOAD_BALANCING_STRATEGY_CONSISTENT_HASH,
}


def wall_seconds(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def stamp_at(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


@dataclass(eq=False)
class ActiveTask:
    """An unfinished task and its timers."""

    task: task_pb2.Task
    sequence: int
    selector: Selector
    key: ScopedKey | None = None
    queue_timer: asyncio.TimerHandle | None = None
    run_timer: asyncio.TimerHandle | None = None
    backoff_timer: asyncio.TimerHandle | None = None
    # Session epoch the current attempt was last pushed down; a reconnect re-pushes only if older.
    pushed_epoch: int = 0
    # Loop time the task last became placeable, for the dispatch latency metric.
    placeable_since: float = 0.0

    @property
    def group(self) -> GroupKey:
        spec = self.task.spec
        return (
            spec.type,
            frozenset(spec.required_capabilities),
            spec.label_selector.strip(),
            spec.target_agent_id,
        )

    @property
    def current_attempt(self) -> task_pb2.Attempt | None:
        if not self.task.current_attempt_id:
            return None
        return self.task.attempts[-1]

    def cancel_timers(self) -> None:
        for timer in (self.queue_timer, self.run_timer, self.backoff_timer):
            if timer is not None:
                timer.cancel()
        self.queue_timer = self.run_timer = self.backoff_timer = None


class TaskScheduler:
    """Every unfinished task, and where it runs. Implements the registry's AgentObserver."""

    def __init__(
        self, config: Config, registry: Registry, store: Store, rng: random.Random | None = None
    ) -> None:
        self._config = config
        self._registry = registry
        self._store = store
        self._rng = rng or random.Random()
        self._active: dict[str, ActiveTask] = {}
        self._keys = IdempotencyKeys(store)
        self._groups: dict[GroupKey, Group] = {}
        self._held: dict[str, set[str]] = {}  # agent id -> task ids placed on it
        self._placed = 0  # tasks placed on some agent (the sum of the sets above)
        self._sequence = 0
        self._strategy = STRATEGIES[config.scheduling_strategy]
        self._round_robin = 0
        self._pass_scheduled = False
        self._failover_timers: dict[str, asyncio.TimerHandle] = {}
        self._recent_drops: list[float] = []
        self._paused_until = 0.0
        self._deferred_failovers: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()

    # -- startup -------------------------------------------------------------------------------

    def restore(self, tasks: Iterable[task_pb2.Task]) -> None:
        now = time.time()
        for task in tasks:
            if not task.attempt_count and task.attempts:
                # Recorded before attempts were counted: every attempt was still listed then.
                task.attempt_count = len(task.attempts)
                task.failure_count = sum(
                    1
                    for attempt in task.attempts
                    if attempt.status in (task_pb2.ATTEMPT_STATUS_FAILED, task_pb2.ATTEMPT_STATUS_TIMED_OUT)
                )
            entry = self._track(task)
            if task.status == PENDING:
                self._enqueue(entry, now)
            else:
                attempt = entry.current_attempt
                if attempt is None:  # inconsistent record: put it back in the queue
                    task.status = PENDING
                    self._enqueue(entry, now)
                    continue
                self._hold(attempt.agent_id, task.task_id)
                self._arm_run_timer(entry, now)
        # Work held by agents that were already down before the restart: they had their grace then.
        for agent_id in list(self._held):
            agent = self._registry.find(agent_id)
            if agent is None or agent.status in (
                agent_pb2.AGENT_STATUS_DOWN,
                agent_pb2.AGENT_STATUS_DEREGISTERED,
            ):
                self._fail_over(agent_id, "agent was down when the orchestrator restarted")
        log.info("restored %d unfinished tasks", len(self._active))

    # -- queries -------------------------------------------------------------------------------

    async def get(self, task_id: str) -> task_pb2.Task:
        if not task_id:
            raise InvalidArgument.field("task_id", "is required")
        entry = self._active.get(task_id)
        if entry is not None:
            return self._explained(entry)
        task = await self._store.get_task(task_id)
        if task is None:
            raise NotFound(f"task {task_id} not found")
        return task

    async def list_tasks(self, request: tasks_pb2.ListTasksRequest) -> tuple[list[task_pb2.Task], str]:
        violations = Violations()
        if request.status not in task_pb2.TaskStatus.values():
            violations.add("status", f"unknown status {request.status}")
        violations.name("type", request.type, required=False)
        violations.name("agent_id", request.agent_id, required=False)
        size = violations.page_size("page_size", request.page_size)
        violations.raise_if_any()
        after = decode_position_token(request.page_token)
        tasks, next_position = await self._store.list_tasks(
            TaskQuery(
                status=request.status,
                type=request.type,
                agent_id=request.agent_id,
                page_size=size,
                after_sequence=after,
            )
        )
        # Prefer the in-memory copy of unfinished tasks: it may be a commit ahead of the page.
        fresh = [
            self._explained(self._active[task.task_id]) if task.task_id in self._active else task
            for task in tasks
        ]
        return fresh, encode_page_token(str(next_position)) if next_position is not None else ""

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
            task.pending_reason.evaluated_at.GetCurrentTime()
        else:
            task.pending_reason.CopyFrom(self._explain(self._group_for(entry)))
        return task

    def _explain(self, group: Group) -> task_pb2.PendingReason:
        return group.explain(
            self._registry.agents(),
            lambda agent_id: self._registry.session_of(agent_id) is not None,
            self._free_capacity,
            asyncio.get_running_loop().time(),
        )

    def workload(self) -> WorkloadSummary:
        # Unfinished tasks are either placed (held by an agent) or pending; the heaps may also hold
        # stale entries (removed lazily), so they are not counted.
        running = self._placed
        pending = len(self._active) - running
        paused = self._failover_paused()
        return WorkloadSummary(
            pending_tasks=pending,
            running_tasks=running,
            failover_paused=paused,
            failover_paused_reason=(
                f"{len(self._recent_drops)} agents dropped within {self._config.mass_failure_window:g} s; "
                f"{len(self._deferred_failovers)} failovers deferred"
                if paused
                else ""
            ),
        )

    # -- creation ------------------------------------------------------------------------------

    async def create(self, spec: task_pb2.TaskSpec, scope: str = "") -> tuple[task_pb2.Task, bool]:
        """Creates a task; `scope` names the caller, to which an idempotency key belongs."""
        self._validate_spec(spec)
        key = (scope, spec.idempotency_key) if spec.idempotency_key else None
        if key is not None:
            existing = await self._keys.existing(key, self._live_task)
            if existing is not None:
                check_same_spec(existing, spec)
                return existing, False
            self._keys.begin(key)
        try:
            task = task_pb2.Task(task_id=new_id("tsk_"), status=PENDING)
            task.spec.CopyFrom(spec)
            if not task.spec.max_attempts:
                task.spec.max_attempts = self._config.default_max_attempts
            now = now_timestamp()
            task.created_at.CopyFrom(now)
            task.updated_at.CopyFrom(now)
            entry = self._track(task, key)
            await self._commit(entry, event_pb2.EVENT_TYPE_TASK_CREATED)
            self._enqueue(entry, time.time())
            self._arm_queue_timer(entry)
        except BaseException as error:
            if key is not None:
                self._keys.failed(key, error)
            raise
        if key is not None:
            self._keys.created(key, task)
        return task, True

    def _live_task(self, task_id: str) -> task_pb2.Task | None:
        entry = self._active.get(task_id)
        return entry.task if entry is not None else None

    def _validate_spec(self, spec: task_pb2.TaskSpec) -> None:
        violations = Violations()
        violations.name("spec.type", spec.type)
        if spec.payload.ByteSize() > MAX_PAYLOAD_BYTES:
            violations.add("spec.payload", f"larger than {MAX_PAYLOAD_BYTES} bytes")
        else:
            violations.value("spec.payload", spec.payload)
        violations.names("spec.required_capabilities", spec.required_capabilities, MAX_CAPABILITIES)
        try:
            parse_selector(spec.label_selector, "spec.label_selector")
        except InvalidArgument as error:
            violations.items.extend(error.violations)
        violations.name("spec.target_agent_id", spec.target_agent_id, required=False)
        if not -1000 <= spec.priority <= 1000:
            violations.add("spec.priority", "must be between -1000 and 1000")
        for name in ("queue_timeout", "run_timeout"):
            violations.duration(f"spec.{name}", spec.HasField(name), getattr(spec, name))
        if not 0 <= spec.max_attempts <= MAX_ATTEMPTS_LIMIT:
            violations.add("spec.max_attempts", f"must be between 0 and {MAX_ATTEMPTS_LIMIT}")
        violations.text("spec.idempotency_key", spec.idempotency_key, 256)
        violations.text("spec.routing_key", spec.routing_key, 256)
        violations.labels("spec.labels", spec.labels)
        violations.raise_if_any()

    # -- agent reports -------------------------------------------------------------------------

    async def complete(
        self, task_id: str, attempt_id: str, result: struct_pb2.Struct, agent_id: str | None = None
    ) -> task_pb2.Task:
        self._validate_report(task_id, attempt_id)
        violations = Violations()
        if result.ByteSize() > MAX_PAYLOAD_BYTES:
            violations.add("result", f"larger than {MAX_PAYLOAD_BYTES} bytes")
        else:
            violations.value("result", result)
        violations.raise_if_any()
        entry = self._active.get(task_id)
        if entry is None:
            task = await self.get(task_id)
            self._check_holder(task, attempt_id, agent_id)
            if task.status == SUCCEEDED and task.attempts and task.attempts[-1].attempt_id == attempt_id:
                return task  # a retried report of the completion that already landed
            raise FailedPrecondition(
                f"task {task_id} is {task_pb2.TaskStatus.Name(task.status)}, not running"
            )
        attempt = self._current(entry, attempt_id, agent_id)
        task = entry.task
        now = now_timestamp()
        attempt.status = task_pb2.ATTEMPT_STATUS_SUCCEEDED
        attempt.finished_at.CopyFrom(now)
        task.result.CopyFrom(result)
        self._finish(entry, SUCCEEDED, now)
        await self._commit(entry)
        return task

    async def fail(
        self, task_id: str, attempt_id: str, error: task_pb2.TaskError, agent_id: str | None = None
    ) -> task_pb2.Task:
        self._validate_report(task_id, attempt_id)
        violations = Violations()
        violations.text("error.message", error.message, 4096)
        violations.text("error.reason", error.reason, 256)
        violations.raise_if_any()
        entry = self._active.get(task_id)
        if entry is None:
            task = await self.get(task_id)
            self._check_holder(task, attempt_id, agent_id)
            raise FailedPrecondition(
                f"task {task_id} is {task_pb2.TaskStatus.Name(task.status)}, not running"
            )
        attempt = self._current(entry, attempt_id, agent_id)
        now = now_timestamp()
        attempt.status = task_pb2.ATTEMPT_STATUS_FAILED
        attempt.finished_at.CopyFrom(now)
        attempt.error.CopyFrom(error)
        attempt.error.message = error.message[:MAX_ATTEMPT_ERROR]
        self._end_attempt(entry, error, exhausted_status=FAILED, now=now)
        await self._commit(entry)
        return entry.task

    async def progress(
        self, task_id: str, attempt_id: str, progress: task_pb2.TaskProgress, agent_id: str | None = None
    ) -> task_pb2.Task:
        entry = self._report_progress(task_id, attempt_id, progress, agent_id)
        await self._commit(entry)
        return entry.task

    def _report_progress(
        self, task_id: str, attempt_id: str, progress: task_pb2.TaskProgress, agent_id: str | None
    ) -> ActiveTask:
        self._validate_report(task_id, attempt_id)
        violations = Violations()
        if not 0.0 <= progress.fraction <= 1.0:
            violations.add("progress.fraction", "must be between 0.0 and 1.0")
        violations.text("progress.message", progress.message, MAX_ATTEMPT_ERROR)
        violations.raise_if_any()
        entry = self._active.get(task_id)
        if entry is None:
            raise FailedPrecondition(f"task {task_id} is not running")
        attempt = self._current(entry, attempt_id, agent_id)
        self._mark_running(entry, attempt)
        entry.task.progress.CopyFrom(progress)
        entry.task.progress.reported_at.GetCurrentTime()
        return entry

    def session_update(self, agent_id: str, update: registry_pb2.SessionTaskUpdate) -> None:
        """A task report over the agent's session (STARTED, PROGRESS, REJECTED).

        Applied at once, committed in the background: a session message has no reply to hold back,
        and the session's reader must not wait for the disk before it reads the next beat."""
        if update.kind == registry_pb2.TASK_UPDATE_KIND_PROGRESS:
            entry = self._report_progress(update.task_id, update.attempt_id, update.progress, agent_id)
        else:
            self._validate_report(update.task_id, update.attempt_id)
            found = self._active.get(update.task_id)
            if found is None:
                raise FailedPrecondition(f"task {update.task_id} is not running")
            entry = found
            attempt = self._current(entry, update.attempt_id, agent_id)
            if update.kind == registry_pb2.TASK_UPDATE_KIND_STARTED:
                self._mark_running(entry, attempt)
            elif update.kind == registry_pb2.TASK_UPDATE_KIND_REJECTED:
                self._reject(entry, attempt, update.reason)
            else:
                raise InvalidArgument.field("task_update.kind", "is required")
        self._spawn(self._commit(entry))

    def _reject(self, entry: ActiveTask, attempt: task_pb2.Attempt, why: str) -> None:
        """The agent refused the attempt (no handler, shutting down, full): the task backs off and a
        retry prefers another agent; past the rejection budget (not `max_attempts`) the task fails."""
        task = entry.task
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
            self._finish(entry, FAILED, now)
            return
        self._retry_later(entry, task.rejection_count, now)

    def _validate_report(self, task_id: str, attempt_id: str) -> None:
        violations = Violations()
        violations.identifier("task_id", task_id)
        violations.identifier("attempt_id", attempt_id)
        violations.raise_if_any()

    def _current(self, entry: ActiveTask, attempt_id: str, agent_id: str | None) -> task_pb2.Attempt:
        attempt = entry.current_attempt
        if attempt is None or attempt.attempt_id != attempt_id:
            known = any(old.attempt_id == attempt_id for old in entry.task.attempts)
            raise FailedPrecondition(
                f"attempt {attempt_id} is {'superseded' if known else 'not an attempt of this task'}; "
                f"task {entry.task.task_id} is {task_pb2.TaskStatus.Name(entry.task.status)}"
            )
        if agent_id is not None and attempt.agent_id != agent_id:
            raise PermissionDenied(f"attempt {attempt_id} belongs to another agent")
        return attempt

    @staticmethod
    def _check_holder(task: task_pb2.Task, attempt_id: str, agent_id: str | None) -> None:
        """A report on a finished task: an agent credential may only hear about its own attempts
        (what any other agent's task looks like is none of its business, finished or not)."""
        if agent_id is None:
            return
        attempt = next((old for old in task.attempts if old.attempt_id == attempt_id), None)
        if attempt is None or attempt.agent_id != agent_id:
            raise PermissionDenied(f"attempt {attempt_id} belongs to another agent")

    def _mark_running(self, entry: ActiveTask, attempt: task_pb2.Attempt) -> None:
        if attempt.status == task_pb2.ATTEMPT_STATUS_ASSIGNED:
            attempt.status = task_pb2.ATTEMPT_STATUS_RUNNING
            attempt.started_at.GetCurrentTime()
            entry.task.status = RUNNING
            entry.task.updated_at.GetCurrentTime()
            if entry.queue_timer is not None:
                entry.queue_timer.cancel()
                entry.queue_timer = None

    # -- operator actions ----------------------------------------------------------------------

    async def cancel(self, task_id: str, reason: str) -> task_pb2.Task:
        violations = Violations()
        violations.identifier("task_id", task_id)
        violations.text("reason", reason, 512)
        violations.raise_if_any()
        entry = self._active.get(task_id)
        if entry is None:
            task = await self.get(task_id)
            raise FailedPrecondition(
                f"task {task_id} already finished as {task_pb2.TaskStatus.Name(task.status)}"
            )
        now = now_timestamp()
        attempt = entry.current_attempt
        if attempt is not None:
            attempt.status = task_pb2.ATTEMPT_STATUS_CANCELLED
            attempt.finished_at.CopyFrom(now)
            self._tell_cancel(attempt.agent_id, task_id, attempt.attempt_id, reason or "cancelled")
        entry.task.error.CopyFrom(task_pb2.TaskError(message=reason or "cancelled", reason="CANCELLED"))
        self._finish(entry, CANCELLED, now)
        await self._commit(entry)
        return entry.task

    async def assign(self, task_id: str, agent_id: str) -> task_pb2.Task:
        violations = Violations()
        violations.identifier("task_id", task_id)
        violations.identifier("agent_id", agent_id)
        violations.raise_if_any()
        entry = self._active.get(task_id)
        if entry is None or entry.task.status != PENDING:
            task = entry.task if entry else await self.get(task_id)
            raise FailedPrecondition(
                f"task {task_id} is {task_pb2.TaskStatus.Name(task.status)}, not PENDING"
            )
        agent = self._registry.get(agent_id)
        # Unlike the scheduler, an operator may place work on an agent without a session (a REST
        # agent alive by unary heartbeats): it finds its work with ListTasks(agent_id, ASSIGNED).
        if agent.status != READY or agent.draining or self._free_capacity(agent) <= 0:
            raise FailedPrecondition(
                f"agent {agent_id} cannot take work now ({agent_pb2.AgentStatus.Name(agent.status)}"
                f"{', draining' if agent.draining else ''}"
                f"{', at capacity' if self._free_capacity(agent) <= 0 else ''})"
            )
        if entry.backoff_timer is not None:
            entry.backoff_timer.cancel()
            entry.backoff_timer = None
        self._place(entry, agent)
        return entry.task

    # -- placement -----------------------------------------------------------------------------

    def kick(self) -> None:
        """Runs one placement pass soon; many kicks in one loop iteration make one pass."""
        if not self._pass_scheduled:
            self._pass_scheduled = True
            asyncio.get_running_loop().call_soon(self._placement_pass)

    def _placement_pass(self) -> None:
        self._pass_scheduled = False
        # Most kicks (registrations, reconnects, freed capacity) find nothing waiting: stop before
        # looking at every agent.
        if len(self._active) == self._placed:
            return
        agents = [agent for agent in self._registry.agents() if self._placeable(agent)]
        fitting: dict[GroupKey, list[agent_pb2.Agent]] = {}
        for key, group in self._groups.items():
            if group.heap:
                fitting[key] = [agent for agent in agents if group.fits(agent)]
        while True:
            best: tuple[tuple[int, int, str], GroupKey] | None = None
            for key, candidates in fitting.items():
                heap = self._groups[key].heap
                self._drop_stale(heap)
                if not heap:
                    continue
                candidates[:] = [agent for agent in candidates if self._free_capacity(agent) > 0]
                if candidates and (best is None or heap[0] < best[0]):
                    best = (heap[0], key)
            if best is None:
                break
            _, _, task_id = heapq.heappop(self._groups[best[1]].heap)
            entry = self._active[task_id]
            self._place(entry, self._choose(entry, fitting[best[1]]))
        # Groups still waiting get an explanation (reused for a second, so this stays cheap).
        for key in fitting:
            if self._groups[key].heap:
                self._explain(self._groups[key])
            else:
                del self._groups[key]  # made again by the next task of its kind

    def _drop_stale(self, heap: list[tuple[int, int, str]]) -> None:
        """Heap entries are removed lazily: a task may have been cancelled or placed by hand."""
        while heap:
            entry = self._active.get(heap[0][2])
            if entry is not None and entry.task.status == PENDING and entry.backoff_timer is None:
                return
            heapq.heappop(heap)

    def _placeable(self, agent: agent_pb2.Agent) -> bool:
        return (
            agent.status == READY
            and not agent.draining
            and self._free_capacity(agent) > 0
            and self._registry.session_of(agent.agent_id) is not None
        )

    @staticmethod
    def _free_capacity(agent: agent_pb2.Agent) -> int:
        return agent.max_concurrent_tasks - agent.assigned_tasks

    def _choose(self, entry: ActiveTask, candidates: list[agent_pb2.Agent]) -> agent_pb2.Agent:
        # A retry prefers an agent that has not tried the task yet.
        tried = {attempt.agent_id for attempt in entry.task.attempts}
        fresh = [agent for agent in candidates if agent.agent_id not in tried] or candidates
        spec = entry.task.spec
        if spec.routing_key or self._strategy == discovery_pb2.LOAD_BALANCING_STRATEGY_CONSISTENT_HASH:
            return rendezvous_pick(spec.routing_key or entry.task.task_id, fresh)
        if self._strategy == discovery_pb2.LOAD_BALANCING_STRATEGY_RANDOM:
            return self._rng.choice(fresh)
        if self._strategy == discovery_pb2.LOAD_BALANCING_STRATEGY_ROUND_ROBIN:
            self._round_robin += 1
            return fresh[self._round_robin % len(fresh)]
        return min(fresh, key=load_score)

    def _place(self, entry: ActiveTask, agent: agent_pb2.Agent) -> None:
        task = entry.task
        now = now_timestamp()
        task.attempt_count += 1
        attempt = task_pb2.Attempt(
            attempt_id=new_id("att_"),
            number=task.attempt_count,
            agent_id=agent.agent_id,
            status=task_pb2.ATTEMPT_STATUS_ASSIGNED,
        )
        attempt.assigned_at.CopyFrom(now)
        task.attempts.append(attempt)
        if len(task.attempts) > MAX_KEPT_ATTEMPTS:
            del task.attempts[: len(task.attempts) - MAX_KEPT_ATTEMPTS]
        task.current_attempt_id = attempt.attempt_id
        task.status = ASSIGNED
        task.updated_at.CopyFrom(now)
        task.ClearField("progress")
        task.ClearField("pending_reason")
        entry.pushed_epoch = 0
        self._hold(agent.agent_id, task.task_id)
        self._arm_run_timer(entry, time.time())
        self._spawn(self._commit_and_push(entry, attempt.attempt_id))

    async def _commit_and_push(self, entry: ActiveTask, attempt_id: str) -> None:
        """Durable first, then pushed: a restart never forgets a placement an agent already runs."""
        await self._commit(entry)
        attempt = entry.current_attempt
        if attempt is None or attempt.attempt_id != attempt_id or entry.task.status != ASSIGNED:
            return  # cancelled or moved while committing
        self._push_assignment(entry, attempt)

    def _push_assignment(self, entry: ActiveTask, attempt: task_pb2.Attempt) -> None:
        session = self._registry.session_of(attempt.agent_id)
        if session is not None and entry.pushed_epoch != session.epoch:
            if entry.pushed_epoch == 0:
                DISPATCH_LATENCY.observe(asyncio.get_running_loop().time() - entry.placeable_since)
            entry.pushed_epoch = session.epoch
            assignment = registry_pb2.TaskAssignment(task=entry.task, attempt_id=attempt.attempt_id)
            session.push(registry_pb2.HeartbeatResponse(assignment=assignment))

    def _tell_cancel(self, agent_id: str, task_id: str, attempt_id: str, reason: str) -> None:
        session = self._registry.session_of(agent_id)
        if session is not None:
            cancellation = registry_pb2.TaskCancellation(
                task_id=task_id, attempt_id=attempt_id, reason=reason
            )
            session.push(registry_pb2.HeartbeatResponse(cancellation=cancellation))

    # -- attempt endings -----------------------------------------------------------------------

    def _end_attempt(
        self,
        entry: ActiveTask,
        error: task_pb2.TaskError,
        *,
        exhausted_status: int,
        now: timestamp_pb2.Timestamp,
    ) -> None:
        """After a failed or timed-out attempt: retry with backoff, or finish the task."""
        task = entry.task
        task.failure_count += 1
        if error.non_retryable or task.failure_count >= task.spec.max_attempts:
            task.error.CopyFrom(error)
            self._finish(entry, exhausted_status, now)
            return
        self._retry_later(entry, task.failure_count, now)

    def _retry_later(self, entry: ActiveTask, setbacks: int, now: timestamp_pb2.Timestamp) -> None:
        """Back to the queue after the backoff for the `setbacks`-th failure (or refusal) in a row."""
        task = entry.task
        self._release(entry)
        task.status = PENDING
        task.current_attempt_id = ""
        task.updated_at.CopyFrom(now)
        task.not_before.CopyFrom(stamp_at(time.time() + self._backoff(setbacks)))
        self._enqueue(entry, time.time())

    def _backoff(self, failures: int) -> float:
        """Exponential and capped, with "equal jitter": a random point in the upper half, so retries
        never bunch up in lockstep and never come back at once."""
        ceiling = min(self._config.retry_backoff_max, self._config.retry_backoff_base * 2.0 ** (failures - 1))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def _lose_attempt(self, entry: ActiveTask, reason: str, status: int) -> None:
        """The attempt's agent went away or refused it: the task goes back to the queue at once."""
        attempt = entry.current_attempt
        if attempt is not None:
            attempt.status = status  # type: ignore[assignment]
            attempt.finished_at.GetCurrentTime()
            attempt.error.CopyFrom(task_pb2.TaskError(message=reason, reason="LOST"))
        self._release(entry)
        entry.task.status = PENDING
        entry.task.current_attempt_id = ""
        entry.task.updated_at.GetCurrentTime()
        entry.task.ClearField("not_before")
        self._enqueue(entry, time.time())

    def _finish(self, entry: ActiveTask, status: int, now: timestamp_pb2.Timestamp) -> None:
        task = entry.task
        self._release(entry)
        entry.cancel_timers()
        task.status = status  # type: ignore[assignment]
        task.current_attempt_id = ""
        task.updated_at.CopyFrom(now)
        task.finished_at.CopyFrom(now)
        task.ClearField("pending_reason")
        TASKS_FINISHED.labels(task_pb2.TaskStatus.Name(status).removeprefix("TASK_STATUS_").lower()).inc()  # type: ignore[arg-type]
        del self._active[task.task_id]
        if entry.key is not None:
            self._keys.finished(entry.key)
        # The finished record stays retrievable from the store; keys there still deduplicate.

    def _release(self, entry: ActiveTask) -> None:
        """Frees the capacity the current attempt held on its agent."""
        if entry.run_timer is not None:
            entry.run_timer.cancel()
            entry.run_timer = None
        attempt = entry.current_attempt
        if attempt is None:
            return
        held = self._held.get(attempt.agent_id)
        if held is not None and entry.task.task_id in held:
            held.discard(entry.task.task_id)
            self._placed -= 1
            agent = self._registry.find(attempt.agent_id)
            if agent is not None:
                agent.assigned_tasks = len(held)
            self.kick()

    def _hold(self, agent_id: str, task_id: str) -> None:
        held = self._held.setdefault(agent_id, set())
        if task_id not in held:
            held.add(task_id)
            self._placed += 1
        agent = self._registry.find(agent_id)
        if agent is not None:
            agent.assigned_tasks = len(held)

    # -- timers --------------------------------------------------------------------------------

    def _arm_queue_timer(self, entry: ActiveTask) -> None:
        spec = entry.task.spec
        if not spec.HasField("queue_timeout") or spec.queue_timeout.ToNanoseconds() == 0:
            return
        deadline = wall_seconds(entry.task.created_at) + spec.queue_timeout.ToNanoseconds() / 1e9
        entry.queue_timer = self._call_at_wall(deadline, self._queue_timed_out, entry.task.task_id)

    def _arm_run_timer(self, entry: ActiveTask, now: float) -> None:
        spec = entry.task.spec
        attempt = entry.current_attempt
        if attempt is None or not spec.HasField("run_timeout") or spec.run_timeout.ToNanoseconds() == 0:
            return
        deadline = wall_seconds(attempt.assigned_at) + spec.run_timeout.ToNanoseconds() / 1e9
        entry.run_timer = self._call_at_wall(
            deadline, self._run_timed_out, entry.task.task_id, attempt.attempt_id
        )

    def _call_at_wall(self, deadline: float, callback: object, *args: str) -> asyncio.TimerHandle:
        loop = asyncio.get_running_loop()
        return loop.call_later(max(0.0, deadline - time.time()), callback, *args)  # type: ignore[arg-type]

    def _queue_timed_out(self, task_id: str) -> None:
        entry = self._active.get(task_id)
        if entry is None or entry.task.status not in (PENDING, ASSIGNED):
            return
        entry.queue_timer = None
        now = now_timestamp()
        attempt = entry.current_attempt
        if attempt is not None:
            attempt.status = task_pb2.ATTEMPT_STATUS_CANCELLED
            attempt.finished_at.CopyFrom(now)
            self._tell_cancel(attempt.agent_id, task_id, attempt.attempt_id, "queue timeout")
        message = "waited longer than its queue timeout"
        if entry.task.status == PENDING:  # say what it waited for
            message += f"; {self._explained(entry).pending_reason.message}"
        entry.task.error.CopyFrom(task_pb2.TaskError(message=message[:4096], reason="QUEUE_TIMEOUT"))
        self._finish(entry, TIMED_OUT, now)
        self._spawn(self._commit(entry))

    def _run_timed_out(self, task_id: str, attempt_id: str) -> None:
        entry = self._active.get(task_id)
        attempt = entry.current_attempt if entry else None
        if entry is None or attempt is None or attempt.attempt_id != attempt_id:
            return
        entry.run_timer = None
        now = now_timestamp()
        error = task_pb2.TaskError(message="attempt exceeded its run timeout", reason="RUN_TIMEOUT")
        attempt.status = task_pb2.ATTEMPT_STATUS_TIMED_OUT
        attempt.finished_at.CopyFrom(now)
        attempt.error.CopyFrom(error)
        self._tell_cancel(attempt.agent_id, task_id, attempt_id, "run timeout")
        self._end_attempt(entry, error, exhausted_status=TIMED_OUT, now=now)
        self._spawn(self._commit(entry))

    def _backoff_elapsed(self, task_id: str) -> None:
        entry = self._active.get(task_id)
        if entry is None:
            return
        entry.backoff_timer = None
        if entry.task.status == PENDING:
            self._push_heap(entry)
            self.kick()

    # -- queue ---------------------------------------------------------------------------------

    def _track(self, task: task_pb2.Task, key: ScopedKey | None = None) -> ActiveTask:
        """Starts keeping `task` in memory; `key` is its scoped idempotency key when just created
        (a restored task's key is found through the store)."""
        self._sequence += 1
        entry = ActiveTask(task, self._sequence, parse_selector(task.spec.label_selector), key)
        self._active[task.task_id] = entry
        return entry

    def _group_for(self, entry: ActiveTask) -> Group:
        key = entry.group
        group = self._groups.get(key)
        if group is None:
            group = Group(key[0], key[1], entry.selector, key[3])
            self._groups[key] = group
        return group

    def _enqueue(self, entry: ActiveTask, now: float) -> None:
        delay = wall_seconds(entry.task.not_before) - now if entry.task.HasField("not_before") else 0.0
        if delay > 0:
            entry.backoff_timer = self._call_at_wall(now + delay, self._backoff_elapsed, entry.task.task_id)
            return
        self._push_heap(entry)
        self.kick()

    def _push_heap(self, entry: ActiveTask) -> None:
        entry.placeable_since = asyncio.get_running_loop().time()
        heapq.heappush(
            self._group_for(entry).heap, (-entry.task.spec.priority, entry.sequence, entry.task.task_id)
        )

    # -- failover (AgentObserver) --------------------------------------------------------------

    def agent_available(self, agent_id: str) -> None:
        timer = self._failover_timers.pop(agent_id, None)
        if timer is not None:
            timer.cancel()
        self._deferred_failovers.discard(agent_id)
        self.kick()

    def agent_reattached(self, agent_id: str, running_attempt_ids: Sequence[str]) -> list[str]:
        """The agent is back: it keeps what it still runs; assignments it never got are pushed again;
        attempts it forgot (it restarted) go back to the queue."""
        running = set(running_attempt_ids)
        kept: list[str] = []
        for task_id in list(self._held.get(agent_id, ())):
            entry = self._active[task_id]
            attempt = entry.current_attempt
            if attempt is None:
                continue
            if attempt.attempt_id in running:
                kept.append(attempt.attempt_id)
            elif attempt.status == task_pb2.ATTEMPT_STATUS_ASSIGNED:
                self._push_assignment(entry, attempt)
            else:
                self._lose_attempt(entry, "agent reconnected without it", task_pb2.ATTEMPT_STATUS_LOST)
                self._spawn(self._commit(entry))
        return kept

    def agent_lost(self, agent_id: str, *, graceful: bool) -> None:
        if not self._held.get(agent_id):
            return
        if graceful or self._config.failover_grace == 0:
            if not graceful and self._note_drop():
                self._deferred_failovers.add(agent_id)
                return
            self._fail_over(agent_id, "agent left" if graceful else "agent down")
            return
        self._note_drop()
        previous = self._failover_timers.pop(agent_id, None)
        if previous is not None:
            previous.cancel()
        self._failover_timers[agent_id] = asyncio.get_running_loop().call_later(
            self._config.failover_grace, self._grace_expired, agent_id
        )

    def _grace_expired(self, agent_id: str) -> None:
        self._failover_timers.pop(agent_id, None)
        agent = self._registry.find(agent_id)
        if (
            agent is not None
            and agent.status != agent_pb2.AGENT_STATUS_DOWN
            and agent.status != agent_pb2.AGENT_STATUS_DEREGISTERED
        ):
            return  # came back in time
        if self._failover_paused():
            self._deferred_failovers.add(agent_id)
            return
        self._fail_over(
            agent_id, f"agent down longer than the failover grace ({self._config.failover_grace:g} s)"
        )

    def _fail_over(self, agent_id: str, reason: str) -> None:
        moved = 0
        for task_id in list(self._held.get(agent_id, ())):
            entry = self._active.get(task_id)
            if entry is None:
                continue
            self._lose_attempt(entry, reason, task_pb2.ATTEMPT_STATUS_LOST)
            self._spawn(self._commit(entry))
            moved += 1
        if moved:
            FAILOVERS.inc(moved)
            log.info("failover: moved %d tasks off agent %s (%s)", moved, agent_id, reason)

    def _note_drop(self) -> bool:
        """Records an unplanned drop; True when failover is (now) paused because too many agents
        dropped together — a sign of our own network failing, not of theirs."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        window = self._config.mass_failure_window
        self._recent_drops = [at for at in self._recent_drops if now - at <= window]
        self._recent_drops.append(now)
        alive = sum(
            1
            for agent in self._registry.agents()
            if agent.status in (READY, agent_pb2.AGENT_STATUS_DEGRADED, agent_pb2.AGENT_STATUS_DRAINING)
        )
        dropped = len(self._recent_drops)
        if (
            dropped >= self._config.mass_failure_min_agents
            and dropped >= self._config.mass_failure_threshold * (alive + dropped)
        ):
            if not self._failover_paused():
                log.warning(
                    "failover paused: %d agents dropped within %.1f s (%d still alive)",
                    dropped,
                    window,
                    alive,
                )
                FAILOVER_PAUSES.inc()
            self._paused_until = now + window
            loop.call_at(self._paused_until, self._maybe_resume)
        return self._failover_paused()

    def _failover_paused(self) -> bool:
        return asyncio.get_running_loop().time() < self._paused_until

    def _maybe_resume(self) -> None:
        if self._failover_paused():
            return  # another drop extended the pause; its own timer will come
        deferred, self._deferred_failovers = self._deferred_failovers, set()
        if deferred:
            log.warning("failover resumed: moving work of %d agents still down", len(deferred))
        for agent_id in deferred:
            agent = self._registry.find(agent_id)
            if agent is None or agent.status in (
                agent_pb2.AGENT_STATUS_DOWN,
                agent_pb2.AGENT_STATUS_DEREGISTERED,
            ):
                self._fail_over(agent_id, "agent down (failover resumed after a mass drop)")

    # -- persistence ---------------------------------------------------------------------------

    async def _commit(self, entry: ActiveTask, event_type: int = event_pb2.EVENT_TYPE_TASK_UPDATED) -> None:
        event = event_pb2.Event(type=event_type)  # type: ignore[arg-type]
        event.task.CopyFrom(entry.task)
        scopes = {entry.task.task_id: entry.key[0]} if entry.key is not None else {}
        entry.task.revision = await self._store.commit(Change(events=[event], idempotency_scopes=scopes))

    def _spawn(self, work: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task commit failed: %s", task.exception())

    def shutdown(self) -> None:
        for entry in self._active.values():
            entry.cancel_timers()
        for timer in self._failover_timers.values():
            timer.cancel()
        self._failover_timers.clear()
