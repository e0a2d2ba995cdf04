from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from scripted_orchestrator import ScriptedOrchestrator

from orchestrator_client import Agent, Backoff


@pytest.fixture
async def orchestrator() -> AsyncIterator[ScriptedOrchestrator]:
    server = ScriptedOrchestrator()
    await server.start()
    yield server
    await server.stop()


class SleepRecorder:
    """Stands in for asyncio.sleep: records the pauses the SDK chose and yields only briefly.

    The pause is still a real (tiny) wait so a retry loop cannot spin the event loop; with `real`
    it is the full chosen pause (for tests where deadlines must see the time pass).
    """

    def __init__(self, real: bool = False) -> None:
        self.real = real
        self.delays: list[float] = []
        self.on_sleep: Callable[[int], Any] | None = None

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.on_sleep is not None:
            result = self.on_sleep(len(self.delays))
            if asyncio.iscoroutine(result):
                await result
        await asyncio.sleep(delay if self.real else 0.01)


@pytest.fixture
def sleeps() -> SleepRecorder:
    return SleepRecorder()


class FixedRandom:
    """A `random()` that returns the given values in turn (then the last one forever)."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def __call__(self) -> float:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


@pytest.fixture
async def make_agent(
    orchestrator: ScriptedOrchestrator, sleeps: SleepRecorder
) -> AsyncIterator[Callable[..., Agent]]:
    """Agents against the scripted orchestrator, stopped at the end of the test."""
    agents: list[Agent] = []

    def make(**options: Any) -> Agent:
        options.setdefault("name", "test-agent")
        options.setdefault("type", "test")
        options.setdefault("instance_id", "instance-1")
        options.setdefault("handle_signals", False)
        options.setdefault("sleep", sleeps)
        options.setdefault("reconnect_backoff", Backoff(initial=0.01, maximum=0.05))
        options.setdefault("shutdown_grace", 2.0)
        agent = Agent(options.pop("target", orchestrator.target), **options)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        if agent._session_task is not None:
            await agent.stop(grace=0)
