"""The store: the state of record behind one interface.

Writes go one way: a domain command builds a `Change` (events, each carrying the entity after the
change) with its preconditions; the store commits it atomically or raises `ConditionFailed`
naming the condition that no longer holds, and nothing is written. Only committed events reach
the in-memory projections (`on_commit`), whether this process or another one wrote them.

What the store owns, so that any number of processes may share it:
- **Revisions** are assigned by the store in commit order; events are delivered to `on_commit` in
  revision order, none skipped, including events other processes committed.
- **Before a commit (or its failure) is answered, every event up to it has been delivered** to
  `on_commit`: a caller that resumes after `await commit(...)` (or after `ConditionFailed`) reads
  projections at least as new as its own commit, so it can retry a failed command at once.
- **Uniqueness** (an agent's name + instance, an idempotency key within its scope) is a constraint;
  a collision raises `errors.AlreadyExists`, never a driver error.
- **Conditions**: `Expect` (an entity still has the revision the command read; 0: does not exist
  yet) and `PlacementClaim` (an agent still has the session epoch the command saw and a free slot)
  are checked inside the commit's transaction.
- **Leases** (`acquire_lease`): named, with absolute expiry times and a term that grows with each
  new holder, to fence work that must run once for all processes.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from orchestrator.v1 import agent_pb2, event_pb2, task_pb2
from orchestrator_server.config import POSTGRES_SCHEMES

CommitListener = Callable[[Sequence[event_pb2.Event]], None]


#: An unfinished task as stored: its id, its status and the serialized `Task` (a plain tuple, as
#: the driver returns rows: 100k named tuples cost a tenth of a second before a restart serves).
StoredTask = tuple[str, int, bytes]


@dataclass
class LoadedState:
    """What a process needs in memory after start: every agent and every unfinished task."""

    agents: list[agent_pb2.Agent]
    agent_token_hashes: dict[str, str]
    #: Every unfinished task as stored, in creation order: decoding them is most of a restart's
    #: work, so the scheduler does it in the background, those held by agents first.
    active_tasks: list[StoredTask]
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


@dataclass(frozen=True)
class PlacementClaim:
    """Placing an attempt of `task_id` on `agent_id` holds only if the stored agent is not
    deregistered, its session epoch is still `session_epoch` (0: not checked, for an operator's
    placement on an agent without a session), and fewer than its `max_concurrent_tasks` tasks other
    than `task_id` are ASSIGNED or RUNNING on it. Two claims can therefore never double-book a slot,
    whichever process makes them."""

    task_id: str
    agent_id: str
    session_epoch: int = 0


@dataclass
class Change:
    """One atomic change: events to append (each carries its entity), the conditions under which
    they may be, plus credential updates."""

    events: list[event_pb2.Event] = field(default_factory=list)
    #: Full task records to store when the events carry only what changed (bounded events: no
    #: payload, only the attempt that changed). Without one, an event's task is stored as the record.
    #: Each record is stamped with the revision of the last event about the same task.
    task_records: list[task_pb2.Task] = field(default_factory=list)
    expect: list[Expect] = field(default_factory=list)
    claims: list[PlacementClaim] = field(default_factory=list)
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


def check_expect(expect: Expect, actual: int | None) -> None:
    """Raises ConditionFailed unless the entity's stored revision (`actual`, None when it does not
    exist) is what the command read: the one rule every backend applies."""
    if actual is None:
        if expect.revision != 0:
            raise ConditionFailed(expect.entity_id, "does not exist", expected=expect.revision)
        return
    if expect.revision == 0:
        raise ConditionFailed(expect.entity_id, f"exists already (revision {actual})", actual=actual)
    if actual != expect.revision:
        raise ConditionFailed(
            expect.entity_id,
            f"changed: revision {actual}, expected {expect.revision}",
            expected=expect.revision,
            actual=actual,
        )


@dataclass(frozen=True)
class Lease:
    """A named lease held by `holder` until `expires_at` (Unix seconds). `term` grows by one each
    time the lease changes hands, so work done under an older term can be fenced."""

    name: str
    holder: str
    term: int
    expires_at: float


class Store(abc.ABC):
    """Durable state of record. Implementations must not block the event loop."""

    @abc.abstractmethod
    async def open(self, on_commit: CommitListener) -> LoadedState:
        """Opens (and migrates) the store and loads the in-memory state."""

    @abc.abstractmethod
    async def commit(self, change: Change) -> int:
        """Durably applies `change` if its conditions hold; returns the revision of its last event
        (stamped into the events and their entities). Raises ConditionFailed (nothing written),
        errors.AlreadyExists for a uniqueness collision, errors.Unavailable if the store is down."""

    @abc.abstractmethod
    async def events_after(self, revision: int, limit: int) -> list[event_pb2.Event]:
        """Events with revision > `revision`, oldest first, at most `limit`, whichever process
        committed them (the tail a watcher or another process resumes from)."""

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
    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        """Takes or renews the lease `name` for `holder` for `ttl` seconds from now; returns it, or
        None while another holder's lease has not expired. Taking it from another (expired) holder
        increments the term; renewing keeps it."""

    @abc.abstractmethod
    async def release_lease(self, name: str, holder: str) -> None:
        """Ends `holder`'s lease now (nothing happens if another holder has it)."""

    @abc.abstractmethod
    async def live_leases(self, prefix: str) -> list[Lease]:
        """The leases whose name starts with `prefix` and that have not expired, by name."""

    @abc.abstractmethod
    async def agent_token_hashes(self, agent_ids: Sequence[str]) -> dict[str, str]:
        """The stored credential hashes of these agents (those that exist): a credential issued by
        another process reaches this one through here, never through the event log."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raises if the store cannot answer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flushes pending writes and closes."""


def is_postgres_url(location: str) -> bool:
    return location.partition("://")[0].lower() in POSTGRES_SCHEMES and "://" in location


def open_store(
    location: str, *, synchronous: str = "FULL", event_retention: int = 100_000, pool_size: int = 10
) -> Store:
    """The store for a database location: a `postgresql://` URL (the `postgres` extra), else an
    SQLite file path or ':memory:'. `synchronous` is SQLite's; `pool_size` PostgreSQL's."""
    if is_postgres_url(location):
        try:
            from orchestrator_server.store.postgres import PostgresStore
        except ImportError as exc:
            raise RuntimeError(
                "DATABASE_URL names PostgreSQL, which needs the postgres extra: "
                "pip install 'optiinfra-orchestrator[server,postgres]'"
            ) from exc

        return PostgresStore(location, event_retention=event_retention, pool_size=pool_size)
    from orchestrator_server.store.sqlite import SqliteStore

    return SqliteStore(location, synchronous=synchronous, event_retention=event_retention)
