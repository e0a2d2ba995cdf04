"""The agent side of the orchestrator, by concern: `core` (the `Agent` and its stop), `session`
(register, hello, beats, reconnecting), `attempts` (running handlers, reporting results), `host`
(instance id, load). Everything public is importable from here, as when this was one module.
"""

from orchestrator_client.agent.attempts import AsyncHandler, SyncHandler, TaskResult
from orchestrator_client.agent.core import (
    DEFAULT_RECONNECT_BACKOFF,
    PLANNED_RESTART_WINDOW,
    Agent,
    AgentStopped,
)
from orchestrator_client.agent.host import default_instance_id
from orchestrator_client.agent.session import IDENTITY_IN_USE, CheckFunction

__all__ = [
    "DEFAULT_RECONNECT_BACKOFF",
    "IDENTITY_IN_USE",
    "PLANNED_RESTART_WINDOW",
    "Agent",
    "AgentStopped",
    "AsyncHandler",
    "CheckFunction",
    "SyncHandler",
    "TaskResult",
    "default_instance_id",
]
