"""Domain errors: what went wrong, in terms of the caller's request, independent of the transport.

The gRPC layer turns them into a status with google.rpc details; the REST gateway maps that status
to HTTP. Nothing here knows about gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence


class OrchestratorError(Exception):
    """Base of the errors a caller can cause or must handle."""

    #: Canonical code name, as in google.rpc.Code.
    code: str = "UNKNOWN"
    #: Machine-readable reason (google.rpc.ErrorInfo) for errors a client must tell apart.
    reason: str = ""
    #: Seconds after which trying again makes sense (google.rpc.RetryInfo), if known.
    retry_after: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(OrchestratorError):
    """The request is malformed; `violations` names each bad field."""

    code = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[tuple[str, str]], message: str | None = None) -> None:
        self.violations = list(violations)
        summary = "; ".join(f"{field}: {why}" for field, why in self.violations)
        super().__init__(message or f"invalid request: {summary}")

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls([(field, description)])


class NotFound(OrchestratorError):
    code = "NOT_FOUND"


class AlreadyExists(OrchestratorError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(OrchestratorError):
    code = "FAILED_PRECONDITION"


class Aborted(OrchestratorError):
    code = "ABORTED"


class Unauthenticated(OrchestratorError):
    code = "UNAUTHENTICATED"


class PermissionDenied(OrchestratorError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(OrchestratorError):
    """Over a limit; `retry_after` (seconds) says when trying again makes sense."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(OrchestratorError):
    code = "UNAVAILABLE"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
