"""One retry policy for every call the SDK repeats: `Retry`, modelled on google-api-core's.

A `Retry` says *which* failures are worth another try (a set of gRPC codes: the predicate), *when*
(exponential backoff with full jitter, never sooner than the server's google.rpc.RetryInfo asks),
*for how long* (a deadline over every attempt and pause, each attempt getting what is left of it)
and *who hears about it* (`on_error`). `AdminClient`'s unary calls, its watches, the agent's session
keeper and its result reports all take their decisions from one.

Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): the n-th delay is drawn
uniformly from [0, min(maximum, initial * multiplier**n)]. Spreading every client's retry over the
whole window is what keeps thousands of agents from reconnecting in lock-step after an orchestrator
restart. The random source, the sleep and the clock are injectable so tests can see the delays chosen.

`ReconnectPacing` is the agent's use of it: how long to wait before the next session, from how the
last one ended. It alone shapes how a fleet comes back after a replica dies or restarts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from orchestrator_client.errors import DeadlineExceeded, OrchestratorError, from_grpc_error

T = TypeVar("T")

Sleep = Callable[[float], Awaitable[None]]
"""An asyncio-style sleep: `asyncio.sleep` in production, a recorder in tests."""

OnError = Callable[[OrchestratorError], None]

# Beyond this exponent every realistic ceiling is already at `maximum`; it also keeps
# multiplier**attempt from overflowing a float after days of failed attempts.
_MAX_EXPONENT = 64

# AIP-194: of all codes only UNAVAILABLE says the server did not act on the call, so it is the one an
# idempotent call is retried on by default, within its deadline. Retrying DEADLINE_EXCEEDED is
# pointless there (each attempt already had all the time that was left), and the others either
# repeat (a bad request) or need the caller's judgement (ABORTED, RESOURCE_EXHAUSTED).
DEFAULT_RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})

# What the loops that keep something open for the agent's whole life (the session, a watch, the
# delivery of a result) retry on: every code that means "not now" rather than "never", because giving
# up would stop an agent that a later attempt would have saved, and their pauses are paced anyway.
# The server answers its own unexpected failures INTERNAL; grpc core also reports overflowing bursts
# of new streams as CANCELLED or INTERNAL (grpc/grpc#36066), and UNKNOWN is what it makes of a
# connection lost mid-call: all three are what a restart with many agents looks like.
TRANSIENT_CODES: frozenset[grpc.StatusCode] = DEFAULT_RETRYABLE_CODES | {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter and a cap, in seconds."""

    initial: float = 0.5
    multiplier: float = 2.0
    maximum: float = 30.0
    random: Callable[[], float] = field(default=random.random, compare=False)
    """Returns a float in [0, 1); replaced in tests to pin the jitter."""

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.multiplier < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and multiplier >= 1")

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay before retry number `attempt` (0-based)."""
        return min(self.maximum, self.initial * self.multiplier ** min(attempt, _MAX_EXPONENT))

    def delay(self, attempt: int) -> float:
        """A delay drawn uniformly from [0, ceiling(attempt)]: full jitter."""
        return self.random() * self.ceiling(attempt)


@dataclass(frozen=True)
class Retry:
    """When a failed call is tried again, after how long, and until when.

    `await retry.run(call)` runs `call(remaining)` (the seconds left of the deadline, None without
    one) until it succeeds, fails with a code outside `retryable_codes` (raised at once), or the
    deadline leaves no room for the next pause (the last error is raised). Errors surface as
    `OrchestratorError`s chained to the `grpc.RpcError`. Loops that resume something themselves (a
    watch, the agent's session) use `retryable`, `delay` and `wait` directly.
    """

    retryable_codes: Collection[grpc.StatusCode] = DEFAULT_RETRYABLE_CODES
    """The predicate: a failure with one of these codes is retried, any other is raised at once."""
    backoff: Backoff = Backoff(initial=0.1, maximum=5.0)
    timeout: float | None = None
    """Deadline in seconds over every attempt and pause; None: retry until success or a non-retryable
    error. `AdminClient` sets it from each call's `timeout`."""
    on_error: OnError | None = field(default=None, compare=False)
    """Called with every retryable error, before the pause that follows it (to log or count them)."""
    sleep: Sleep = field(default=asyncio.sleep, compare=False)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def with_timeout(self, timeout: float | None) -> Retry:
        """The same policy with another deadline."""
        return self if timeout == self.timeout else dataclasses.replace(self, timeout=timeout)

    def retryable(self, error: OrchestratorError) -> bool:
        return error.grpc_code in self.retryable_codes

    def delay(self, attempt: int, error: OrchestratorError | None = None) -> float:
        """The pause before retry number `attempt` (0-based): the backoff's full-jitter draw, or the
        delay the server asked for in a google.rpc.RetryInfo when that is longer."""
        pause = self.backoff.delay(attempt)
        hint = error.retry_after if error is not None else None
        return pause if hint is None else max(pause, hint)

    async def wait(self, attempt: int, error: OrchestratorError | None = None) -> None:
        """Tell `on_error` (when there is an error), then pause `delay(attempt, error)`."""
        if error is not None and self.on_error is not None:
            self.on_error(error)
        await self.sleep(self.delay(attempt, error))

    async def run(self, call: Callable[[float | None], Awaitable[T]]) -> T:
        """Run `call(remaining)` under this policy (see the class docstring)."""
        deadline = None if self.timeout is None else self.clock() + self.timeout
        attempt = 0
        while True:
            remaining = None if deadline is None else deadline - self.clock()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"deadline of {self.timeout}s spent before the call was attempted")
            try:
                return await call(remaining)
            except grpc.RpcError as err:
                error = from_grpc_error(err)
                if not self.retryable(error):
                    raise error from err
                if self.on_error is not None:
                    self.on_error(error)
                pause = self.delay(attempt, error)
                # A pause that ends at the deadline leaves no time for the attempt after it.
                if deadline is not None and self.clock() + pause >= deadline:
                    raise error from err
                attempt += 1
                await self.sleep(pause)


@dataclass
class ReconnectPacing:
    """The pause before an agent's next session, from how the last one ended.

    * **A planned break** (a `reconnect` request, or UNAVAILABLE with RetryInfo from a draining or
      cut-off server) reaches every agent of that server at the same moment: each draws its pause
      uniformly over a window as long as the server's hint (at least `backoff.initial`). Coming back
      to the same server it never returns before the hint; moving to another replica it need not
      wait for the old one, so the window starts now. For `planned_window` seconds afterwards the
      server is known to be restarting, not broken: pauses stay at the first step of the backoff
      instead of growing.
    * **A lost session** that had been welcomed: the first retry is fast (full jitter over
      `backoff.initial`): the replica or its connection died, another replica (or the same one,
      restarted) can take the agent at once.
    * **Repeated failures** (no welcome in between): exponential backoff with full jitter up to
      `backoff.maximum`, never sooner than an error's RetryInfo asks. The cap bounds how long an
      agent may stay away after the server is back; the jitter spreads the fleet over it.
    """

    retry: Retry
    planned_window: float = 60.0
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    failures: int = 0
    """Sessions in a row that ended without a welcome."""
    _planned_until: float = field(default=float("-inf"), repr=False)

    def pause(
        self,
        *,
        welcomed: bool,
        hint: float | None = None,
        error: OrchestratorError | None = None,
        elsewhere: bool = False,
    ) -> float:
        """Seconds to wait. `hint`: the server planned the break and asked for this wait;
        `elsewhere`: the next session goes to another replica than the one that ended."""
        backoff = self.retry.backoff
        if welcomed:
            self.failures = 0
        if hint is not None:
            self._planned_until = self.clock() + self.planned_window
            start = 0.0 if elsewhere else hint
            return start + backoff.random() * max(backoff.initial, hint)
        if self.clock() < self._planned_until:
            return self.retry.delay(0, error)
        pause = self.retry.delay(self.failures, error)
        self.failures += 1
        return pause


RetryPolicy = Retry
"""The former name of `Retry`, kept so existing code keeps working."""

NO_RETRY = Retry(retryable_codes=frozenset())
"""Try once: for calls that could act twice if repeated after a lost answer."""
