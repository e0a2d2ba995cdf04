"""A throwaway PostgreSQL for the test session: started once (on first use), a database per test,
stopped when the test process exits.

The cluster lives in a temporary directory and listens only on a unix socket there
(listen_addresses=''). `initdb` refuses to run as root, so as root (CI) it runs as the `postgres`
user. The binaries come from PATH or /usr/lib/postgresql/<version>/bin (Debian's postgresql
package; .ci/run installs it when missing). fsync is off: these databases are thrown away.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import asyncpg

_counter = itertools.count(1)


def _bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_ctl").exists():
            return candidate
    raise RuntimeError(
        "PostgreSQL binaries not found: install postgresql (Debian: apt-get install postgresql)"
    )


class Cluster:
    def __init__(self) -> None:
        self.bindir = _bindir()
        self.directory = Path(tempfile.mkdtemp(prefix="orchestrator-pg-"))
        self.data = self.directory / "data"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.directory, "postgres", "postgres")
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync",
            "--no-instructions",
        )  # fmt: skip
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def _pg_ctl(self, *args: str) -> None:
        options = f"-k {self.directory} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.directory / "log"), "-w", "-o", options, *args
        )

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self) -> None:
        """Stops the server now, cutting every connection (`-m fast`)."""
        self._pg_ctl("-m", "fast", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.directory}"

    async def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        name = f"test_{os.getpid()}_{next(_counter)}"
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await conn.close()
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self._pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)


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
