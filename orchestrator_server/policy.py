"""The checks of every call, whichever transport carries it, in the order they run:

1. `Policy.begin` opens the call's record (`calls.Call`: method, rule from `auth.RULES`, the
   caller's address).
2. `Policy.audited` records who made each mutating call, what it was and how it ended
   (`audit.AuditScope`, logger `orchestrator.audit`), around everything below.
3. `Policy.admit` authenticates the caller (API key or agent credential) and applies the call's
   rule; a request that could not be decoded ends here as INVALID_ARGUMENT.
4. `Policy.meter` draws from the caller's token bucket (API calls and session traffic apart);
   `open_stream` caps its open streams.

Both adapters call these: the gRPC interceptors (`grpc_api/interceptors.py`) and the REST
gateway's in-process dispatch (`gateway/inprocess.py`), so a REST call and a gRPC call are held to
the same rules, budgets and audit records. Domain errors become one google.rpc.Status here
(`error_status`), which each transport writes in its own way. Servicers never check credentials;
what they take from the call's record is `acting_agent_id()`, `caller_scope()` and
`authenticated_caller()` (`calls.py`, re-exported here).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import weakref
from collections.abc import Callable, Iterable
from contextvars import Token
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from orchestrator_server.audit import AuditScope, outcome, sample_refusals
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
    check_security_config,
    peer_host,
)
from orchestrator_server.calls import (
    Call,
    Malformed,
    StreamSlot,
    acting_agent_id,
    authenticated_caller,
    caller_scope,
    close_call,
    current_call,
    open_call,
)
from orchestrator_server.config import Config
from orchestrator_server.errors import (
    InvalidArgument,
    OrchestratorError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from orchestrator_server.limits import RateLimiter, StreamSlots
from orchestrator_server.metrics import count_rate_limited

__all__ = [
    "Call",
    "Malformed",
    "Policy",
    "StreamSlot",
    "acting_agent_id",
    "authenticated_caller",
    "caller_scope",
    "current_call",
    "error_status",
    "failure_status",
    "outcome",
]

log = logging.getLogger(__name__)

Metadata = Iterable[tuple[str, str | bytes]]

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


# -- the policy ----------------------------------------------------------------------------------


class Policy:
    """Authentication, authorization, rate and stream limits and audit, for every transport."""

    def __init__(self, config: Config, agents: AgentVerifier) -> None:
        check_security_config(config)
        sample_refusals()
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

    # -- the call's record ------------------------------------------------------------------------

    def begin(self, method: str, peer: str) -> tuple[Call, Token[Call | None]]:
        """Opens the call's record. The token resets it (`end`) where one task serves several calls."""
        call = Call(method, RULES.get(method), peer)
        return call, open_call(call)

    @staticmethod
    def end(token: Token[Call | None]) -> None:
        close_call(token)

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
        self.check_length(message.ByteSize(), direction)

    def check_length(self, size: int, direction: str) -> None:
        """`check_size` of a message whose serialized length is known."""
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
