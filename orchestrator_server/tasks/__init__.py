"""Tasks: queueing, placement, attempts, retries, timeouts and failover.

- `scheduler.py`   the commands callers make (create, reports, cancel, assign): `TaskScheduler`
- `reactions.py`   the commands nobody calls: committing placements, timeouts, failover
- `write_path.py`  how a command decides on a draft of the committed task and commits it
- `projection.py`  unfinished tasks as committed; holds, queue, timers and pushes follow from it
- `transitions.py` the state machine, as changes to a draft of the committed task
- `changes.py`     bounded events: what a change carries, and putting a task back together
- `placement.py`   the pending queue, the placement pass and the strategies
- `groups.py`      requirement groups, and why a group's tasks wait
- `failover.py`    when a lost agent's work moves: grace, and pauses during mass drops
- `validation.py`  checks of specs and reports
- `model.py`       per-task bookkeeping and the shared constants
"""

from orchestrator_server.tasks.model import (
    MAX_ATTEMPTS_LIMIT,
    MAX_KEPT_ATTEMPTS,
    MAX_REJECTIONS,
    TERMINAL,
)
from orchestrator_server.tasks.scheduler import TaskScheduler

__all__ = ["MAX_ATTEMPTS_LIMIT", "MAX_KEPT_ATTEMPTS", "MAX_REJECTIONS", "TERMINAL", "TaskScheduler"]
