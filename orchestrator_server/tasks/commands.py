"""Commands on one task take turns, and those that wait for their turn are folded into one commit.

A command decides on a draft of the committed task and the draft is committed on the condition
that the task is still at the revision it read. Commands on one task never run side by side in a
process (so the process never conflicts with itself): while one commit is in flight, the commands
that arrive for the same task wait, and when it answers they are all decided, in order, on one
draft of the newly committed task and committed together, as one change. Each still gets its own
answer: a command whose decision raises is refused alone, and one whose placement claim the store
refuses gets that refusal while the others decide again.

An agent's STARTED report is *lazy*: it waits up to `FOLD_WINDOW` for company before it commits,
so a short task's STARTED and its completion usually land in one commit instead of two. Anything
else that arrives for the task meanwhile commits at once and takes the STARTED along (in order,
so e.g. a queue timeout decided after it sees the task running).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from orchestrator.v1 import task_pb2
from orchestrator_server.errors import Unavailable
from orchestrator_server.store import ConditionFailed, PlacementClaim
from orchestrator_server.tasks.model import ActiveTask, TaskNotActive
from orchestrator_server.tasks.transitions import draft_of

log = logging.getLogger(__name__)

#: Decides a command on a draft of the committed task: None when there is nothing to commit, else
#: the placement claims the commit must also satisfy (usually none). It must raise, if it refuses,
#: before it changes the draft: the draft may carry other commands' decisions.
Decide = Callable[[ActiveTask, task_pb2.Task], "list[PlacementClaim] | None"]
#: Commits a draft on the condition that the task is at `revision` and the claims hold.
Commit = Callable[[task_pb2.Task, int, "list[PlacementClaim]"], Awaitable[None]]

# Times a command decides again after another process changed its task first.
MAX_CONFLICTS = 8
# Seconds a lazy command (an agent's STARTED) waits for another command to share its commit.
FOLD_WINDOW = 0.02


@dataclass(eq=False)
class Command:
    decide: Decide
    future: asyncio.Future[task_pb2.Task]
    lazy: bool
    conflicts: int = 0
    claims: bool = False

    def answer(self, task: task_pb2.Task | None = None, error: BaseException | None = None) -> None:
        if self.future.done():  # the caller went away; the commit stands
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(task)  # type: ignore[arg-type]


class TaskCommands:
    """Runs commands on unfinished tasks: one commit in flight per task, the waiting ones folded."""

    def __init__(
        self,
        active: dict[str, ActiveTask],
        commit: Commit,
        spawn: Callable[[Awaitable[object]], None],
    ) -> None:
        self._active = active
        self._commit = commit
        self._spawn = spawn

    async def run(self, task_id: str, decide: Decide, *, lazy: bool = False) -> task_pb2.Task:
        """Decides and commits `decide`; returns the task as committed. Raises TaskNotActive if the
        task is not unfinished here, and ConditionFailed when its placement claim was refused."""
        entry = self._active.get(task_id)
        if entry is None:
            raise TaskNotActive(task_id)
        command = Command(decide, asyncio.get_running_loop().create_future(), lazy)
        self._submit(entry, command)
        return await command.future

    def _submit(self, entry: ActiveTask, command: Command) -> None:
        entry.commands.append(command)
        if entry.writing:
            return  # folded into the next commit
        if all(waiting.lazy for waiting in entry.commands):
            if entry.fold_timer is None:
                entry.fold_timer = asyncio.get_running_loop().call_later(FOLD_WINDOW, self._start, entry)
            return
        self._start(entry)

    def _start(self, entry: ActiveTask) -> None:
        if entry.fold_timer is not None:
            entry.fold_timer.cancel()
            entry.fold_timer = None
        if not entry.writing and entry.commands:
            entry.writing = True
            self._spawn(self._write(entry))

    async def _write(self, entry: ActiveTask) -> None:
        try:
            while entry.commands:
                batch, entry.commands = entry.commands, []
                await self._fold(entry, batch)
        finally:
            entry.writing = False

    async def _fold(self, entry: ActiveTask, batch: list[Command]) -> None:
        task_id = entry.task.task_id
        current = self._active.get(task_id)
        if current is not entry:  # finished, or restored anew, while these waited
            for command in batch:
                if current is None:
                    command.answer(error=TaskNotActive(task_id))
                else:
                    self._submit(current, command)
            return
        draft = draft_of(entry.task)
        decided: list[Command] = []
        claims: list[PlacementClaim] = []
        changed = False
        for command in batch:
            try:
                wanted = command.decide(entry, draft)
            except Exception as refusal:  # refused alone: it left the draft as it was
                command.answer(error=refusal)
                continue
            decided.append(command)
            if wanted is not None:
                changed = True
                command.claims = bool(wanted)
                claims.extend(wanted)
        if not changed:
            for command in decided:
                command.answer(entry.task)
            return
        try:
            await self._commit(draft, entry.task.revision, claims)
        except ConditionFailed as conflict:
            self._conflicted(entry, decided, conflict)
        except Exception as error:  # the store is down, say: each caller hears it
            for command in decided:
                command.answer(error=error)
        except asyncio.CancelledError:
            for command in decided:
                command.future.cancel()
            raise
        else:
            committed = self._active.get(task_id)
            for command in decided:
                command.answer(committed.task if committed is not None else draft)

    def _conflicted(self, entry: ActiveTask, decided: list[Command], conflict: ConditionFailed) -> None:
        """Another process changed the task first (its commit is already projected), or the store
        refused a placement claim: the commands decide again on the newer state, except those
        whose claim was refused, which hear it."""
        task_id = entry.task.task_id
        again: list[Command] = []
        for command in decided:
            if conflict.entity_id != task_id and command.claims:
                command.answer(error=conflict)
            elif command.conflicts + 1 >= MAX_CONFLICTS:
                command.answer(
                    error=Unavailable(
                        f"task {task_id} kept changing while this request was decided; retry", 0.1
                    )
                )
            else:
                command.conflicts += 1
                again.append(command)
        if again and conflict.entity_id == task_id:
            log.info("task %s changed in another process; deciding again", task_id)
        entry.commands[:0] = again
