"""Load-generator processes: spawned workers driven over a pipe, one command at a time.

The parent sends ``{"op": name, ...}`` and awaits the reply without blocking its event loop (so its
watch streams keep reading). A worker runs its own asyncio loop (uvloop) and keeps its sessions alive
between commands; it exits on "stop", when the parent goes away, or at its own deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import time
import traceback
from typing import Any

_CTX = multiprocessing.get_context("spawn")  # never fork a process that has grpc threads


class WorkerError(RuntimeError):
    """A worker answered a command with an error, or not at all."""


async def _readable(conn: multiprocessing.connection.Connection, within: float) -> bool:
    if conn.poll():
        return True
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(fut, within)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.set_blocking(fd, True)  # the loop made it non-blocking; recv() of a large answer needs blocking


_LIVE: set[Worker] = set()


def kill_all() -> None:
    """SIGKILL every worker still running (interrupted run)."""
    for worker in list(_LIVE):
        worker.kill()


class Worker:
    """Parent-side handle of one load-generator process."""

    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        self.name = name
        self.spec = {"name": name, "max_lifetime": 900.0, **spec}
        self._conn, child = _CTX.Pipe(duplex=True)
        self._proc = _CTX.Process(target=_child_main, args=(child, self.spec), name=name, daemon=True)
        self._child_conn = child

    def start(self) -> Worker:
        _LIVE.add(self)
        self._proc.start()
        self._child_conn.close()
        return self

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    def kill(self) -> None:
        """SIGKILL: what a crashed agent looks like."""
        if self._proc.pid is not None and self._proc.exitcode is None:
            self._proc.kill()

    async def call(self, op: str, wait: float = 120.0, **kwargs: Any) -> dict[str, Any]:
        """Run one command; the answer must come within ``wait`` plus the op's own ``within``/``seconds``.

        A worker that does not answer in time is killed: a late answer would be taken for the next one.
        """
        wait += float(kwargs.get("within") or 0) + float(kwargs.get("seconds") or 0)
        try:
            self._conn.send({"op": op, **kwargs})
        except (BrokenPipeError, OSError) as exc:
            raise WorkerError(f"{self.name}: {op}: worker gone ({exc})") from exc
        if not await _readable(self._conn, wait):
            self.kill()
            raise WorkerError(f"{self.name}: {op}: no answer within {wait:.0f} s (worker killed)")
        try:
            reply: dict[str, Any] = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise WorkerError(f"{self.name}: {op}: worker exited (code {self._proc.exitcode})") from exc
        if "error" in reply:
            raise WorkerError(f"{self.name}: {op}: {reply['error']}")
        return reply

    async def close(self, grace: float = 10.0) -> None:
        """Ask the worker to stop; SIGKILL it if it has not exited after ``grace`` seconds."""
        if self._proc.is_alive():
            with contextlib.suppress(WorkerError):
                await self.call("stop", wait=grace)
            await asyncio.to_thread(self._proc.join, grace)
        if self._proc.is_alive():
            self.kill()
        self._proc.join(1)
        self._conn.close()
        _LIVE.discard(self)


class Pool:
    """Several workers driven together."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers

    @staticmethod
    def start(prefix: str, count: int, spec: dict[str, Any]) -> Pool:
        return Pool([Worker(f"{prefix}{i}", {**spec, "index": i}).start() for i in range(count)])

    async def call(self, op: str, wait: float = 120.0, **kwargs: Any) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.call(op, wait, **kwargs) for w in self.workers)))

    async def call_each(
        self, op: str, kwargs_list: list[dict[str, Any]], wait: float = 120.0
    ) -> list[dict[str, Any]]:
        calls = (w.call(op, wait, **kw) for w, kw in zip(self.workers, kwargs_list, strict=True))
        return list(await asyncio.gather(*calls))

    async def close(self) -> None:
        await asyncio.gather(*(w.close() for w in self.workers), return_exceptions=True)


def split(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` near-equal non-negative integers."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# ---------------------------------------------------------------------------------------------- child


def _child_main(conn: multiprocessing.connection.Connection, spec: dict[str, Any]) -> None:
    from bench.util import run

    run(_child_loop(conn, spec))


async def _child_loop(conn: multiprocessing.connection.Connection, spec: dict[str, Any]) -> None:
    from bench.loadgen import LoadGen

    gen = LoadGen(spec)
    deadline = time.perf_counter() + float(spec["max_lifetime"])
    try:
        while time.perf_counter() < deadline:
            if not await _readable(conn, max(0.0, deadline - time.perf_counter())):
                break
            try:
                msg = conn.recv()
            except EOFError:
                break  # parent gone
            op = msg.pop("op")
            if op == "stop":
                await gen.close()
                conn.send({"ok": True})
                break
            try:
                reply = await gen.handle(op, msg)
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"}
            conn.send(reply)
    finally:
        await gen.close()
