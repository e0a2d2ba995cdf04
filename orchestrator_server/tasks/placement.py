"""Where pending tasks go: the queue of requirement groups, the placement pass, the strategies.

Pending tasks wait in one priority heap per requirement group (same type, capabilities, selector
and target; groups.py), so a pass costs O(groups) per placement however many tasks wait: a group no
agent fits is skipped whole, and says why. A pass runs when something changes (task created,
agent available, capacity freed, backoff elapsed), never on a polling loop; many changes in one
loop iteration make one pass. The pass only decides: each decision is committed by the scheduler
as a conditional claim (the agent's session epoch and a free slot), and the slot stays reserved
here until that commit answers, so a pass never books a slot twice.
"""

from __future__ import annotations

import asyncio
import heapq
import random
from collections.abc import Callable, Iterable

from orchestrator.v1 import agent_pb2, discovery_pb2, task_pb2
from orchestrator_server.agents import READY
from orchestrator_server.config import Config
from orchestrator_server.discovery import rendezvous_pick
from orchestrator_server.tasks.groups import Group, GroupKey
from orchestrator_server.tasks.model import PENDING, ActiveTask

STRATEGIES = {
    "least_loaded": discovery_pb2.LOAD_BALANCING_STRATEGY_LEAST_LOADED,
    "round_robin": discovery_pb2.LOAD_BALANCING_STRATEGY_ROUND_ROBIN,
    "random": discovery_pb2.LOAD_BALANCING_STRATEGY_RANDOM,
    "consistent_hash": discovery_pb2.LOAD_BALANCING_STRATEGY_CONSISTENT_HASH,
}


class Placer:
    """The pending queue and the placement pass over it."""

    def __init__(
        self,
        config: Config,
        rng: random.Random,
        *,
        agents: Callable[[], Iterable[agent_pb2.Agent]],
        has_session: Callable[[str], bool],
        held: Callable[[str], int],
        entry_of: Callable[[str], ActiveTask | None],
        start: Callable[[ActiveTask, agent_pb2.Agent], None],
    ) -> None:
        self._rng = rng
        self._agents = agents
        self._has_session = has_session
        self._held = held
        self._entry_of = entry_of
        self._start = start
        self._strategy = STRATEGIES[config.scheduling_strategy]
        self._round_robin = 0
        self._groups: dict[GroupKey, Group] = {}
        # Slots of placements whose commit has not answered yet, per agent.
        self._reserved: dict[str, int] = {}
        self._pass_scheduled = False
        #: Set while the unfinished tasks are restored after a start: no pass runs, so no task is
        #: placed before an older or more urgent one that is not restored yet.
        self.paused = False
        #: Tasks waiting in some heap (stale entries included); the pass stops early at zero.
        self.waiting = 0

    # -- the queue -------------------------------------------------------------------------------

    def group_for(self, entry: ActiveTask) -> Group:
        key = entry.group
        group = self._groups.get(key)
        if group is None:
            group = Group(key[0], key[1], entry.selector, key[3])
            self._groups[key] = group
        return group

    def push(self, entry: ActiveTask, *, kick: bool = True) -> None:
        entry.placeable_since = asyncio.get_running_loop().time()
        heapq.heappush(
            self.group_for(entry).heap, (-entry.task.spec.priority, entry.sequence, entry.task.task_id)
        )
        self.waiting += 1
        if kick:
            self.kick()

    def explain(self, group: Group) -> task_pb2.PendingReason:
        return group.explain(
            self._agents(), self._has_session, self.free_capacity, asyncio.get_running_loop().time()
        )

    # -- capacity --------------------------------------------------------------------------------

    def free_capacity(self, agent: agent_pb2.Agent) -> int:
        return agent.max_concurrent_tasks - self._held(agent.agent_id) - self._reserved.get(agent.agent_id, 0)

    def reserve(self, agent_id: str) -> None:
        self._reserved[agent_id] = self._reserved.get(agent_id, 0) + 1

    def unreserve(self, agent_id: str) -> None:
        left = self._reserved.get(agent_id, 0) - 1
        if left > 0:
            self._reserved[agent_id] = left
        else:
            self._reserved.pop(agent_id, None)

    def placeable(self, agent: agent_pb2.Agent) -> bool:
        return (
            agent.status == READY
            and not agent.draining
            and self.free_capacity(agent) > 0
            and self._has_session(agent.agent_id)
        )

    def pick_at_once(self, entry: ActiveTask) -> agent_pb2.Agent | None:
        """The agent a task being created goes to in its creating commit, without waiting for a
        pass (one commit and one disk flush less before the agent has it), its slot reserved until
        that commit answers. Only while nothing waits: a new task must not overtake queued ones."""
        if self.waiting:
            return None
        group = self.group_for(entry)
        candidates = [agent for agent in self._agents() if self.placeable(agent) and group.fits(agent)]
        if not candidates:
            return None
        agent = self.choose(entry, candidates)
        self.reserve(agent.agent_id)
        return agent

    # -- the pass --------------------------------------------------------------------------------

    def kick_for(self, agent: agent_pb2.Agent) -> None:
        """`agent` may take (more) work. A pass leaves no waiting group with a free agent that fits
        it, so only this agent can change that: a pass (O(agents)) runs only if it can take some
        waiting group's work. Every commit of an alive agent calls this, so 10k agents
        re-attaching with tasks waiting that none of them fits no longer make 10k passes."""
        if (
            self.waiting
            and self.placeable(agent)
            and any(group.heap and group.fits(agent) for group in self._groups.values())
        ):
            self.kick()

    def kick(self) -> None:
        """Runs one placement pass soon; many kicks in one loop iteration make one pass."""
        if not self._pass_scheduled:
            self._pass_scheduled = True
            asyncio.get_running_loop().call_soon(self._placement_pass)

    def _placement_pass(self) -> None:
        self._pass_scheduled = False
        # Most kicks (registrations, reconnects, freed capacity) find nothing waiting: stop before
        # looking at every agent.
        if self.waiting == 0 or self.paused:
            return
        agents = [agent for agent in self._agents() if self.placeable(agent)]
        fitting: dict[GroupKey, list[agent_pb2.Agent]] = {}
        for key, group in self._groups.items():
            if group.heap:
                fitting[key] = [agent for agent in agents if group.fits(agent)]
        while True:
            best: tuple[tuple[int, int, str], GroupKey] | None = None
            for key, candidates in fitting.items():
                heap = self._groups[key].heap
                self._drop_stale(heap)
                if not heap:
                    continue
                candidates[:] = [agent for agent in candidates if self.free_capacity(agent) > 0]
                if candidates and (best is None or heap[0] < best[0]):
                    best = (heap[0], key)
            if best is None:
                break
            _, _, task_id = heapq.heappop(self._groups[best[1]].heap)
            self.waiting -= 1
            entry = self._entry_of(task_id)
            assert entry is not None  # _drop_stale leaves only live pending tasks on top
            agent = self.choose(entry, fitting[best[1]])
            self.reserve(agent.agent_id)
            entry.placing = True
            self._start(entry, agent)
        # Groups still waiting get an explanation (reused for a second, so this stays cheap).
        for key in fitting:
            if self._groups[key].heap:
                self.explain(self._groups[key])
            else:
                del self._groups[key]  # made again by the next task of its kind

    def _drop_stale(self, heap: list[tuple[int, int, str]]) -> None:
        """Heap entries are removed lazily: a task may have been cancelled, placed by hand or be
        backing off after a failure."""
        while heap:
            entry = self._entry_of(heap[0][2])
            if (
                entry is not None
                and entry.task.status == PENDING
                and entry.backoff_timer is None
                and not entry.placing
            ):
                return
            heapq.heappop(heap)
            self.waiting -= 1

    def choose(self, entry: ActiveTask, candidates: list[agent_pb2.Agent]) -> agent_pb2.Agent:
        # A retry prefers an agent that has not tried the task yet.
        tried = {attempt.agent_id for attempt in entry.task.attempts}
        fresh = [agent for agent in candidates if agent.agent_id not in tried] or candidates
        spec = entry.task.spec
        if spec.routing_key or self._strategy == discovery_pb2.LOAD_BALANCING_STRATEGY_CONSISTENT_HASH:
            return rendezvous_pick(spec.routing_key or entry.task.task_id, fresh)
        if self._strategy == discovery_pb2.LOAD_BALANCING_STRATEGY_RANDOM:
            return self._rng.choice(fresh)
        if self._strategy == discovery_pb2.LOAD_BALANCING_STRATEGY_ROUND_ROBIN:
            self._round_robin += 1
            return fresh[self._round_robin % len(fresh)]
        return min(fresh, key=self._load)

    def _load(self, agent: agent_pb2.Agent) -> tuple[float, float, str]:
        """As discovery's load score, counting the slots this pass has just reserved."""
        capacity = max(agent.max_concurrent_tasks, 1)
        in_use = agent.max_concurrent_tasks - self.free_capacity(agent)
        return (in_use / capacity, agent.load.cpu, agent.agent_id)
