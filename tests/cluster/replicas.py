"""Several `orchestrator serve` replicas as real processes on one throwaway PostgreSQL database, and a
proxy in front of the database that a test can cut (a replica cut off from the database).

`ReplicaProcesses.start(n)` starts replicas named r0, r1, ... on a new database (tests/postgres_cluster.py);
each is a `ServerProcess` (tests/conftest.py) with its own working directory and log. The proxy
listens on a unix socket of its own (the cluster listens only on unix sockets) and forwards to the
cluster's; `cut()` closes every connection through it and refuses new ones until `restore()`.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess
from tests.postgres_cluster import cluster, new_database

#: Short enough that a test sees a replica die and a leader change within seconds.
CLUSTER_ENV = {"REPLICA_TTL": "3", "HEARTBEAT_TIMEOUT": "2", "HEARTBEAT_INTERVAL": "0.3"}


class DatabaseProxy:
    """Forwards unix-socket connections to the PostgreSQL cluster; `cut()` severs them all."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._target = str(cluster().directory / ".s.PGSQL.5432")
        self._open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="db-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def url(self, database_url: str) -> str:
        """The database URL with its host (socket directory) replaced by the proxy's."""
        return re.sub(r"host=[^&]+", f"host={self.directory}", database_url)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(
            asyncio.start_unix_server(self._accept, path=str(self.directory / ".s.PGSQL.5432"))
        )
        self._ready.set()
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(self._target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, upstream_writer))
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.close()

    def cut(self) -> None:
        """Every connection through the proxy is closed, and new ones are refused."""

        def sever() -> None:
            self._open = False
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(sever)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "_open", True)

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class ReplicaProcesses:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.database_url = ""
        self.servers: list[ServerProcess] = []
        self.proxies: list[DatabaseProxy] = []

    async def start(
        self, count: int, *, via_proxy: tuple[int, ...] = (), sqlite: bool = False, **env: Any
    ) -> list[ServerProcess]:
        """Starts `count` more replicas (the first call makes the database); those whose index is in
        `via_proxy` reach the database through a `DatabaseProxy` of their own (`proxies`).
        `sqlite`: they share one SQLite file instead (the default backend)."""
        if sqlite:
            env = {"DATABASE_PATH": str(self.workdir / "shared.db"), **env}
        elif not self.database_url:
            self.database_url = await new_database()
        started = []
        for _ in range(count):
            index = len(self.servers)
            directory = self.workdir / f"r{index}"
            directory.mkdir()
            url = self.database_url
            if index in via_proxy:
                proxy = DatabaseProxy(Path(f"/tmp/orch-proxy-{id(self)}-{index}"))
                self.proxies.append(proxy)
                url = proxy.url(url)
            database = {} if sqlite else {"DATABASE_URL": url}
            server = ServerProcess(directory, **{**CLUSTER_ENV, **database, **env})
            self.servers.append(server)
            await asyncio.to_thread(server.start, 60.0)  # a busy machine starts slowly
            started.append(server)
        return started

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        for proxy in self.proxies:
            proxy.close()


@pytest.fixture
def replica_processes(tmp_path: Path) -> Iterator[ReplicaProcesses]:
    group = ReplicaProcesses(tmp_path)
    yield group
    group.stop()
