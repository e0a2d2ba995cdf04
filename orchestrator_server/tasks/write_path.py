"""The write path of the task commands. A command decides on a draft of the committed task and
commits it on the condition that the task is still at the revision it read (and, for a placement,
that the agent still has that session and a free slot). Only the committed event, delivered to
`apply` (projection.py), changes what this process holds.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from orchestrator.v1 import event_pb2, task_pb2
from orchestrator_server.agents import Registry
from orchestrator_server.config import Config
from orchestrator_server.idempotency import IdempotencyKeys, ScopedKey
from orchestrator_server.store import Change, Expect, PlacementClaim, Store
from orchestrator_server.tasks.changes import event_for
from orchestrator_server.tasks.commands import Decide, TaskCommands
from orchestrator_server.tasks.model import ActiveTask
from orchestrator_server.tasks.projection import TaskProjection


class TaskWritePath(TaskProjection):
    """The projection, and how a command on a task is decided and committed."""

    def __init__(
        self, config: Config, registry: Registry, store: Store, rng: random.Random | None = None
    ) -> None:
        self._rng = rng or random.Random()
        super().__init__(config, registry, self._rng)
        self._store = store
        self._keys = IdempotencyKeys(store)
        self._commands = TaskCommands(self._active, self._commit_draft, self._spawn)

    # -- committing ------------------------------------------------------------------------

    async def _command(self, task_id: str, decide: Decide, *, lazy: bool = False) -> task_pb2.Task:
        """Decides on a draft of the committed task and commits it if anything changed (folded with
        the commands waiting for the same task); returns the task as committed. Raises
        TaskNotActive if the task is not unfinished here, and ConditionFailed when a placement
        claim (not the task) was refused."""
        if task_id in self._unrestored:
            await self._restored.wait()  # not restored yet: its held-back events are not applied
        return await self._commands.run(task_id, decide, lazy=lazy)

    async def _commit_draft(self, draft: task_pb2.Task, revision: int, claims: list[PlacementClaim]) -> None:
        await self._commit(draft, expect_revision=revision, claims=claims)

    async def _commit(
        self,
        task: task_pb2.Task,
        event_type: int = event_pb2.EVENT_TYPE_TASK_UPDATED,
        *,
        expect_revision: int,
        claims: Iterable[PlacementClaim] = (),
        key: ScopedKey | None = None,
    ) -> None:
        change = Change(
            events=[event_for(task, event_type)],
            task_records=[task],
            expect=[Expect(task.task_id, expect_revision)],
            claims=list(claims),
        )
        if key is not None:
            change.idempotency_scopes[task.task_id] = key[0]
        self._committing[task.task_id] = task
        try:
            await self._store.commit(change)
        finally:
            if self._committing.get(task.task_id) is task:
                del self._committing[task.task_id]

    def _on_finished(self, entry: ActiveTask) -> None:
        if entry.key is not None:
            self._keys.finished(entry.key)

    def _backoff(self, failures: int) -> float:
        """Exponential and capped, with "equal jitter": a random point in the upper half, so retries
        never bunch up in lockstep and never come back at once."""
        ceiling = min(self._config.retry_backoff_max, self._config.retry_backoff_base * 2.0 ** (failures - 1))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)
