"""Backends the contract runs on. A backend is a database location plus a way to open a store on
it; every contract test runs on each backend in BACKENDS (PostgreSQL: a database of its own per
test, in the session's throwaway cluster, tests/postgres_cluster.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator_server.store import Store
from orchestrator_server.store.postgres import PostgresStore
from orchestrator_server.store.sqlite import SqliteStore
from tests.postgres_cluster import new_database


@dataclass
class Backend:
    name: str
    location: str

    def make(self, **options: Any) -> Store:
        # Compacting every few commits lets the compaction contract be seen with small logs.
        if self.name == "postgres":
            return PostgresStore(self.location, compact_every=10, **options)
        return SqliteStore(self.location, synchronous="NORMAL", compact_every=10, **options)

    async def sibling(self, suffix: str) -> Backend:
        """Another, new database on the same backend."""
        if self.name == "postgres":
            return Backend(self.name, await new_database())
        return Backend(self.name, f"{self.location}{suffix}")


# Backend name -> whether a second store (a reopened one, or one in another process) sees its data.
BACKENDS = {"sqlite-file": True, "sqlite-memory": False, "postgres": True}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "shared_database: runs only on backends a second store (or process) can share"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every contract test runs on every backend, except that a `shared_database` test runs only on
    the backends where that makes sense (a second `:memory:` store is a database of its own)."""
    if "backend" in metafunc.fixturenames:
        shared_only = metafunc.definition.get_closest_marker("shared_database") is not None
        names = [name for name, shared in BACKENDS.items() if shared or not shared_only]
        metafunc.parametrize("backend", names, indirect=True)


@pytest.fixture
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "postgres":
        return Backend(request.param, await new_database())
    if request.param == "sqlite-file":
        return Backend(request.param, str(tmp_path / "store.db"))
    return Backend(request.param, ":memory:")


StoreFactory = Callable[..., Store]


@pytest.fixture
async def store_factory(backend: Backend) -> AsyncIterator[StoreFactory]:
    """Makes (unopened) stores on the backend's database; closes them all at the end."""
    made: list[Store] = []

    def make(**options: Any) -> Store:
        store = backend.make(**options)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()
