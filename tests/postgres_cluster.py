"""A throwaway PostgreSQL for the test session: started once (on first use), a database per test,
stopped when the test process exits. The cluster itself is `local_cluster.postgres` (which
`make cluster` uses too).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os

import asyncpg

from local_cluster.postgres import ThrowawayPostgres

_counter = itertools.count(1)


class Cluster(ThrowawayPostgres):
    async def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        name = f"test_{os.getpid()}_{next(_counter)}"
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await conn.close()
        return self.url(name)


_cluster: Cluster | None = None


async def new_database() -> str:
    """A new database in the session's cluster (started, off the event loop, on first use)."""
    started = _cluster or await asyncio.to_thread(cluster)
    return await started.create_database()


def cluster() -> Cluster:
    """The session's cluster, started on first use and destroyed when the process exits."""
    global _cluster
    if _cluster is None:
        _cluster = Cluster()
        atexit.register(_cluster.destroy)
    return _cluster
