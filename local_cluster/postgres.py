"""A throwaway PostgreSQL: a cluster in a temporary directory, listening only on a unix socket there
(listen_addresses=''), destroyed with its data when done. Used by `make cluster` and by the test suite
(tests/postgres_cluster.py).

`initdb` refuses to run as root, so as root (CI) the tools run as the `postgres` user. The binaries
come from PATH or /usr/lib/postgresql/<version>/bin (Debian's postgresql package). fsync is off:
nothing here is meant to survive a crash of the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


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


class ThrowawayPostgres:
    """Created and started by the constructor; `destroy()` stops it and removes its directory."""

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

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().split()[0])
        return None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.directory}"

    def destroy(self) -> None:
        """Stops it without a checkpoint (`-m immediate`: the data is thrown away) and removes it."""
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self._pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)
