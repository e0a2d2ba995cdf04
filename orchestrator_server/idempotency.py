"""Idempotency keys of task creation: scoped per principal, refused when reused for another spec.

A key is `(scope, key)`: the scope names the principal that created the task (its API key or agent;
"" when authentication is off), so two callers can never see each other's tasks through a shared
key. As payment APIs do, a key reused with a different spec is an error (ALREADY_EXISTS), not a
silent return of the first task: the caller's retry logic has a bug, and hiding it loses work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from orchestrator.v1 import task_pb2
from orchestrator_server.errors import AlreadyExists
from orchestrator_server.store import Store

ScopedKey = tuple[str, str]


class IdempotencyKeys:
    """Unfinished tasks' ids by key (a cache; the store answers for the rest) and creations in flight."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._live: dict[ScopedKey, str] = {}
        self._creating: dict[ScopedKey, asyncio.Future[task_pb2.Task]] = {}

    async def existing(
        self, key: ScopedKey, live: Callable[[str], task_pb2.Task | None]
    ) -> task_pb2.Task | None:
        """The task created under `key`, waiting for a creation in flight; None if there is none.
        `live` maps a stored task to its in-memory copy, which may be a commit ahead."""
        found = await self._in_memory(key, live)
        if found is not None:
            return found
        stored = await self._store.find_task_by_idempotency_key(key[1], scope=key[0])
        if stored is not None:
            return live(stored.task_id) or stored
        # Re-check: another create of the same key may have started while we read the store.
        return await self._in_memory(key, live)

    async def _in_memory(
        self, key: ScopedKey, live: Callable[[str], task_pb2.Task | None]
    ) -> task_pb2.Task | None:
        task_id = self._live.get(key)
        if task_id is not None and (task := live(task_id)) is not None:
            return task
        if key in self._creating:
            return await asyncio.shield(self._creating[key])
        return None

    def begin(self, key: ScopedKey) -> None:
        """Nobody else may create this key while we do: later callers wait for our result."""
        self._creating[key] = asyncio.get_running_loop().create_future()

    def created(self, key: ScopedKey, task: task_pb2.Task) -> None:
        self._live[key] = task.task_id
        self._creating.pop(key).set_result(task)

    def failed(self, key: ScopedKey, error: BaseException) -> None:
        future = self._creating.pop(key)
        future.set_exception(error)
        future.exception()  # retrieved: nobody may be waiting, and that is fine

    def finished(self, key: ScopedKey) -> None:
        """The task finished: the store answers for its key from now on."""
        self._live.pop(key, None)


def check_same_spec(existing: task_pb2.Task, spec: task_pb2.TaskSpec) -> None:
    """ALREADY_EXISTS unless `spec` asks for what `existing` was created with."""
    asked = task_pb2.TaskSpec()
    asked.CopyFrom(spec)
    if not asked.max_attempts:  # "the server default", whatever it was then
        asked.max_attempts = existing.spec.max_attempts
    if asked != existing.spec:
        raise AlreadyExists(
            f"idempotency key {spec.idempotency_key!r} was already used for task {existing.task_id} "
            "with a different spec; use a new key for a different task"
        )
