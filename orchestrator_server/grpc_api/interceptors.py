"""The cross-cutting checks of every call, in the order they run:

1. `AuditInterceptor` records who made each mutating call, what it was and how it ended
   (logger `orchestrator.audit`); it also opens the per-call record the others fill in.
2. `AuthInterceptor` authenticates the caller (API key, agent credential, or the Heartbeat's hello)
   and applies the call's rule from `auth.RULES`; malformed requests end here as INVALID_ARGUMENT.
3. `LimitInterceptor` draws from the caller's token bucket (API calls and session traffic apart)
   and caps its open streams.

They sit inside `ErrorInterceptor`, which turns the domain errors they raise into statuses (with
RetryInfo for RESOURCE_EXHAUSTED). Servicers never check credentials; the one thing they take from
here is `acting_agent_id()`, which the task domain needs to refuse reports on another agent's attempts.

The Heartbeat servicer reads its stream with `context.read()`, so checks on the messages of a
stream (the hello, the session budget) wrap the context: `read()` passes every message through
the hooks the interceptors registered.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_interceptor.server import AsyncServerInterceptor

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

Context = grpc.aio.ServicerContext[Any, Any]
Hook = Callable[[Any], Awaitable[None]]
# End-of-stream marker of context.read(); missing from the type stubs.
EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009


@dataclass
class Call:
    """What the interceptors learned about the call in progress."""

    method: str
    rule: Rule | None
    #: The caller's address: the connection's, or for a REST call the HTTP client's (signed by the
    #: in-process gateway, `auth.forwarded_peer`).
    peer: str
    principal: Principal | None = None
    #: The agent the call acts for: the agent credential's, or a Heartbeat's hello's.
    agent_id: str = ""


# Each RPC runs in its own task, so this is per call.
_current: ContextVar[Call | None] = ContextVar("orchestrator_call", default=None)


def _call(context: Context, method_name: str) -> Call:
    call = _current.get()
    if call is None:
        call = Call(method_name, RULES.get(method_name), context.peer())
        _current.set(call)
    return call


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


class _Malformed:
    """What the request deserializer yields for bytes that are not the method's message."""

    def __init__(self, error: DecodeError) -> None:
        self.reason = str(error)[:256]

    def error(self) -> InvalidArgument:
        return InvalidArgument.field("request", f"not a valid message: {self.reason}")


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            # grpc would answer UNKNOWN "Unexpected DecodeError" and log a traceback per request.
            return _Malformed(error)

    return deserialize


class _HookedContext:
    """A servicer context whose `read()` passes each message through the registered hooks."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self.hooks: list[Hook] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not EOF:
            for hook in self.hooks:
                await hook(message)
        return message


async def _reject_malformed(message: Any) -> None:
    if isinstance(message, _Malformed):
        raise message.error()


async def _parsed(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for message in requests:
        await _reject_malformed(message)
        yield message


def _with_hook(context: Context, hook: Hook) -> Any:
    hooked = context if isinstance(context, _HookedContext) else _HookedContext(context)
    hooked.hooks.append(hook)
    return hooked


async def _invoke(method: Callable[..., Any], request: Any, context: Any) -> Any:
    response = method(request, context)
    if hasattr(response, "__aiter__"):
        return response  # a stream: the caller iterates it
    return await response


class AuditInterceptor(AsyncServerInterceptor):
    """One structured record per mutating call whose rule says so: who, what, target, when, result.
    It also opens the call's record, with the caller's real address."""

    def __init__(self, client_address_secret: str = "") -> None:
        self._secret = client_address_secret

    async def intercept(
        self, method: Callable[..., Any], request: Any, context: Context, method_name: str
    ) -> Any:
        peer = forwarded_peer(context.invocation_metadata() or (), self._secret, context.peer())
        call = Call(method_name, RULES.get(method_name), peer)
        _current.set(call)
        rule = call.rule
        if rule is None or rule.audit is Audit.NEVER:
            return await _invoke(method, request, context)
        started = time.monotonic()
        code = "UNKNOWN"
        response = None
        try:
            response = await _invoke(method, request, context)
            code = "OK"
            return response
        except OrchestratorError as error:
            code = error.code
            raise
        except grpc.aio.AbortError:
            aborted = context.code()
            code = aborted.name if isinstance(aborted, grpc.StatusCode) else "ABORTED_BY_HANDLER"
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            self._record(call, rule, request, response, context, code, started)

    @staticmethod
    def _record(
        call: Call, rule: Rule, request: Any, response: Any, context: Context, code: str, started: float
    ) -> None:
        principal = call.principal
        if (
            rule.audit is Audit.OVERRIDE
            and principal is not None
            and principal.kind is Kind.AGENT
            and code != "PERMISSION_DENIED"  # an agent reaching for another's work is worth a record
        ):
            return
        who = principal.name if principal is not None else "unauthenticated"
        target = " ".join(f"{name}={value}" for name, value in _audit_target(request, response).items())
        # The id the telemetry interceptor gave the call (the caller's x-request-id when it sent one).
        rid = telemetry.request_id.get() or next(
            (value for key, value in context.invocation_metadata() or () if key == "x-request-id"), ""
        )
        what = call.method.rsplit("/", 1)[-1]
        audit_log.info(
            "audit who=%s what=%s %s result=%s peer=%s",
            who,
            what,
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
                "duration_ms": round((time.monotonic() - started) * 1000, 3),
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


class AuthInterceptor(AsyncServerInterceptor):
    """Authenticates every call and applies its rule. Methods without a rule are refused, so a new
    RPC is closed until someone decides who may call it."""

    def __init__(self, authenticator: Authenticator, failures: RateLimiter) -> None:
        self._auth = authenticator
        #: Failed authentications per peer host: past its budget a peer's failures answer
        #: RESOURCE_EXHAUSTED, so a credential flood costs the server (and its log) little.
        self._failures = failures

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await super().intercept_service(continuation, handler_call_details)  # type: ignore[no-untyped-call]
        if handler is None or handler.request_deserializer is None:
            return handler
        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer))

    async def intercept(
        self, method: Callable[..., Any], request: Any, context: Context, method_name: str
    ) -> Any:
        call = _call(context, method_name)
        rule = call.rule
        if rule is None:
            raise PermissionDenied(f"{method_name} has no access rule")
        try:
            principal = self._auth.authenticate(context.invocation_metadata() or (), call.peer)
            call.principal = principal
            if principal.kind is Kind.AGENT:
                call.agent_id = principal.agent_id
            if isinstance(request, _Malformed):
                raise request.error()
            self._auth.authorize(rule, principal, request)
        except Unauthenticated as error:
            raise self._failed(call, error) from None
        if hasattr(request, "__aiter__"):
            # A client stream: servicers read it either by iterating or with context.read().
            request = _parsed(request)
            context = _with_hook(context, _reject_malformed)
        if rule.access is Access.SESSION:
            context = _with_hook(context, self._session_hook(call))
        return await _invoke(method, request, context)

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

    def _session_hook(self, call: Call) -> Hook:
        """Checks the session's first message, the hello: it names the agent, which must be the
        caller's own (an agent credential) or is authenticated by it."""
        first = True

        async def check(message: Any) -> None:
            nonlocal first
            if not first:
                return
            first = False
            try:
                check_hello(message)
            except Unauthenticated as error:
                raise self._failed(call, error) from None

        def check_hello(message: Any) -> None:
            anonymous = call.principal is not None and call.principal.kind is Kind.ANONYMOUS
            if message.WhichOneof("message") != "hello":
                if self._auth.enabled and anonymous:
                    raise Unauthenticated("a session starts with a hello carrying agent_id and agent_token")
                return  # the servicer refuses it
            hello = message.hello
            if not hello.agent_id:
                raise InvalidArgument.field("hello.agent_id", "is required")
            call.agent_id = hello.agent_id
            if not self._auth.enabled or call.principal is None:
                return
            if call.principal.kind is Kind.AGENT:
                if hello.agent_id != call.principal.agent_id:
                    raise PermissionDenied(
                        f"{call.principal.name} may open a session only as itself, not as {hello.agent_id[:128]}"
                    )
            else:
                # Only a caller that presented a key learns whether the agent exists (NOT_FOUND makes
                # the SDK register again); without one, every failure is UNAUTHENTICATED.
                call.principal = self._auth.verify_hello(
                    hello.agent_id, hello.agent_token, keyed=not anonymous
                )

        return check


class LimitInterceptor(AsyncServerInterceptor):
    """Token buckets per principal (API calls) and per agent (session traffic), and a cap on the
    open streams of each. Session streams are paced, not refused: a burst of task updates slows
    that agent's own stream while every other stream goes on at full speed."""

    def __init__(self, config: Config) -> None:
        enabled = config.rate_limit_enabled
        self._api = RateLimiter(config.rate_limit_api_rate if enabled else 0.0, config.rate_limit_api_burst)
        self._session = RateLimiter(
            config.rate_limit_session_rate if enabled else 0.0, config.rate_limit_session_burst
        )
        self._slots = StreamSlots(config.max_sessions_per_principal)

    async def intercept(
        self, method: Callable[..., Any], request: Any, context: Context, method_name: str
    ) -> Any:
        call = _call(context, method_name)
        rule = call.rule
        principal = call.principal or Principal.anonymous(call.peer)
        budget = rule.budget if rule is not None else Budget.API
        if budget is Budget.API:
            self._take(self._api, principal.name, "API calls")
        elif budget is Budget.SESSION and rule is not None and rule.access is not Access.SESSION:
            # A unary heartbeat counts against the agent it keeps alive, like its stream would.
            agent_id = getattr(request, "agent_id", "")
            self._take(self._session, f"agent:{agent_id}" if agent_id else principal.name, "heartbeats")
        slot = _Slot()
        if rule is not None and rule.access is Access.SESSION:
            context = _with_hook(context, self._session_hook(call, slot))
        else:
            slot.key = principal.name
        response = method(request, context)
        if not hasattr(response, "__aiter__"):
            return await response
        return self._stream(response, slot)

    @staticmethod
    def _take(limiter: RateLimiter, key: str, what: str) -> None:
        retry_after = limiter.take(key)
        if retry_after > 0:
            count_rate_limited(what)
            raise ResourceExhausted(
                f"rate limit of {key} exceeded: {limiter.rate:g} {what}/s, bursts of {limiter.burst:g}",
                retry_after=retry_after,
            )

    def _acquire(self, key: str) -> None:
        if not self._slots.acquire(key):
            raise ResourceExhausted(
                f"{key} already has {self._slots.limit} open streams "
                f"(MAX_SESSIONS_PER_PRINCIPAL={self._slots.limit})",
                retry_after=1.0,
            )

    def _session_hook(self, call: Call, slot: _Slot) -> Hook:
        async def pace(message: Any) -> None:
            if slot.key is None:
                # The hello: the agent is known from here on, and the stream counts against it.
                key = f"agent:{call.agent_id}" if call.agent_id else f"peer:{call.peer}"
                self._acquire(key)
                slot.key = key
                slot.held = True
            delay = self._session.reserve(slot.key)
            if delay > 0:
                count_rate_limited("session messages")
                await asyncio.sleep(delay)

        return pace

    async def _stream(self, responses: AsyncIterator[Any], slot: _Slot) -> AsyncIterator[Any]:
        try:
            if slot.key is not None and not slot.held:
                self._acquire(slot.key)
                slot.held = True
            async for response in responses:
                yield response
        finally:
            if slot.held and slot.key is not None:
                self._slots.release(slot.key)


@dataclass
class _Slot:
    """The stream slot of one call: keyed by the principal, or for a session by its agent once the
    hello is read."""

    key: str | None = None
    held: bool = False


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


def security_interceptors(
    config: Config, agents: AgentVerifier, *, client_address_secret: str = ""
) -> list[AsyncServerInterceptor]:
    """The interceptors of the security layer, outermost first, for `ErrorInterceptor` to wrap.
    Refuses insecure configurations (ConfigError); warns when the server runs open.
    `client_address_secret`: the in-process gateway's, which signs the HTTP client's address."""
    check_security_config(config)
    _sample_refusals()
    keys = KeyRing(config)
    if not keys.enabled:
        log.warning(
            "no API keys configured (API_KEYS / API_KEYS_FILE): authentication is OFF and anyone who "
            "can reach this server may call every RPC%s",
            "" if config.environment != "production" else " (ALLOW_INSECURE_PRODUCTION=true)",
        )
    else:
        log.info(
            "authentication on: %d API keys%s",
            len(keys),
            f" from {config.api_keys_file}" if config.api_keys_file else "",
        )
        _reload_on_sighup(keys)
    failures = RateLimiter(
        config.auth_failure_rate if config.rate_limit_enabled else 0.0, config.auth_failure_burst
    )
    return [
        AuditInterceptor(client_address_secret),
        AuthInterceptor(Authenticator(keys, agents), failures),
        LimitInterceptor(config),
    ]


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
