"""The task commands nobody calls: committing the placement pass's decisions, queue and run timeouts,
and failover (the registry's AgentObserver). Only the leader times tasks out and moves work; a
replica that becomes leader acts on what fell due meanwhile (`cluster_changed`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from orchestrator.v1 import agent_pb2, task_pb2
from orchestrator_server.agents import new_id
from orchestrator_server.metrics import FAILOVERS
from orchestrator_server.store import ConditionFailed, PlacementClaim
from orchestrator_server.tasks import transitions
from orchestrator_server.tasks.model import (
    ASSIGNED,
    PENDING,
    TIMED_OUT,
    ActiveTask,
    TaskNotActive,
    current_attempt,
)
from orchestrator_server.tasks.write_path import TaskWritePath

log = logging.getLogger(__name__)

# Seconds before the queue is looked at again after the store refused a placement (the agent's
# session or capacity changed meanwhile; the change that explains it usually wakes the pass first).
REFUSED_PLACEMENT_RETRY = 0.05


class TaskReactions(TaskWritePath):
    """What follows from the placement pass, the timers and the agents' comings and goings."""

    # -- placement -----------------------------------------------------------------------------

    def _start_placement(self, entry: ActiveTask, agent: agent_pb2.Agent) -> None:
        self._spawn(self._commit_placement(entry, agent.agent_id, agent.session.epoch))

    async def _commit_placement(self, entry: ActiveTask, agent_id: str, epoch: int) -> None:
        """Commits the pass's decision: on the condition that the agent still has that session and
        a free slot, so two decisions (of this process or another) never book one slot twice."""
        task_id = entry.task.task_id
        refused = False

        def decide(current: ActiveTask, draft: task_pb2.Task) -> list[PlacementClaim] | None:
            if current is not entry or draft.status != PENDING:
                return None
            transitions.place(draft, agent_id, new_id("att_"))
            return [PlacementClaim(task_id, agent_id, epoch)]

        try:
            await self._command(task_id, decide)
        except ConditionFailed as refusal:
            refused = True
            log.debug("placement of %s on %s refused by the store: %s", task_id, agent_id, refusal)
        except TaskNotActive:
            pass
        finally:
            entry.placing = False
            self._placer.unreserve(agent_id)
        if (
            entry is self._active.get(task_id)
            and entry.task.status == PENDING
            and entry.backoff_timer is None
        ):
            self._placer.push(entry, kick=not refused)
            if refused:
                asyncio.get_running_loop().call_later(REFUSED_PLACEMENT_RETRY, self._placer.kick)
        else:
            self._placer.kick()

    # -- timers --------------------------------------------------------------------------------

    def _queue_timed_out(self, task_id: str) -> None:
        entry = self._active.get(task_id)
        if entry is None or entry.task.status not in (PENDING, ASSIGNED):
            return
        entry.queue_timer = None
        if not self._registry.cluster.leader:
            return  # the leader times tasks out (cluster_changed re-arms this if it becomes leader)
        message = "waited longer than its queue timeout"
        if entry.task.status == PENDING:  # say what it waited for
            message += f"; {self._explained(entry).pending_reason.message}"

        def decide(current: ActiveTask, draft: task_pb2.Task) -> list[PlacementClaim] | None:
            if draft.status not in (PENDING, ASSIGNED):
                return None  # it started meanwhile
            transitions.cancel(draft, message, "QUEUE_TIMEOUT", TIMED_OUT)
            return []

        self._spawn(self._command(task_id, decide))

    def _run_timed_out(self, task_id: str, attempt_id: str) -> None:
        entry = self._active.get(task_id)
        if entry is not None:
            entry.run_timer = None
        if not self._registry.cluster.leader:
            return  # as for the queue timeout

        def decide(current: ActiveTask, draft: task_pb2.Task) -> list[PlacementClaim] | None:
            # The draft, not the committed task: a completion folded before this decision counts.
            attempt = current_attempt(draft)
            if attempt is None or attempt.attempt_id != attempt_id:
                return None
            transitions.run_timed_out(draft, attempt, self._backoff)
            return []

        self._spawn(self._command(task_id, decide))

    # -- failover (AgentObserver) --------------------------------------------------------------

    def agent_available(self, agent_id: str) -> None:
        self._failover.agent_back(agent_id)
        agent = self._registry.find(agent_id)
        if agent is not None:
            self._placer.kick_for(agent)

    def agent_lost(self, agent_id: str, *, graceful: bool) -> None:
        if self._held.get(agent_id):
            self._failover.agent_lost(agent_id, graceful=graceful)

    def agent_reattached(self, agent_id: str, running_attempt_ids: Sequence[str]) -> list[str]:
        """The agent is back: it keeps what it still runs; assignments it never got are pushed again;
        attempts it forgot (it restarted) go back to the queue."""
        running = set(running_attempt_ids)
        kept: list[str] = []
        for task_id in list(self._held.get(agent_id, ())):
            entry = self._active[task_id]
            attempt = entry.current_attempt
            if attempt is None:
                continue
            if attempt.attempt_id in running:
                kept.append(attempt.attempt_id)
            elif attempt.status == task_pb2.ATTEMPT_STATUS_ASSIGNED:
                self._push_assignment(entry, attempt)
            else:
                self._spawn(self._lose(task_id, agent_id, "agent reconnected without it"))
        return kept

    def cluster_changed(self, leader: bool) -> None:
        """On becoming leader (or leading again after a gap): what fell due while no replica led
        is acted on now. Timers that fired elsewhere were dropped there; they are armed again here
        (at once if due), and work of agents down with no grace left to wait for moves."""
        if not leader:
            return
        for entry in list(self._active.values()):
            if entry.queue_timer is None and entry.task.status in (PENDING, ASSIGNED):
                self._arm_queue_timer(entry)
            attempt = entry.current_attempt
            if entry.run_timer is None and attempt is not None:
                self._arm_run_timer(entry, attempt)
        for agent_id in self.agents_down_holding_work():
            if not self._failover.waiting(agent_id):
                self._move_work(agent_id, "agent down (failover by a new leader)")

    async def recover(self) -> None:
        """After `restore_held`: work held by agents that were already down before the restart
        moves before sessions and tasks are served (they had their grace then). Only the leader
        moves work; a replica that becomes leader later does it then (`cluster_changed`)."""
        if not self._registry.cluster.leader:
            return
        moves = [
            self._lose(task_id, agent_id, "agent was down when the orchestrator restarted")
            for agent_id in self.agents_down_holding_work()
            for task_id in self._held.get(agent_id, ())
        ]
        if moves:
            FAILOVERS.inc(len(moves))
            log.info("failover: moving %d tasks off agents down at the restart", len(moves))
            await asyncio.gather(*moves)

    def _move_work(self, agent_id: str, reason: str) -> None:
        if not self._registry.cluster.leader:
            return  # failover runs once for the cluster, on the leader
        held = list(self._held.get(agent_id, ()))
        for task_id in held:
            self._spawn(self._lose(task_id, agent_id, reason))
        if held:
            FAILOVERS.inc(len(held))
            log.info("failover: moving %d tasks off agent %s (%s)", len(held), agent_id, reason)

    async def _lose(self, task_id: str, agent_id: str, reason: str) -> None:
        def decide(current: ActiveTask, draft: task_pb2.Task) -> list[PlacementClaim] | None:
            attempt = current_attempt(draft)  # as for the run timeout
            if attempt is None or attempt.agent_id != agent_id:
                return None  # finished or moved meanwhile
            transitions.lose(draft, reason)
            return []

        await self._command(task_id, decide)
