"""Figure 1: SIGKILL an agent process holding a Heartbeat session -> DOWN seen by watchers.

Each victim is its own process (a load-generator worker with one agent and one session). The parent
holds a WatchAgents stream and a WatchAgentHealth stream, stamps the SIGKILL, and stamps the DOWN
message on each stream; detection = DOWN received - kill sent, per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from bench import proc
from bench.client import Stubs, channel
from bench.figures.common import Context, target_of
from bench.report import Figure, Metric
from bench.stats import summarize
from bench.workers import Pool
from orchestrator.v1 import agent_pb2, discovery_pb2, health_pb2

KEY = "1_failure_detection"
VICTIM_TYPE = "bench-victim"
DOWN = agent_pb2.AGENT_STATUS_DOWN
EVENT_TIMEOUT_S = 5.0


class Watchers:
    """Both watch streams, recording the first DOWN time of each agent."""

    def __init__(self, stubs: Stubs) -> None:
        self.stubs = stubs
        self.down: dict[str, dict[str, float]] = {"WatchAgents": {}, "WatchAgentHealth": {}}
        self.changed = asyncio.Event()
        self.ready = {"WatchAgents": asyncio.Event(), "WatchAgentHealth": asyncio.Event()}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._agents()), asyncio.create_task(self._health())]

    def _mark(self, stream: str, agent_id: str) -> None:
        self.down[stream].setdefault(agent_id, time.perf_counter())
        self.changed.set()

    async def _agents(self) -> None:
        req = discovery_pb2.WatchAgentsRequest(query=discovery_pb2.AgentQuery(type=VICTIM_TYPE))
        async for msg in self.stubs.discovery.WatchAgents(req):
            kind = msg.WhichOneof("kind")
            if kind == "snapshot":
                self.ready["WatchAgents"].set()
            elif kind == "delta" and msg.delta.agent.status == DOWN:
                self._mark("WatchAgents", msg.delta.agent.agent_id)

    async def _health(self) -> None:
        req = health_pb2.WatchAgentHealthRequest(type=VICTIM_TYPE)
        async for msg in self.stubs.health.WatchAgentHealth(req):
            if msg.caught_up:
                self.ready["WatchAgentHealth"].set()
            elif not msg.initial and msg.HasField("health") and msg.health.status == DOWN:
                self._mark("WatchAgentHealth", msg.health.agent_id)

    async def wait_ready(self, within: float) -> None:
        waits = [asyncio.wait_for(e.wait(), within) for e in self.ready.values()]
        await asyncio.gather(*waits)

    async def wait_down(self, agent_id: str, within: float) -> None:
        deadline = time.perf_counter() + within
        while not all(agent_id in d for d in self.down.values()):
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception():
                raise task.exception()  # type: ignore[misc]


async def kill_victims(
    ctx: Context, server: proc.ManagedProcess, fig: Figure, kills: int, batch: int, label: str = "kills"
) -> tuple[dict[str, list[float]], int]:
    """SIGKILLs `kills` one-agent processes (`batch` alive at a time), one at a time; returns the
    kill -> DOWN latencies (ms) on each watch stream and how many DOWNs were not seen within 5 s."""
    target = target_of(server)
    ch = channel(target)
    watchers = Watchers(Stubs.of(ch))
    watchers.start()
    latencies: dict[str, list[float]] = {"WatchAgents": [], "WatchAgentHealth": []}
    missed = 0
    try:
        await watchers.wait_ready(15)
        remaining = kills
        batch_no = 0
        while remaining > 0:
            n = min(batch, remaining)
            pool = Pool.start(f"victim{batch_no}-", n, {"target": target, "max_lifetime": 300})
            try:
                regs = await pool.call(
                    "register", count=1, prefix="victim", agent_type=VICTIM_TYPE, return_creds=True
                )
                opened = await pool.call("open_sessions", interval=1.0)
                if sum(o["opened"] for o in opened) != n:
                    raise RuntimeError(f"victim sessions not opened: {opened}")
                async with ctx.profiled(fig, server, f"{label}{batch_no}"):
                    for worker, reg in zip(pool.workers, regs, strict=True):
                        agent_id = reg["creds"][0][0]
                        t_kill = time.perf_counter()
                        worker.kill()
                        await watchers.wait_down(agent_id, EVENT_TIMEOUT_S)
                        for stream, seen in watchers.down.items():
                            if agent_id in seen:
                                latencies[stream].append((seen[agent_id] - t_kill) * 1000)
                            else:
                                missed += 1
            finally:
                await pool.close()
            remaining -= n
            batch_no += 1
    finally:
        await watchers.close()
        await ch.close(None)
    return latencies, missed


async def run(ctx: Context) -> Figure:
    fig = Figure(KEY, "")
    sizes = ctx.sizes
    server = await ctx.start_server("f1")
    latencies, missed = await kill_victims(ctx, server, fig, sizes.kills, sizes.kill_batch)
    for stream, values in latencies.items():
        s = summarize(values)
        fig.details[stream] = s.as_dict() if s else None
        fig.metrics.append(Metric.absolute(f"{stream} p50", s.p50 if s else None, "ms", at_most=10))
        fig.metrics.append(Metric.absolute(f"{stream} p99", s.p99 if s else None, "ms", at_most=25))
    fig.metrics.append(Metric.absolute("DOWN not seen within 5 s", missed, "events", equals=0))
    fig.notes.append(
        f"{sizes.kills} SIGKILLs of one-agent processes, each holding a Heartbeat session at 1 Hz; "
        "time from kill() to the DOWN message on each watch stream (parent process, same clock)."
    )
    fig.details["kills"] = sizes.kills
    return fig
