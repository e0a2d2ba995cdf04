"""One caller floods far over its limit while 50 agents keep their sessions: the flooder is refused
with RESOURCE_EXHAUSTED + RetryInfo, and no other agent goes DOWN or misses a heartbeat deadline."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.v1 import agent_pb2, registry_pb2
from tests.conftest import ROOT, Running
from tests.security.conftest import ADMIN_KEY, API_KEYS, READER_KEY, bearer, open_stream, register

AGENTS = 50
INTERVAL = 0.25
# Long enough that a stall of this loaded machine (the server and the 50 agents share the test's
# event loop) is not mistaken for starvation; the flood lasts longer, so starving it would show.
TIMEOUT = 5.0
# Low, so that even a slow flooder on a loaded machine is far over it; the burst admits the
# 50 registrations of the test itself (another principal, same settings).
API_RATE = 5
API_BURST = 60
FLOOD_SECONDS = 6.0
FLOODER = Path(__file__).with_name("flood_client.py")


class Beater:
    """One agent's session: a beat every INTERVAL, the delay of each ack recorded."""

    def __init__(self, running: Running, agent_id: str, token: str) -> None:
        self.session = open_stream(running, agent_id, token, bearer(token))
        self.sent: dict[int, float] = {}
        self.delays: list[tuple[float, float]] = []  # (time acked, delay)
        self.sequence = 0

    async def run(self, stop: asyncio.Event) -> None:
        welcome = await self.session.receive()
        assert welcome.WhichOneof("message") == "welcome"
        reader = asyncio.create_task(self._acks())
        try:
            while not stop.is_set():
                self.sequence += 1
                self.sent[self.sequence] = time.monotonic()
                self.session.send(beat=registry_pb2.SessionBeat(sequence=self.sequence))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), INTERVAL)
        finally:
            reader.cancel()
            self.session.close()

    async def _acks(self) -> None:
        while True:
            message = await self.session.receive(within=TIMEOUT * 2)
            if message.WhichOneof("message") == "ack":
                now = time.monotonic()
                self.delays.append((now, now - self.sent[message.ack.sequence]))


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def test_a_flood_does_not_starve_other_agents_heartbeats(servers: Callable[..., Any]) -> None:
    running: Running = await servers(
        api_keys=API_KEYS,
        heartbeat_interval=INTERVAL,
        heartbeat_timeout=TIMEOUT,
        rate_limit_api_rate=API_RATE,
        rate_limit_api_burst=API_BURST,
    )
    # Registered with the admin key: the flooder's budget and the agents' are apart by principal.
    agents = [await register(running, f"agent-{index}", ADMIN_KEY) for index in range(AGENTS)]
    beaters = [Beater(running, agent.agent.agent_id, agent.agent_token) for agent in agents]
    stop = asyncio.Event()
    beating = [asyncio.create_task(beater.run(stop)) for beater in beaters]

    async def statuses() -> dict[str, tuple[int, int]]:
        response = await running.stubs.registry.ListAgents(
            registry_pb2.ListAgentsRequest(), metadata=bearer(ADMIN_KEY)
        )
        return {agent.agent_id: (agent.status, agent.transitions) for agent in response.agents}

    # Quiet phase: the same sessions without the flood, for comparison.
    await asyncio.sleep(1.5)
    before = await statuses()
    assert all(status == agent_pb2.AGENT_STATUS_READY for status, _ in before.values())
    flood_started = time.monotonic()
    flooder = await asyncio.create_subprocess_exec(
        sys.executable,
        str(FLOODER),
        "--target",
        running.target,
        "--key",
        READER_KEY,
        "--seconds",
        str(FLOOD_SECONDS),
        "--concurrency",
        "64",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await asyncio.wait_for(flooder.communicate(), FLOOD_SECONDS + 30)
    flood_ended = time.monotonic()
    after = await statuses()
    stop.set()
    await asyncio.gather(*beating)
    result = json.loads(output)

    codes = result["codes"]
    refused, allowed = codes.get("RESOURCE_EXHAUSTED", 0), codes.get("OK", 0)
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert refused > 4 * allowed, codes
    # The bucket admits its burst plus the rate over the flood, and no more.
    assert allowed <= API_BURST + API_RATE * result["seconds"] * 1.1 + 5, result
    assert result["retry_hints"] == refused

    changed = {
        agent_id: (before[agent_id], after.get(agent_id))
        for agent_id in before
        if after.get(agent_id) != before[agent_id]
    }
    assert not changed, f"(status, transitions) changed during the flood: {changed}"
    quiet = [delay for beater in beaters for at, delay in beater.delays if at < flood_started]
    flooded = [
        delay for beater in beaters for at, delay in beater.delays if flood_started <= at <= flood_ended
    ]
    for beater in beaters:
        acked_at = [at for at, _ in beater.delays]
        gaps = [later - earlier for earlier, later in itertools.pairwise(acked_at)]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        assert max(gaps) < TIMEOUT, (
            f"{max(gaps):.3f} s without an ack, {acked_at[worst] - flood_started:.3f} s after the flood began"
            f" (flood lasted {flood_ended - flood_started:.3f} s); delays {[round(d, 3) for _, d in beater.delays]}"
        )
        assert len(beater.delays) >= beater.sequence - 1
    rate = (refused + allowed) / result["seconds"]
    print(
        f"\nflood: {refused + allowed} calls in {result['seconds']:.1f} s ({rate:.0f}/s), "
        f"{refused} refused RESOURCE_EXHAUSTED (with RetryInfo: {result['retry_hints']}), {allowed} allowed; "
        f"{AGENTS} agents' heartbeat ack delay quiet p50 {statistics.median(quiet) * 1000:.2f} ms "
        f"p99 {percentile(quiet, 0.99) * 1000:.2f} ms, during the flood p50 "
        f"{statistics.median(flooded) * 1000:.2f} ms p99 {percentile(flooded, 0.99) * 1000:.2f} ms "
        f"max {max(flooded) * 1000:.2f} ms ({len(flooded)} acks); none went DOWN"
    )
