"""Idempotency keys in the store: scoped per principal, and a database of schema version 1 keeps
its keys (in the shared scope) after the migration (issue 10, item 16)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orchestrator_server.errors import AlreadyExists
from orchestrator_server.store import Change
from orchestrator_server.store.sqlite import MIGRATIONS, SqliteStore
from tests.store_contract.builders import ASSIGNED, Recorder, task_event


async def test_scopes_keep_keys_apart(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "store.db"), synchronous="NORMAL")
    await store.open(Recorder())
    await store.commit(Change(events=[task_event("t1", key="k")], idempotency_scopes={"t1": "admin-key:a"}))
    await store.commit(Change(events=[task_event("t2", key="k")], idempotency_scopes={"t2": "admin-key:b"}))
    with pytest.raises(AlreadyExists, match="already used by task t1"):
        await store.commit(
            Change(events=[task_event("t3", key="k")], idempotency_scopes={"t3": "admin-key:a"})
        )
    # An update of t1 (no scope given) keeps its scope.
    await store.commit(Change(events=[task_event("t1", key="k", status=ASSIGNED)]))
    found = [
        await store.find_task_by_idempotency_key("k", scope=s) for s in ("admin-key:a", "admin-key:b", "")
    ]
    assert [task.task_id if task else None for task in found] == ["t1", "t2", None]
    await store.close()


async def test_a_version_1_database_keeps_its_keys(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as conn:
        conn.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version = 1; COMMIT;")
        conn.execute(
            "INSERT INTO tasks (task_id, status, type, idempotency_key, data) VALUES (?, 4, 'job', ?, ?)",
            ("old", "legacy-key", task_event("old", key="legacy-key").task.SerializeToString()),
        )
    store = SqliteStore(path, synchronous="NORMAL")
    await store.open(Recorder())
    legacy = await store.find_task_by_idempotency_key("legacy-key")
    assert legacy is not None and legacy.task_id == "old"
    assert await store.find_task_by_idempotency_key("legacy-key", scope="admin-key:a") is None
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
