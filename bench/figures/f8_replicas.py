"""Figure 8: replicas on PostgreSQL. The same load against 1 replica and against 2 replicas, then
SIGKILL of one of 2 replicas under load.

Each configuration gets a fresh database in a throwaway PostgreSQL (tests/postgres_cluster.py: a
unix socket in a temporary directory, fsync off, so the figure measures the replicas and not the
disk). Load processes are spread over the replicas (worker i talks to replica i mod n), so with 2
replicas half the sessions and half the creates go to each, and a task created on one is often
placed on an agent attached to the other.

- Sessions: S agents beat at 1 Hz; after one interval of warm-up, every ack latency of a window is
  recorded (p99) with the CPU of all replicas together.
- Throughput: 8 agents (capacity 256) complete what is pushed to them; creators call CreateTask in a
  closed loop for a while; tasks/s = completed / (last completion - first create).
- Kill (2 replicas): K agents, half attached to each replica, each agent's target listing both
  replicas (its own first: `ipv4:a,b`, as behind a DNS name); tasks are created on the survivor at
  a fixed rate and the other replica is SIGKILLed a third of the way through. Re-attached = the
  last of the victim's agents welcomed again - kill; re-placed = the last task that was created and
  not yet completed at the kill completes - kill. Lost = created and never completed; double =
  CompleteTask accepted twice for one task.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from bench import proc
from bench.figures.common import Context, merged, merged_dicts, summary_dict, target_of
from bench.figures.f5_tasks import wait_done
from bench.report import Figure, Metric
from bench.stats import summarize
from bench.workers import Pool, Worker, split

KEY = "8_replicas"
TASK_AGENT_WORKERS = 2
TASK_AGENTS_PER_WORKER = 4
CREATORS = 2
# Each task of the kill phase takes this long on its agent, so a few dozen run at the kill.
TASK_WORK_S = 0.5
REATTACH_TARGET_S = 5.0  # issue 12: every agent of a killed replica re-attached elsewhere within 5 s
# A failover grace long enough that an agent re-attaching to the survivor keeps its attempts.
REPLICA_ENV = {"HEARTBEAT_TIMEOUT": "10", "FAILOVER_GRACE": "10"}


async def _database() -> str:
    # The test suite's throwaway PostgreSQL: one implementation of "start a disposable cluster".
    from tests.postgres_cluster import new_database

    return await new_database()


async def _completions(server: proc.ManagedProcess) -> Counter[str]:
    """How many times each task entered SUCCEEDED in the cluster's event log (the truth)."""
    from tests.cluster.workload import completions, event_log

    return completions(await event_log(server.env["DATABASE_URL"]))


async def _replicas(ctx: Context, label: str, count: int) -> list[proc.ManagedProcess]:
    env = {**REPLICA_ENV, "DATABASE_URL": await _database()}
    return list(await asyncio.gather(*(ctx.start_server(f"f8-{label}-{i}", env) for i in range(count))))


def _pool(prefix: str, count: int, targets: list[str], **spec: Any) -> Pool:
    """Worker i talks to targets[i mod len(targets)]."""
    return Pool(
        [
            Worker(f"{prefix}{i}", {**spec, "index": i, "target": targets[i % len(targets)]}).start()
            for i in range(count)
        ]
    )


def _cpu(servers: list[proc.ManagedProcess], before: list[proc.Usage]) -> float:
    return sum(proc.cpu_share(b, s.usage()) for s, b in zip(servers, before, strict=True))


async def _sessions(ctx: Context, servers: list[proc.ManagedProcess]) -> dict[str, Any]:
    sizes = ctx.sizes
    n, workers = len(servers), max(2, sizes.capacity_workers)
    pool = _pool(f"f8s{n}-", workers, [target_of(s) for s in servers], streams_per_channel=250)
    try:
        adds = split(sizes.replica_sessions, workers)
        await pool.call_each(
            "register", [{"count": a, "prefix": f"f8s{n}", "concurrency": 32} for a in adds], wait=600
        )
        await pool.call("open_sessions", interval=1.0, open_concurrency=100, within=300)
        await pool.call("measure", seconds=1.0)  # warm-up: every session beats once
        before = [s.usage() for s in servers]
        results = await pool.call("measure", seconds=sizes.replica_window_s)
        cpu = _cpu(servers, before)
        await pool.call("close_sessions", goodbye=False, wait=120)
    finally:
        await pool.close()
    lat = summarize(merged(results, "latencies_ms"))
    return {
        "sessions": sizes.replica_sessions,
        "alive": sum(r["alive"] for r in results),
        "ack_ms": lat.as_dict() if lat else None,
        "ack_p99_ms": lat.p99 if lat else None,
        "errors": sum(r["errors"] for r in results),
        "server_cpu_cores": cpu,
    }


async def _throughput(ctx: Context, servers: list[proc.ManagedProcess]) -> dict[str, Any]:
    sizes = ctx.sizes
    n, targets = len(servers), [target_of(s) for s in servers]
    capability = f"bench-replica{n}"
    agents = _pool(f"f8a{n}-", TASK_AGENT_WORKERS, targets)
    creators = _pool(f"f8c{n}-", CREATORS, targets)
    try:
        await agents.call(
            "register",
            count=TASK_AGENTS_PER_WORKER,
            prefix=f"f8t{n}",
            capabilities=[capability],
            max_tasks=256,
        )
        await agents.call("open_sessions", interval=1.0, task_mode="complete")
        before = [s.usage() for s in servers]
        made = await creators.call_each(
            "unary_closed",
            [
                {
                    "method": "create_task",
                    "concurrency": c,
                    "seconds": sizes.closed_s,
                    "prefix": f"tp{n}",
                    "capabilities": [capability],
                }
                for c in split(sizes.closed_concurrency, CREATORS)
            ],
        )
        sent = merged_dicts(made, "sent")
        done = (await wait_done(agents, set(sent), 120))["done"]
        cpu = _cpu(servers, before)
    finally:
        await agents.close()
        await creators.close()
    span = (max(done.values()) - min(sent.values())) if done else 0.0
    return {
        "created": sum(r["calls"] for r in made),
        "completed": len(done),
        "seconds": span,
        "tasks_per_s": len(done) / span if span > 0 else None,
        "create_ms": summary_dict(merged(made, "latencies_ms")),
        "create_errors": {k: v for r in made for k, v in r["errors"].items()},
        "server_cpu_cores": cpu,
    }


async def _kill_one(ctx: Context, servers: list[proc.ManagedProcess]) -> dict[str, Any]:
    """SIGKILL servers[1] under load; the agents list both replicas and move to servers[0]."""
    sizes = ctx.sizes
    survivor, victim = servers
    a, b = survivor.info["grpc_port"], victim.info["grpc_port"]
    targets = [f"ipv4:127.0.0.1:{a},127.0.0.1:{b}", f"ipv4:127.0.0.1:{b},127.0.0.1:{a}"]
    agents = _pool("f8k-", 2, targets)
    creator = Worker("f8k-creator", {"target": target_of(survivor)}).start()
    try:
        await agents.call_each(
            "register",
            [
                {"count": c, "prefix": f"f8k{i}", "capabilities": ["bench-kill"], "max_tasks": 4}
                for i, c in enumerate(split(sizes.replica_kill_agents, 2))
            ],
        )
        await agents.call(
            "open_sessions", interval=1.0, reconnect=True, task_mode="complete", task_work_s=TASK_WORK_S
        )
        count = int(sizes.replica_kill_rate * sizes.replica_kill_s)
        load = asyncio.create_task(
            creator.call(
                "create_at_rate",
                rate=sizes.replica_kill_rate,
                count=count,
                prefix="kill",
                capabilities=["bench-kill"],
                wait=120,
            )
        )
        await asyncio.sleep(sizes.replica_kill_s / 3)  # a third of the creates, then the kill
        killed_at = time.perf_counter()
        await victim.kill()
        moved = await agents.workers[1].call("wait_welcomes", since=killed_at, within=60)
        created = await load
        sent: dict[str, float] = created["sent"]
        report = await wait_done(agents, set(sent), 60)
    finally:
        await agents.close()
        await creator.close()
    done = report["done"]
    welcomes = list(moved["welcomes"].values())
    in_flight = [k for k, t in sent.items() if t < killed_at and done.get(k, killed_at + 1) > killed_at]
    return {
        "agents": sizes.replica_kill_agents,
        "victim_agents": moved["sessions"],
        "reattached": len(welcomes),
        "reattach_all_s": max(welcomes) - killed_at if len(welcomes) >= moved["sessions"] else None,
        "reattach_s": summary_dict(t - killed_at for t in welcomes),
        "created": len(created["latencies_ms"]),
        "create_errors": created["errors"],
        "in_flight_at_kill": len(in_flight),
        "replaced_all_s": max((done[k] - killed_at for k in in_flight if k in done), default=0.0)
        if all(k in done for k in in_flight)
        else None,
        "lost": len(created["latencies_ms"]) - len(done),
        "agent_errors": report["errors"],
        # An agent retries a completion its dead replica may have committed before dying; the
        # retry is answered as the same completion, so accepted calls overcount: the log decides.
        "accepted_twice": sum(1 for n in report["completed"].values() if n > 1),
        "double_completed": sum(1 for n in (await _completions(survivor)).values() if n > 1),
    }


async def run(ctx: Context) -> Figure:
    fig = Figure(KEY, "")
    sizes = ctx.sizes
    phases: dict[str, float] = {}  # seconds each step took (where a run's time goes)
    started = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal started
        phases[name] = time.perf_counter() - started
        started = time.perf_counter()

    async def sessions_and_throughput(
        count: int, name: str, start_phase: str
    ) -> tuple[list[proc.ManagedProcess], dict[str, Any]]:
        """Starts `count` replicas on a fresh database and runs the sessions and throughput phases."""
        replicas = await _replicas(ctx, f"{count}r", count)
        lap(start_phase)
        row = {"sessions": await _sessions(ctx, replicas)}
        lap(f"{name}: sessions")
        row["tasks"] = await _throughput(ctx, replicas)
        lap(f"{name}: throughput")
        return replicas, row

    _, one = await sessions_and_throughput(1, "1 replica", "start 1 replica (and PostgreSQL)")
    await ctx.stop_servers()
    pair, two = await sessions_and_throughput(2, "2 replicas", "start 2 replicas")
    kill = await _kill_one(ctx, pair)
    lap("kill")
    rows = {1: one, 2: two}
    fig.details |= {"one_replica": one, "two_replicas": two, "kill": kill, "phase_s": phases}
    s = sizes.replica_sessions
    fig.metrics += [
        Metric.absolute(f"1 replica: ack p99, {s} sessions at 1 Hz", one["sessions"]["ack_p99_ms"], "ms"),
        Metric.absolute(
            f"2 replicas: ack p99, {s} sessions at 1 Hz",
            two["sessions"]["ack_p99_ms"],
            "ms",
            baseline=one["sessions"]["ack_p99_ms"],
            baseline_name="1 replica",
        ),
        Metric.absolute(
            "1 replica: sessions alive after the window", one["sessions"]["alive"], "sessions", at_least=s
        ),
        Metric.absolute(
            "2 replicas: sessions alive after the window",
            two["sessions"]["alive"],
            "sessions",
            at_least=s,
            baseline=one["sessions"]["alive"],
            baseline_name="1 replica",
        ),
        Metric.absolute("1 replica: tasks/s (create -> complete)", one["tasks"]["tasks_per_s"], "/s"),
        Metric.absolute(
            "2 replicas: tasks/s (create -> complete)",
            two["tasks"]["tasks_per_s"],
            "/s",
            baseline=one["tasks"]["tasks_per_s"],
            baseline_name="1 replica",
        ),
        Metric.absolute(
            f"SIGKILL 1 of 2: all {kill['victim_agents']} agents re-attached",
            kill["reattach_all_s"],
            "s",
            at_most=REATTACH_TARGET_S,
        ),
        Metric.absolute(
            f"SIGKILL 1 of 2: all {kill['in_flight_at_kill']} tasks in flight completed",
            kill["replaced_all_s"],
            "s",
        ),
        Metric.absolute("SIGKILL 1 of 2: lost", kill["lost"], "tasks", equals=0),
        Metric.absolute("SIGKILL 1 of 2: double-completed", kill["double_completed"], "tasks", equals=0),
    ]
    for n, row in rows.items():
        ses, tasks = row["sessions"], row["tasks"]
        fig.notes.append(
            f"{n} replica(s): {ses['alive']}/{ses['sessions']} sessions alive, {ses['errors']} errors, replicas' "
            f"CPU {ses['server_cpu_cores']:.2f} cores at 1 Hz; throughput {tasks['completed']}/{tasks['created']} "
            f"completed in {tasks['seconds']:.1f} s, replicas' CPU {tasks['server_cpu_cores']:.2f} cores, "
            f"create errors {tasks['create_errors'] or 'none'}"
        )
    fig.notes.append(
        f"kill: {kill['agents']} agents ({kill['victim_agents']} on the victim), tasks created at "
        f"{sizes.replica_kill_rate:g}/s for {sizes.replica_kill_s:g} s on the survivor, {TASK_WORK_S:g} s of work "
        f"each ({kill['created']} acknowledged, errors {kill['create_errors'] or 'none'}); "
        f"{kill['reattached']} re-attached; agents' errors {dict(kill['agent_errors']) or 'none'}; "
        f"CompleteTask accepted twice for {kill['accepted_twice']} task(s) (a retry of a completion "
        "the dead replica had committed), double completions in the event log "
        f"{kill['double_completed']}."
    )
    return fig
