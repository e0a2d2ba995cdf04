"""`AdminClient`: agents, health, discovery and tasks for operators and task submitters.

Every unary method takes `timeout` (seconds, the whole call's deadline; the client's default when
None). Methods whose effect does not depend on how often they run (gets, lists, discovery,
RegisterAgent, and CreateTask with an idempotency key) are retried by the client's `Retry` (by
default on UNAVAILABLE, with exponential backoff and full jitter, each attempt getting what is left
of the deadline, as google-api-core does); other calls are tried once, because a retry after a lost
answer could act twice. Paginated lists are async iterators that fetch pages as they are consumed.
Watches are async iterators that reconnect on their own (on the transient codes of
`orchestrator_client.retry`) and resume from the last revision they delivered.

By concern: `calls` (replicas, retries, pages, resumable watches), `agents` (registry and health),
`discovery`, `tasks`. Everything public is importable from here, as when this was one module.
"""

from orchestrator_client.admin.agents import AgentAdmin
from orchestrator_client.admin.discovery import DiscoveryAdmin
from orchestrator_client.admin.tasks import TERMINAL_TASK_STATUSES, TaskAdmin

__all__ = ["TERMINAL_TASK_STATUSES", "AdminClient"]


class AdminClient(AgentAdmin, DiscoveryAdmin, TaskAdmin):
    """Asyncio client of the orchestrator's admin surface. Use as `async with AdminClient(...)`."""
