"""When an agent's work moves elsewhere: after a grace period, and not during a mass drop.

An agent that drops without a goodbye keeps its attempts for `FAILOVER_GRACE`: most come back
within it (a restart, a network blip) and carry on. When many agents drop together, the fault is
more likely ours (our network, our host) than theirs: failover pauses instead of moving every task
at once, and resumes for the agents still down when the drops stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from orchestrator.v1 import agent_pb2
from orchestrator_server.config import Config
from orchestrator_server.metrics import FAILOVER_PAUSES

log = logging.getLogger(__name__)

ALIVE = frozenset(
    {agent_pb2.AGENT_STATUS_READY, agent_pb2.AGENT_STATUS_DEGRADED, agent_pb2.AGENT_STATUS_DRAINING}
)
GONE = frozenset({agent_pb2.AGENT_STATUS_DOWN, agent_pb2.AGENT_STATUS_DEREGISTERED})


class Failover:
    """Decides when the work of a lost agent moves; `move(agent_id, reason)` moves it."""

    def __init__(
        self,
        config: Config,
        find_agent: Callable[[str], agent_pb2.Agent | None],
        agents: Callable[[], Iterable[agent_pb2.Agent]],
        move: Callable[[str, str], None],
    ) -> None:
        self._config = config
        self._find_agent = find_agent
        self._agents = agents
        self._move = move
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._recent_drops: list[float] = []
        self._paused_until = 0.0
        self.deferred: set[str] = set()

    def agent_back(self, agent_id: str) -> None:
        timer = self._timers.pop(agent_id, None)
        if timer is not None:
            timer.cancel()
        self.deferred.discard(agent_id)

    def waiting(self, agent_id: str) -> bool:
        """The agent's work waits for its grace or for a pause to end (it moves later by itself)."""
        return agent_id in self._timers or agent_id in self.deferred

    def agent_lost(self, agent_id: str, *, graceful: bool) -> None:
        """The agent holding work went DOWN (graceful: it said goodbye or was deregistered)."""
        if graceful or self._config.failover_grace == 0:
            if not graceful and self._note_drop():
                self.deferred.add(agent_id)
                return
            self._move(agent_id, "agent left" if graceful else "agent down")
            return
        self._note_drop()
        previous = self._timers.pop(agent_id, None)
        if previous is not None:
            previous.cancel()
        self._timers[agent_id] = asyncio.get_running_loop().call_later(
            self._config.failover_grace, self._grace_expired, agent_id
        )

    def _grace_expired(self, agent_id: str) -> None:
        self._timers.pop(agent_id, None)
        agent = self._find_agent(agent_id)
        if agent is not None and agent.status not in GONE:
            return  # came back in time
        if self.paused:
            self.deferred.add(agent_id)
            return
        self._move(agent_id, f"agent down longer than the failover grace ({self._config.failover_grace:g} s)")

    def _note_drop(self) -> bool:
        """Records an unplanned drop; True when failover is (now) paused because too many agents
        dropped together — a sign of our own network failing, not of theirs."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        window = self._config.mass_failure_window
        self._recent_drops = [at for at in self._recent_drops if now - at <= window]
        self._recent_drops.append(now)
        alive = sum(1 for agent in self._agents() if agent.status in ALIVE)
        dropped = len(self._recent_drops)
        if (
            dropped >= self._config.mass_failure_min_agents
            and dropped >= self._config.mass_failure_threshold * (alive + dropped)
        ):
            if not self.paused:
                log.warning(
                    "failover paused: %d agents dropped within %.1f s (%d still alive)",
                    dropped,
                    window,
                    alive,
                )
                FAILOVER_PAUSES.inc()
            self._paused_until = now + window
            loop.call_at(self._paused_until, self._maybe_resume)
        return self.paused

    @property
    def paused(self) -> bool:
        return asyncio.get_running_loop().time() < self._paused_until

    def paused_reason(self) -> str:
        return (
            f"{len(self._recent_drops)} agents dropped within {self._config.mass_failure_window:g} s; "
            f"{len(self.deferred)} failovers deferred"
        )

    def _maybe_resume(self) -> None:
        if self.paused:
            return  # another drop extended the pause; its own timer will come
        deferred, self.deferred = self.deferred, set()
        if deferred:
            log.warning("failover resumed: moving work of %d agents still down", len(deferred))
        for agent_id in deferred:
            agent = self._find_agent(agent_id)
            if agent is None or agent.status in GONE:
                self._move(agent_id, "agent down (failover resumed after a mass drop)")

    def shutdown(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
