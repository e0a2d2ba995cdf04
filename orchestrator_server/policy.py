"""The checks of every call, whichever transport carries it, in the order they run:

1. `Policy.begin` opens the call's record (method, rule from `auth.RULES`, the caller's address).
2. `Policy.audited` records who made each mutating call, what it was and how it ended
   (logger `orchestrator.audit`), around everything below.
3. `Policy.admit` authenticates the caller (API key or agent credential) and applies the call's
   rule; a request that could not be decoded ends here as INVALID_ARGUMENT.
4. `Policy.meter` draws from the caller's token bucket (API calls and session traffic apart);
   `open_stream` caps its open streams.

Both adapters call these: the gRPC interceptors (`grpc_api/interceptors.py`) and the REST
gateway's in-process dispatch (`gateway/inprocess.py`), so a REST call and a gRPC call are held to
the same rules, budgets and audit records. Domain errors become one google.rpc.Status here
(`error_status`), which each transport writes in its own way. Servicers never check credentials;
what they take from here is `acting_agent_id()`, `caller_scope()` and `authenticated_caller()`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from orchestrator_server.auth import (
    RULES,
    Access,
    AgentVerifier,
    Audit,
    Authenticator,
    Budget,
    KeyRing,
    Kind,
    Principal,
    Rule,
    check_security_config,
    forwarded_peer,
    peer_host,
)
from orchestrator_server.config import Config
from orchestrator_server.errors import (
    InvalidArgument,
    OrchestratorError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from orchestrator_server.grpc_api import telemetry
from orchestrator_server.limits import LogSampler, RateLimiter, StreamSlots
from orchestrator_server.metrics import count_rate_limited

log = logging.getLogger(__name__)
audit_log = logging.getLogger("orchestrator.audit")

Metadata = Iterable[tuple[str, str | bytes]]


@dataclass
class Call:
    """What the policy learned about the call in progress."""

    method: str
    rule: Rule | None
    #: The caller's address: the connection's (gRPC), the HTTP client's (the in-process gateway),
    #: or the one a gateway signed (`auth.forwarded_peer`).
    peer: str
    principal: Principal | None = None
    #: The agent the call acts for: the agent credential's, or a Heartbeat's hello's.
    agent_id: str = ""


@dataclass
class StreamSlot:
    """The stream slot of one call: keyed by the principal, or for a session by its agent once the
    hello is read."""

    key: str | None = None
    held: bool = False


# Each gRPC call runs in its own task; the gateway resets it after each request (`Policy.end`).
_current: ContextVar[Call | None] = ContextVar("orchestrator_call", default=None)


def current_call() -> Call | None:
    return _current.get()


def acting_agent_id() -> str | None:
    """The agent an agent credential restricts the current call to; None for keys and when
    authentication is off (then no holder check applies beyond the attempt id)."""
    call = _current.get()
    if call is None or call.principal is None or call.principal.kind is not Kind.AGENT:
        return None
    return call.principal.agent_id


def caller_scope() -> str:
    """Whose idempotency keys the current call uses: its API key or agent; "" when anonymous
    (authentication off), so every caller then shares one scope as before."""
    call = _current.get()
    if call is None or call.principal is None or call.principal.kind is Kind.ANONYMOUS:
        return ""
    return call.principal.name


def authenticated_caller() -> bool:
    """Whether the current call was made with a credential (False when authentication is off):
    credentials issued to an unauthenticated caller stop working once keys are configured."""
    call = _current.get()
    return call is not None and call.principal is not None and call.principal.kind is not Kind.ANONYMOUS


class Malformed:
    """What stands for a request whose bytes are not the method's message."""

    def __init__(self, error: DecodeError) -> None:
        self.reason = str(error)[:256]

    def error(self) -> InvalidArgument:
        return InvalidArgument.field("request", f"not a valid message: {self.reason}")


# -- errors --------------------------------------------------------------------------------------


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def error_status(error: OrchestratorError) -> status_pb2.Status:
    """The google.rpc.Status of a domain error, with BadRequest, RetryInfo and ErrorInfo details
    where they apply: what a gRPC caller gets in its trailer and a REST caller in its body."""
    details: list[any_pb2.Any] = []
    if isinstance(error, InvalidArgument):
        details.append(
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                        for field, description in error.violations
                    ]
                )
            )
        )
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    if error.reason:
        details.append(
            _packed(error_details_pb2.ErrorInfo(reason=error.reason, domain="orchestrator.optiinfra"))
        )
    return status_pb2.Status(
        code=grpc.StatusCode[error.code].value[0], message=error.message, details=details
    )


def failure_status(error: BaseException, method: str) -> status_pb2.Status:
    """The status an exception ends a call with: its own for domain errors, UNIMPLEMENTED for what
    is not implemented, a bare INTERNAL (and a logged traceback) for anything else."""
    if isinstance(error, OrchestratorError):
        return error_status(error)
    if isinstance(error, NotImplementedError):
        return status_pb2.Status(
            code=grpc.StatusCode.UNIMPLEMENTED.value[0], message=f"{method} is not implemented"
        )
    log.error("unexpected error in %s", method, exc_info=error)
    return status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")


def outcome(error: BaseException | None) -> str:
    """The code name an audit record and the access log give a call that ended with `error`."""
    if error is None:
        return "OK"
    if isinstance(error, OrchestratorError):
        return error.code
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return "INTERNAL"


# -- the policy ----------------------------------------------------------------------------------


class Policy:
    """Authentication, authorization, rate and stream limits and audit, for every transport."""

    def __init__(self, config: Config, agents: AgentVerifier, *, client_address_secret: str = "") -> None:
        check_security_config(config)
        _sample_refusals()
        keys = KeyRing(config)
        if not keys.enabled:
            log.warning(
                "no API keys configured (API_KEYS / API_KEYS_FILE): authentication is OFF and anyone "
                "who can reach this server may call every RPC%s",
                "" if config.environment != "production" else " (ALLOW_INSECURE_PRODUCTION=true)",
            )
        else:
            log.info(
                "authentication on: %d API keys%s",
                len(keys),
                f" from {config.api_keys_file}" if config.api_keys_file else "",
            )
            _reload_on_sighup(keys)
        self.auth = Authenticator(keys, agents)
        self.max_message_bytes = config.max_message_bytes
        enabled = config.rate_limit_enabled
        #: Failed authentications per peer host: past its budget a peer's failures answer
        #: RESOURCE_EXHAUSTED, so a credential flood costs the server (and its log) little.
        self._failures = RateLimiter(config.auth_failure_rate if enabled else 0.0, config.auth_failure_burst)
        self._api = RateLimiter(config.rate_limit_api_rate if enabled else 0.0, config.rate_limit_api_burst)
        self._session = RateLimiter(
            config.rate_limit_session_rate if enabled else 0.0, config.rate_limit_session_burst
        )
        self._slots = StreamSlots(config.max_sessions_per_principal)
        #: Signs the client address a gateway forwards as metadata (`auth.forwarded_peer`).
        self._secret = client_address_secret

    # -- the call's record ------------------------------------------------------------------------

    def begin(self, method: str, peer: str, metadata: Metadata = ()) -> tuple[Call, Token[Call | None]]:
        """Opens the call's record; `metadata` may carry a client address a gateway signed.
        The token resets it (`end`) where one task serves several calls."""
        if self._secret:
            peer = forwarded_peer(metadata, self._secret, peer)
        call = Call(method, RULES.get(method), peer)
        return call, _current.set(call)

    @staticmethod
    def end(token: Token[Call | None]) -> None:
        _current.reset(token)

    # -- authentication and authorization ---------------------------------------------------------

    def admit(self, call: Call, metadata: Metadata, request: Any) -> None:
        """Authenticates the caller and applies the call's rule. Methods without a rule are refused,
        so a new RPC is closed until someone decides who may call it."""
        rule = call.rule
        if rule is None:
            raise PermissionDenied(f"{call.method} has no access rule")
        try:
            principal = self.auth.authenticate(metadata, call.peer)
            call.principal = principal
            if principal.kind is Kind.AGENT:
                call.agent_id = principal.agent_id
            if isinstance(request, Malformed):
                raise request.error()
            self.auth.authorize(rule, principal, request)
        except Unauthenticated as error:
            raise self._failed(call, error) from None

    def _failed(self, call: Call, error: Unauthenticated) -> OrchestratorError:
        """The answer to a failed authentication: itself, or once the peer's budget of failures is
        spent, RESOURCE_EXHAUSTED with the time until it may try again."""
        host = peer_host(call.peer)
        retry_after = self._failures.take(host)
        if retry_after <= 0:
            return error
        return ResourceExhausted(
            f"too many failed authentications from {host}: at most {self._failures.rate:g}/s, "
            f"bursts of {self._failures.burst:g}",
            retry_after=retry_after,
        )

    def check_hello(self, call: Call, message: Any) -> None:
        """Checks a session's first message, the hello: it names the agent, which must be the
        caller's own (an agent credential) or is authenticated by it."""
        try:
            self._check_hello(call, message)
        except Unauthenticated as error:
            raise self._failed(call, error) from None

    def _check_hello(self, call: Call, message: Any) -> None:
        anonymous = call.principal is not None and call.principal.kind is Kind.ANONYMOUS
        if message.WhichOneof("message") != "hello":
            if self.auth.enabled and anonymous:
                raise Unauthenticated("a session starts with a hello carrying agent_id and agent_token")
            return  # the servicer refuses it
        hello = message.hello
        if not hello.agent_id:
            raise InvalidArgument.field("hello.agent_id", "is required")
        call.agent_id = hello.agent_id
        if not self.auth.enabled or call.principal is None:
            return
        if call.principal.kind is Kind.AGENT:
            if hello.agent_id != call.principal.agent_id:
                raise PermissionDenied(
                    f"{call.principal.name} may open a session only as itself, not as {hello.agent_id[:128]}"
                )
        else:
            # Only a caller that presented a key learns whether the agent exists (NOT_FOUND makes
            # the SDK register again); without one, every failure is UNAUTHENTICATED.
            call.principal = self.auth.verify_hello(hello.agent_id, hello.agent_token, keyed=not anonymous)

    # -- limits -----------------------------------------------------------------------------------

    def check_size(self, message: Any, direction: str) -> None:
        """The message size limit (MAX_MESSAGE_BYTES) grpc core applies to gRPC calls, for calls
        that do not pass through it; `direction` is "Received" or "Sent", as grpc words it."""
        size = message.ByteSize()
        if size > self.max_message_bytes:
            raise ResourceExhausted(
                f"{direction} message larger than max ({size} vs. {self.max_message_bytes})"
            )

    def meter(self, call: Call, request: Any) -> StreamSlot:
        """Draws the call from its token bucket; returns its stream slot (keyed by the principal,
        or for a session left open until the hello names the agent)."""
        rule = call.rule
        principal = call.principal or Principal.anonymous(call.peer)
        budget = rule.budget if rule is not None else Budget.API
        if budget is Budget.API:
            self._take(self._api, principal.name, "API calls")
        elif budget is Budget.SESSION and rule is not None and rule.access is not Access.SESSION:
            # A unary heartbeat counts against the agent it keeps alive, like its stream would.
            agent_id = getattr(request, "agent_id", "")
            self._take(self._session, f"agent:{agent_id}" if agent_id else principal.name, "heartbeats")
        if rule is not None and rule.access is Access.SESSION:
            return StreamSlot()
        return StreamSlot(principal.name)

    @staticmethod
    def _take(limiter: RateLimiter, key: str, what: str) -> None:
        retry_after = limiter.take(key)
        if retry_after > 0:
            count_rate_limited(what)
            raise ResourceExhausted(
                f"rate limit of {key} exceeded: {limiter.rate:g} {what}/s, bursts of {limiter.burst:g}",
                retry_after=retry_after,
            )

    def open_stream(self, slot: StreamSlot, key: str | None = None) -> None:
        """Counts an open stream against its key (MAX_SESSIONS_PER_PRINCIPAL); once per slot."""
        if key is not None and slot.key is None:
            slot.key = key
        if slot.held or slot.key is None:
            return
        if not self._slots.acquire(slot.key):
            raise ResourceExhausted(
                f"{slot.key} already has {self._slots.limit} open streams "
                f"(MAX_SESSIONS_PER_PRINCIPAL={self._slots.limit})",
                retry_after=1.0,
            )
        slot.held = True

    def close_stream(self, slot: StreamSlot) -> None:
        if slot.held and slot.key is not None:
            slot.held = False
            self._slots.release(slot.key)

    def pace(self, call: Call, slot: StreamSlot) -> float:
        """Session traffic is paced, not refused: a burst of task updates slows that agent's own
        stream while every other stream goes on at full speed. Returns how long the stream waits
        before its message is handled (0.0 nearly always: no sleep, no await on the beat path).
        The first message (the hello) makes the stream count against its agent."""
        if slot.key is None:
            self.open_stream(slot, f"agent:{call.agent_id}" if call.agent_id else f"peer:{call.peer}")
        else:
            self.open_stream(slot)
        assert slot.key is not None
        delay = self._session.reserve(slot.key)
        if delay > 0:
            count_rate_limited("session messages")
        return delay

    # -- audit ------------------------------------------------------------------------------------

    def audited(self, call: Call, request: Any, request_id: Callable[[], str]) -> AuditScope | None:
        """The audit record of the call, written when the scope ends; None when its rule asks for
        none. `request_id` gives the caller's id when the telemetry has not set one."""
        rule = call.rule
        if rule is None or rule.audit is Audit.NEVER:
            return None
        return AuditScope(call, rule, request, request_id)


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
        call = _current.get()
        peer = getattr(record, "peer", None) or (call.peer if call is not None else "")
        suppressed = self._sampler.admit((record.name, peer_host(str(peer)), str(code)))
        if suppressed is None:
            return False
        if suppressed:
            record.msg = f"{record.msg} (and {suppressed} more like it from this peer, not logged)"
        return True


_SAMPLER = RefusalSampler(LogSampler(interval=10.0))


def _sample_refusals() -> None:
    for logger in (telemetry.access_log, audit_log):
        if _SAMPLER not in logger.filters:
            logger.addFilter(_SAMPLER)


def _reload_on_sighup(keys: KeyRing) -> None:
    if not keys.reloadable:
        return
    reference = weakref.ref(keys)

    def reload() -> None:
        # Held weakly: a stopped server's key ring is not kept alive by the signal handler.
        ring = reference()
        if ring is not None:
            log.info("SIGHUP: reloading API keys")
            ring.request_reload()

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    except (ValueError, RuntimeError, NotImplementedError) as error:
        # Not the main thread (an embedded server): the file is still polled.
        log.debug("no SIGHUP handler: %s", error)
