"""psycopg 3 (+ psycopg-pool) against asyncpg on the PostgreSQL commit path (store/postgres.py):

    .venv/bin/python -m tests.store_contract.bench_pg_drivers postgresql://... [--commits N] [--rounds R]

Each commit creates one task under a condition (it must not exist yet), as the store does: lock the
revision counter row, check the condition, insert the event and the task, advance the counter.
Two shapes: `pool` runs one transaction per commit over a pool of 10 connections (all N submitted
at once); `group` queues them to one writer connection that folds whatever is waiting into one
transaction, as the store does. Prints commits/s and the p99 latency per driver and shape.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import psycopg
import psycopg_pool

SCHEMA = """
DROP TABLE IF EXISTS bench_events, bench_tasks, bench_meta;
CREATE TABLE bench_meta (key text PRIMARY KEY, value bigint NOT NULL);
INSERT INTO bench_meta VALUES ('revision', 0);
CREATE TABLE bench_events (revision bigint PRIMARY KEY, data bytea NOT NULL);
CREATE TABLE bench_tasks (task_id text PRIMARY KEY, revision bigint NOT NULL, data bytea NOT NULL)
"""
LOCK = "SELECT value FROM bench_meta WHERE key = 'revision' FOR UPDATE"
CHECK = "SELECT revision FROM bench_tasks WHERE task_id = {} FOR UPDATE"
EVENT = "INSERT INTO bench_events (revision, data) VALUES ({}, {})"
TASK = "INSERT INTO bench_tasks (task_id, revision, data) VALUES ({}, {}, {})"
ADVANCE = "UPDATE bench_meta SET value = {} WHERE key = 'revision'"
DATA = b"x" * 200

# One commit's statements after the counter lock, for a task id and the revision to give it.
Body = Callable[[Any, str, int], Awaitable[None]]


def asyncpg_sql(sql: str, count: int) -> str:
    return sql.format(*(f"${n}" for n in range(1, count + 1)))


def psycopg_sql(sql: str, count: int) -> str:
    return sql.format(*(["%s"] * count))


async def asyncpg_body(conn: asyncpg.Connection, task_id: str, revision: int) -> None:
    assert await conn.fetchrow(asyncpg_sql(CHECK, 1), task_id) is None
    await conn.execute(asyncpg_sql(EVENT, 2), revision, DATA)
    await conn.execute(asyncpg_sql(TASK, 3), task_id, revision, DATA)


async def psycopg_body(conn: psycopg.AsyncConnection[Any], task_id: str, revision: int) -> None:
    assert await (await conn.execute(psycopg_sql(CHECK, 1), (task_id,))).fetchone() is None
    await conn.execute(psycopg_sql(EVENT, 2), (revision, DATA))
    await conn.execute(psycopg_sql(TASK, 3), (task_id, revision, DATA))


async def timed(commits: int, run: Callable[[int], Awaitable[None]]) -> tuple[float, float]:
    latencies: list[float] = []

    async def one(n: int) -> None:
        started = time.perf_counter()
        await run(n)
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(commits)))
    elapsed = time.perf_counter() - started
    return commits / elapsed, statistics.quantiles(latencies, n=100)[98] * 1000


class GroupWriter:
    """One connection; each transaction takes every commit waiting at that moment."""

    def __init__(self, transact: Callable[[Sequence[str]], Awaitable[None]]) -> None:
        self._transact = transact
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[None]]] = asyncio.Queue()

    async def run(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            while not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            await self._transact([task_id for task_id, _ in jobs])
            for _, future in jobs:
                future.set_result(None)

    async def commit(self, task_id: str) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((task_id, future))
        await future


async def bench_asyncpg(url: str, commits: int, prefix: str) -> dict[str, tuple[float, float]]:
    pool = await asyncpg.create_pool(url, min_size=10, max_size=10)
    assert pool is not None
    await pool.execute(SCHEMA)

    async def pool_commit(n: int) -> None:
        async with pool.acquire() as conn, conn.transaction():
            revision = await conn.fetchval(LOCK) + 1
            await asyncpg_body(conn, f"{prefix}p{n}", revision)
            await conn.execute(asyncpg_sql(ADVANCE, 1), revision)

    results = {"pool": await timed(commits, pool_commit)}
    async with pool.acquire() as conn:

        async def transact(task_ids: Sequence[str]) -> None:
            async with conn.transaction():
                revision = await conn.fetchval(LOCK)
                for task_id in task_ids:
                    revision += 1
                    await asyncpg_body(conn, task_id, revision)
                await conn.execute(asyncpg_sql(ADVANCE, 1), revision)

        writer = GroupWriter(transact)
        running = asyncio.create_task(writer.run())
        results["group"] = await timed(commits, lambda n: writer.commit(f"{prefix}g{n}"))
        running.cancel()
    await pool.close()
    return results


async def bench_psycopg(url: str, commits: int, prefix: str) -> dict[str, tuple[float, float]]:
    pool = psycopg_pool.AsyncConnectionPool(url, min_size=10, max_size=10, open=False)
    await pool.open(wait=True)
    async with pool.connection() as conn:
        await conn.execute(SCHEMA)

    async def pool_commit(n: int) -> None:
        async with pool.connection() as conn, conn.transaction():
            row = await (await conn.execute(LOCK)).fetchone()
            assert row is not None
            revision = row[0] + 1
            await psycopg_body(conn, f"{prefix}p{n}", revision)
            await conn.execute(psycopg_sql(ADVANCE, 1), (revision,))

    results = {"pool": await timed(commits, pool_commit)}
    async with pool.connection() as conn:

        async def transact(task_ids: Sequence[str]) -> None:
            async with conn.transaction():
                row = await (await conn.execute(LOCK)).fetchone()
                assert row is not None
                revision = row[0]
                for task_id in task_ids:
                    revision += 1
                    await psycopg_body(conn, task_id, revision)
                await conn.execute(psycopg_sql(ADVANCE, 1), (revision,))

        writer = GroupWriter(transact)
        running = asyncio.create_task(writer.run())
        results["group"] = await timed(commits, lambda n: writer.commit(f"{prefix}g{n}"))
        running.cancel()
    await pool.close()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    table: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for round_number in range(args.rounds):
        for driver, bench in (("asyncpg", bench_asyncpg), ("psycopg", bench_psycopg)):
            for shape, figures in (await bench(args.url, args.commits, f"r{round_number}")).items():
                table.setdefault((driver, shape), []).append(figures)
    print(f"| driver | shape | commits/s (median of {args.rounds}) | p99 ms (median) |")
    print("|---|---|---|---|")
    for (driver, shape), rounds in sorted(table.items()):
        rate = statistics.median(r for r, _ in rounds)
        p99 = statistics.median(p for _, p in rounds)
        print(f"| {driver} | {shape} | {rate:,.0f} | {p99:.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
