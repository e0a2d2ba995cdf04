"""The store: the state of record behind one interface.

Everything acknowledged is committed here before the reply. Every change is an `Event` carrying the
entity after the change; the store upserts the entity and appends the event to a revisioned log in
one transaction, so the log is the source of every watch and survives restarts. In-memory
structures elsewhere are caches rebuilt from `load()`.

The only ordering promise is the one a shared SQL backend can keep too: events are delivered to
`on_commit` in revision order, none skipped.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from orchestrator.v1 import agent_pb2, event_pb2, task_pb2

CommitListener = Callable[[Sequence[event_pb2.Event]], None]


@dataclass
class LoadedState:
    """What a process needs in memory after start: every agent and every unfinished task."""

    agents: list[agent_pb2.Agent]
    agent_token_hashes: dict[str, str]
    active_tasks: list[task_pb2.Task]
    revision: int
    oldest_revision: int


@dataclass
class TaskQuery:
    """Filters and page position for listing tasks (newest first)."""

    status: int = 0
    type: str = ""
    agent_id: str = ""
    page_size: int = 100
    # Continue strictly after this (created sequence) position.
    after_sequence: int | None = None


@dataclass(frozen=True)
class Expect:
    """The entity (an agent id or a task id) still has `revision`: the revision of the event that
    last wrote it, as the command read it. 0 means it must not exist yet."""

    entity_id: str
    revision: int


@dataclass
class Change:
    """One atomic change: events to append (each carries its entity), the conditions under which
    they may be, plus credential updates."""

    events: list[event_pb2.Event] = field(default_factory=list)
    expect: list[Expect] = field(default_factory=list)
    agent_token_hashes: dict[str, str] = field(default_factory=dict)
    #: Task id -> the scope of its idempotency key (the creating principal), stored with a new task.
    idempotency_scopes: dict[str, str] = field(default_factory=dict)


class ConditionFailed(Exception):
    """A condition of a change no longer held; nothing was written.

    Not an `OrchestratorError`: the domain answers it (usually by re-reading its projection, which
    is already as new as the conflicting commit, and deciding again)."""

    def __init__(self, entity_id: str, reason: str, *, expected: int = 0, actual: int = 0) -> None:
        super().__init__(f"{entity_id}: {reason}")
        self.entity_id = entity_id
        self.reason = reason
        self.expected = expected
        self.actual = actual


class Store(abc.ABC):
    """Durable state of record. Implementations must not block the event loop."""

    @abc.abstractmethod
    async def open(self, on_commit: CommitListener) -> LoadedState:
        """Opens (and migrates) the store and loads the in-memory state."""

    @abc.abstractmethod
    async def commit(self, change: Change) -> int:
        """Durably applies `change`; returns the revision of its last event (stamped into the events)."""

    @abc.abstractmethod
    async def events_after(self, revision: int, limit: int) -> list[event_pb2.Event]:
        """Events with revision > `revision`, oldest first, at most `limit`."""

    @abc.abstractmethod
    async def oldest_revision(self) -> int:
        """Oldest revision still in the log (the log is compacted), or last revision + 1 if empty."""

    @abc.abstractmethod
    async def get_task(self, task_id: str) -> task_pb2.Task | None:
        """One task, finished or not."""

    @abc.abstractmethod
    async def find_task_by_idempotency_key(self, key: str, scope: str = "") -> task_pb2.Task | None:
        """The task created with this idempotency key in this scope (principal), if any."""

    @abc.abstractmethod
    async def list_tasks(self, query: TaskQuery) -> tuple[list[task_pb2.Task], int | None]:
        """A page of tasks (newest first) and the position to continue after, or None at the end."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raises if the store cannot answer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flushes pending writes and closes."""


def open_store(path: str, *, synchronous: str = "FULL", event_retention: int = 100_000) -> Store:
    """The store for a database location (SQLite file path or ':memory:')."""
    from orchestrator_server.store.sqlite import SqliteStore

    return SqliteStore(path, synchronous=synchronous, event_retention=event_retention)
