"""Tasks: the commands callers make (create, reports, cancel, assign) over the projection of their
committed state; the commands nobody calls (placements, timeouts, failover) are in reactions.py,
and how any command commits in write_path.py.

Writes go one way. A command (create, a report, a cancel, a placement, a timeout, a failover)
copies the committed task, applies a transition to the copy (transitions.py) and commits it on
the condition that the task is still at the revision it read (and, for a placement, that the agent
still has that session and a free slot). Only the committed event changes what this process
holds: `apply` receives every committed task event, from this process or another, in revision
order, and `projection.py` derives from it the holds on agents' capacity, the queue, the timers
and what to push down an agent's session. Commands on one task run one at a time here, so this
process never conflicts with itself; a conflict means another process changed the task first,
and the command decides again on the newer state.
"""

from __future__ import annotations

import asyncio
import logging
import random

from google.protobuf import struct_pb2

from orchestrator.v1 import agent_pb2, event_pb2, registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.agents import READY, Registry, new_id
from orchestrator_server.config import Config
from orchestrator_server.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from orchestrator_server.health import WorkloadSummary
from orchestrator_server.idempotency import ScopedKey, check_same_spec
from orchestrator_server.selectors import parse_selector
from orchestrator_server.store import Change, ConditionFailed, PlacementClaim, Store, TaskQuery
from orchestrator_server.tasks import transitions
from orchestrator_server.tasks.commands import Decide
from orchestrator_server.tasks.model import PENDING, SUCCEEDED, ActiveTask, TaskNotActive
from orchestrator_server.tasks.reactions import TaskReactions
from orchestrator_server.tasks.validation import (
    check_completion,
    check_failure,
    check_progress,
    check_spec,
    report_violations,
)
from orchestrator_server.validation import Violations, decode_position_token, encode_page_token

log = logging.getLogger(__name__)

CREATED = event_pb2.EVENT_TYPE_TASK_CREATED


class TaskScheduler(TaskReactions):
    """Every unfinished task, and where it runs. Implements the registry's AgentObserver
    (reactions.py); commits through write_path.py."""

    def __init__(
        self, config: Config, registry: Registry, store: Store, rng: random.Random | None = None
    ) -> None:
        super().__init__(config, registry, store, rng)
        self._attachable = asyncio.Event()
        self._served = asyncio.Event()
        self.restore_error: BaseException | None = None

    # -- startup -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Restores the snapshot `load`ed while the process already serves: the tasks agents hold,
        then work moves off agents that were down at the restart (`recover`) and sessions are
        welcomed; then the pending tasks, then task calls are served. Sessions and task calls wait
        until then (within their deadlines); if this fails, they are refused UNAVAILABLE."""
        try:
            await self.restore_held()
            await self.recover()
            self._attachable.set()
            await self.restore_pending()
        except BaseException as error:  # cancelled too (stopped meanwhile): nothing is served then
            self.restore_error = error
            raise
        finally:
            self._attachable.set()
            self._served.set()

    @property
    def served(self) -> bool:
        return self._served.is_set() and self.restore_error is None

    async def until_served(self) -> None:
        await self._until(self._served)

    async def until_attachable(self) -> None:
        """Until a session's welcome can say which attempts its agent keeps."""
        await self._until(self._attachable)

    async def _until(self, restored: asyncio.Event) -> None:
        if not restored.is_set():
            await restored.wait()
        if self.restore_error is not None:
            raise Unavailable(f"the orchestrator could not restore its tasks: {self.restore_error!r}")

    # -- queries -------------------------------------------------------------------------------

    async def get(self, task_id: str) -> task_pb2.Task:
        await self.until_served()
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
        await self.until_served()
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
        # The in-memory copy of an unfinished task carries its fresh pending reason.
        fresh = [
            self._explained(self._active[task.task_id]) if task.task_id in self._active else task
            for task in tasks
        ]
        return fresh, encode_page_token(str(next_position)) if next_position is not None else ""

    def workload(self) -> WorkloadSummary:
        # Unfinished tasks are either placed (held by an agent) or pending.
        paused = self._failover.paused
        return WorkloadSummary(
            pending_tasks=len(self._active) - self._placed,
            running_tasks=self._placed,
            failover_paused=paused,
            failover_paused_reason=self._failover.paused_reason() if paused else "",
            restoring=not self._served.is_set(),
        )

    # -- creation ------------------------------------------------------------------------------

    async def create(self, spec: task_pb2.TaskSpec, scope: str = "") -> tuple[task_pb2.Task, bool]:
        """Creates a task; `scope` names the caller, to which an idempotency key belongs."""
        await self.until_served()
        check_spec(spec)
        key = (scope, spec.idempotency_key) if spec.idempotency_key else None
        if key is not None:
            existing = await self._keys.existing(key, self._live_task)
            if existing is not None:
                check_same_spec(existing, spec)
                return existing, False
            self._keys.begin(key)
        try:
            task = self._new_task(spec)
            self._created_keys[task.task_id] = key
            try:
                task = await self._commit_created(task, key)
            finally:
                self._created_keys.pop(task.task_id, None)
        except BaseException as error:
            if key is not None:
                self._keys.failed(key, error)
            raise
        if key is not None:
            self._keys.created(key, task)
        return self._live_task(task.task_id) or task, True

    def _new_task(self, spec: task_pb2.TaskSpec) -> task_pb2.Task:
        task = task_pb2.Task(task_id=new_id("tsk_"), status=PENDING)
        task.spec.CopyFrom(spec)
        if not task.spec.max_attempts:
            task.spec.max_attempts = self._config.default_max_attempts
        now = transitions.now_timestamp()
        task.created_at.CopyFrom(now)
        task.updated_at.CopyFrom(now)
        return task

    async def _commit_created(self, task: task_pb2.Task, key: ScopedKey | None) -> task_pb2.Task:
        """Commits a new task, placed in the same commit when an agent is free now (one commit,
        and one wait for the disk, less before the agent has it); if that agent's session or last
        slot changed meanwhile, the task is committed to wait in the queue like any other."""
        agent = self._placer.pick_at_once(ActiveTask(task, 0, parse_selector(task.spec.label_selector)))
        if agent is not None:
            placed = transitions.draft_of(task)
            transitions.place(placed, agent.agent_id, new_id("att_"))
            claim = PlacementClaim(task.task_id, agent.agent_id, agent.session.epoch)
            try:
                await self._commit(placed, CREATED, expect_revision=0, claims=[claim], key=key)
                return placed
            except ConditionFailed as refusal:
                if refusal.entity_id == task.task_id:
                    raise
                log.debug("placement of new task %s on %s refused: %s", task.task_id, agent.agent_id, refusal)
            finally:
                self._placer.unreserve(agent.agent_id)
        await self._commit(task, CREATED, expect_revision=0, key=key)
        return task

    def _live_task(self, task_id: str) -> task_pb2.Task | None:
        entry = self._active.get(task_id)
        return entry.task if entry is not None else None

    # -- agent reports -------------------------------------------------------------------------

    async def complete(
        self, task_id: str, attempt_id: str, result: struct_pb2.Struct, agent_id: str | None = None
    ) -> task_pb2.Task:
        await self.until_served()
        check_completion(task_id, attempt_id, result)

        def decide(entry: ActiveTask, draft: task_pb2.Task) -> list[PlacementClaim]:
            transitions.complete(draft, transitions.holder_attempt(draft, attempt_id, agent_id), result)
            return []

        try:
            return await self._report(task_id, decide)
        except TaskNotActive:
            task = await self._finished_for_report(task_id, attempt_id, agent_id)
            if task.status == SUCCEEDED and task.attempts and task.attempts[-1].attempt_id == attempt_id:
                return task  # a retried report of the completion that already landed
            raise self._not_running(task) from None

    async def fail(
        self, task_id: str, attempt_id: str, error: task_pb2.TaskError, agent_id: str | None = None
    ) -> task_pb2.Task:
        await self.until_served()
        check_failure(task_id, attempt_id, error)

        def decide(entry: ActiveTask, draft: task_pb2.Task) -> list[PlacementClaim]:
            attempt = transitions.holder_attempt(draft, attempt_id, agent_id)
            transitions.fail(draft, attempt, error, self._backoff)
            return []

        try:
            return await self._report(task_id, decide)
        except TaskNotActive:
            raise self._not_running(await self._finished_for_report(task_id, attempt_id, agent_id)) from None

    async def _finished_for_report(
        self, task_id: str, attempt_id: str, agent_id: str | None
    ) -> task_pb2.Task:
        """The finished task an agent reports on, if the attempt was its own (PERMISSION_DENIED
        otherwise: another agent's task is none of its business, finished or not)."""
        task = await self.get(task_id)
        transitions.check_holder_of_finished(task, attempt_id, agent_id)
        return task

    @staticmethod
    def _not_running(task: task_pb2.Task) -> FailedPrecondition:
        return FailedPrecondition(
            f"task {task.task_id} is {task_pb2.TaskStatus.Name(task.status)}, not running"
        )

    async def progress(
        self, task_id: str, attempt_id: str, progress: task_pb2.TaskProgress, agent_id: str | None = None
    ) -> task_pb2.Task:
        await self.until_served()
        check_progress(task_id, attempt_id, progress)
        return await self._running_command(task_id, self._progress_decision(attempt_id, progress, agent_id))

    @staticmethod
    def _progress_decision(attempt_id: str, progress: task_pb2.TaskProgress, agent_id: str | None) -> Decide:
        def decide(entry: ActiveTask, draft: task_pb2.Task) -> list[PlacementClaim]:
            transitions.report_progress(
                draft, transitions.holder_attempt(draft, attempt_id, agent_id), progress
            )
            return []

        return decide

    def session_update(self, agent_id: str, update: registry_pb2.SessionTaskUpdate) -> None:
        """A task report over the agent's session (STARTED, PROGRESS, REJECTED).

        Checked at once and committed in the background: a session message has no reply to hold
        back, and the session's reader must not wait for the disk before it reads the next beat."""
        attempt_id = update.attempt_id
        decide: Decide
        if update.kind == registry_pb2.TASK_UPDATE_KIND_PROGRESS:
            check_progress(update.task_id, attempt_id, update.progress)
            decide = self._progress_decision(attempt_id, update.progress, agent_id)
        elif update.kind == registry_pb2.TASK_UPDATE_KIND_STARTED:
            report_violations(update.task_id, attempt_id).raise_if_any()

            def decide(entry: ActiveTask, draft: task_pb2.Task) -> list[PlacementClaim] | None:
                attempt = transitions.holder_attempt(draft, attempt_id, agent_id)
                return [] if transitions.mark_running(draft, attempt) else None

        elif update.kind == registry_pb2.TASK_UPDATE_KIND_REJECTED:
            report_violations(update.task_id, attempt_id).raise_if_any()

            def decide(entry: ActiveTask, draft: task_pb2.Task) -> list[PlacementClaim] | None:
                attempt = transitions.holder_attempt(draft, attempt_id, agent_id)
                transitions.reject(draft, attempt, update.reason, self._backoff)
                return []

        else:
            raise InvalidArgument.field("task_update.kind", "is required")
        if update.task_id not in self._active:
            raise FailedPrecondition(f"task {update.task_id} is not running")
        # STARTED is lazy: a short task's completion, coming right after it, shares its commit.
        lazy = update.kind == registry_pb2.TASK_UPDATE_KIND_STARTED
        self._spawn(self._running_command(update.task_id, decide, lazy=lazy))

    async def _report(self, task_id: str, decide: Decide, *, lazy: bool = False) -> task_pb2.Task:
        """An agent's report on its attempt. A task or attempt this replica has not seen may have
        been created or placed by another replica a moment ago: the report is decided once more
        after an empty commit, which delivers every event committed before it."""
        try:
            return await self._command(task_id, decide, lazy=lazy)
        except (transitions.UnknownAttempt, TaskNotActive):
            await self._store.commit(Change())
            return await self._command(task_id, decide, lazy=lazy)

    async def _running_command(self, task_id: str, decide: Decide, *, lazy: bool = False) -> task_pb2.Task:
        try:
            return await self._report(task_id, decide, lazy=lazy)
        except TaskNotActive:
            raise FailedPrecondition(f"task {task_id} is not running") from None

    # -- operator actions ----------------------------------------------------------------------

    async def cancel(self, task_id: str, reason: str) -> task_pb2.Task:
        await self.until_served()
        violations = Violations()
        violations.identifier("task_id", task_id)
        violations.text("reason", reason, 512)
        violations.raise_if_any()

        def decide(entry: ActiveTask, draft: task_pb2.Task) -> list[PlacementClaim]:
            transitions.cancel(draft, reason or "cancelled", "CANCELLED")
            return []

        try:
            return await self._command(task_id, decide)
        except TaskNotActive:
            task = await self.get(task_id)
            raise FailedPrecondition(
                f"task {task_id} already finished as {task_pb2.TaskStatus.Name(task.status)}"
            ) from None

    async def assign(self, task_id: str, agent_id: str) -> task_pb2.Task:
        await self.until_served()
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

        def refusal() -> FailedPrecondition:
            full = self._placer.free_capacity(agent) <= 0
            return FailedPrecondition(
                f"agent {agent_id} cannot take work now ({agent_pb2.AgentStatus.Name(agent.status)}"
                f"{', draining' if agent.draining else ''}{', at capacity' if full else ''})"
            )

        # Unlike the scheduler, an operator may place work on an agent without a session (a REST
        # agent alive by unary heartbeats): it finds its work with ListTasks(agent_id, ASSIGNED).
        if agent.status != READY or agent.draining or self._placer.free_capacity(agent) <= 0:
            raise refusal()

        def decide(current: ActiveTask, draft: task_pb2.Task) -> list[PlacementClaim]:
            if draft.status != PENDING:
                raise FailedPrecondition(
                    f"task {task_id} is {task_pb2.TaskStatus.Name(draft.status)}, not PENDING"
                )
            transitions.place(draft, agent_id, new_id("att_"))
            return [PlacementClaim(task_id, agent_id)]

        try:
            return await self._command(task_id, decide)
        except ConditionFailed:
            raise refusal() from None
