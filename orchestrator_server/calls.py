"""The record of the call in progress, which the policy (`policy.py`) opens for every call on either
transport, and what servicers may read from it."""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from orchestrator_server.auth import Kind, Principal, Rule
from orchestrator_server.errors import InvalidArgument


@dataclass
class Call:
    """What the policy learned about the call in progress."""

    method: str
    rule: Rule | None
    #: The caller's address: the connection's (gRPC), the HTTP client's (the in-process gateway).
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


def open_call(call: Call) -> Token[Call | None]:
    """Makes `call` the current call; the token undoes it (`close_call`)."""
    return _current.set(call)


def close_call(token: Token[Call | None]) -> None:
    _current.reset(token)


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
