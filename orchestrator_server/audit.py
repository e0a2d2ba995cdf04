"""Audit records of mutating calls (logger `orchestrator.audit`), and the sampling of the log lines
of refused calls. The policy (`policy.py`) opens an `AuditScope` around each call its rule audits."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from orchestrator_server.auth import Audit, Kind, Rule, peer_host
from orchestrator_server.calls import Call, current_call
from orchestrator_server.errors import OrchestratorError
from orchestrator_server.grpc_api import telemetry
from orchestrator_server.limits import LogSampler

audit_log = logging.getLogger("orchestrator.audit")


def outcome(error: BaseException | None) -> str:
    """The code name an audit record and the access log give a call that ended with `error`."""
    if error is None:
        return "OK"
    if isinstance(error, OrchestratorError):
        return error.code
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return "INTERNAL"


class AuditScope:
    """One structured record per mutating call: who, what, target, when, result. Used as a context
    manager around the call; `response` is what it answered, `code` overrides the outcome (grpc's
    abort names its own code)."""

    def __init__(self, call: Call, rule: Rule, request: Any, request_id: Callable[[], str]) -> None:
        self.call = call
        self.rule = rule
        self.request = request
        self.response: Any = None
        self.code: str | None = None
        self._request_id = request_id
        self._started = 0.0

    def __enter__(self) -> AuditScope:
        self._started = time.monotonic()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._write(self.code or outcome(error))

    def _write(self, code: str) -> None:
        call, principal = self.call, self.call.principal
        if (
            self.rule.audit is Audit.OVERRIDE
            and principal is not None
            and principal.kind is Kind.AGENT
            and code != "PERMISSION_DENIED"  # an agent reaching for another's work is worth a record
        ):
            return
        who = principal.name if principal is not None else "unauthenticated"
        target = " ".join(
            f"{name}={value}" for name, value in _audit_target(self.request, self.response).items()
        )
        rid = telemetry.request_id.get() or self._request_id()
        audit_log.info(
            "audit who=%s what=%s %s result=%s peer=%s",
            who,
            call.method.rsplit("/", 1)[-1],
            target or "target=-",
            code,
            call.peer,
            extra={
                "principal": who,
                "method": call.method,
                "target": target,
                "code": code,
                "peer": call.peer,
                "request_id": rid,
                "duration_ms": round((time.monotonic() - self._started) * 1000, 3),
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )


def _audit_target(request: Any, response: Any) -> dict[str, str]:
    """What the call acted on: ids named by the request, and those the server created (a new
    task's id, a registered agent's id) from the response; with names and types to read by."""
    target: dict[str, str] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, str) and value and name not in target:
            # Values of refused requests are unchecked: bounded and without spaces, one token each.
            target[name] = "".join(
                char if char.isprintable() and not char.isspace() else "?" for char in value[:128]
            )

    created = getattr(response, "agent", None) or getattr(response, "task", None)
    for source in (request, created, getattr(request, "spec", None), getattr(created, "spec", None)):
        if source is None:
            continue
        for name, label in _AUDIT_FIELDS:
            put(label, getattr(source, name, None))
    return target


#: Fields named in audit records (request or response field, label), in the order written.
_AUDIT_FIELDS = (
    ("agent_id", "agent_id"),
    ("task_id", "task_id"),
    ("name", "name"),
    ("instance_id", "instance"),
    ("type", "type"),
)


class RefusalSampler(logging.Filter):
    """Samples the log lines of calls refused for want of a credential or of budget
    (UNAUTHENTICATED, RESOURCE_EXHAUSTED): per logger, peer host and code, the first line of each
    interval is written and says how many like it were suppressed before it. A credential flood
    once wrote one line per call (31k calls: 32 MB of log in 15 s). Refusals of authenticated
    callers (PERMISSION_DENIED) are always written: they name who tried what."""

    CODES = frozenset({"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"})

    def __init__(self, sampler: LogSampler) -> None:
        super().__init__()
        self._sampler = sampler

    def filter(self, record: logging.LogRecord) -> bool:
        code = getattr(record, "code", None)
        if code not in self.CODES:
            return True
        call = current_call()
        peer = getattr(record, "peer", None) or (call.peer if call is not None else "")
        suppressed = self._sampler.admit((record.name, peer_host(str(peer)), str(code)))
        if suppressed is None:
            return False
        if suppressed:
            record.msg = f"{record.msg} (and {suppressed} more like it from this peer, not logged)"
        return True


_SAMPLER = RefusalSampler(LogSampler(interval=10.0))


def sample_refusals() -> None:
    """Samples the access and audit lines of refused calls (once per process)."""
    for logger in (telemetry.access_log, audit_log):
        if _SAMPLER not in logger.filters:
            logger.addFilter(_SAMPLER)
