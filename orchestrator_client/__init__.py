"""Python SDK of the Orchestrator: `Agent` / `SyncAgent` for agents, `AdminClient` for operators.

The generated protocol types are re-exported, under stable names, in `orchestrator_client.v1`.
"""

from orchestrator_client.admin import TERMINAL_TASK_STATUSES, AdminClient
from orchestrator_client.agent import Agent, AgentStopped
from orchestrator_client.channel import ConnectionOptions, read_pem
from orchestrator_client.context import NonRetryableError, SyncTaskContext, TaskContext, TaskFailure
from orchestrator_client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OrchestratorError,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    from_grpc_error,
)
from orchestrator_client.retry import NO_RETRY, TRANSIENT_CODES, Backoff, Retry, RetryPolicy
from orchestrator_client.sync import SyncAgent

__all__ = [
    "NO_RETRY",
    "TERMINAL_TASK_STATUSES",
    "TRANSIENT_CODES",
    "Aborted",
    "AdminClient",
    "Agent",
    "AgentStopped",
    "AlreadyExists",
    "Backoff",
    "Cancelled",
    "ConnectionOptions",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NonRetryableError",
    "NotFound",
    "OrchestratorError",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Retry",
    "RetryPolicy",
    "SyncAgent",
    "SyncTaskContext",
    "TaskContext",
    "TaskFailure",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "from_grpc_error",
    "read_pem",
]
