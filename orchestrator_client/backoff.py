"""Exponential backoff with full jitter, and the retry loop for idempotent unary calls.

Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): the n-th delay is drawn
uniformly from [0, min(maximum, initial * multiplier**n)]. Spreading every client's retry over the
whole window is what keeps thousands of agents from reconnecting in lock-step after an orchestrator
restart. The random source and the sleep are injectable so tests can see the delays chosen.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from orchestrator_client.errors import DeadlineExceeded, from_grpc_error

T = TypeVar("T")

Sleep = Callable[[float], Awaitable[None]]
"""An asyncio-style sleep: `asyncio.sleep` in production, a recorder in tests."""

# Beyond this exponent every realistic ceiling is already at `maximum`; it also keeps
# multiplier**attempt from overflowing a float after days of failed attempts.
_MAX_EXPONENT = 64


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


DEFAULT_RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    """How idempotent unary calls are retried: which codes, with what backoff, within one deadline."""

    backoff: Backoff = Backoff(initial=0.1, maximum=5.0)
    retryable_codes: Collection[grpc.StatusCode] = DEFAULT_RETRYABLE_CODES
    sleep: Sleep = field(default=asyncio.sleep, compare=False)


NO_RETRY = RetryPolicy(retryable_codes=frozenset())


async def call_with_retry(
    call: Callable[[float | None], Awaitable[T]],
    *,
    total_timeout: float | None,
    policy: RetryPolicy,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run `call(per_attempt_timeout)` until it succeeds, fails for good, or the deadline passes.

    The deadline is `total_timeout` seconds from now and covers every attempt and every pause between
    them: each attempt gets what is left of it (as google-api-core does), so a retried call never
    outlives the deadline its caller chose. Errors surface as `OrchestratorError`s, chained to the
    `grpc.RpcError`. When the deadline leaves no room for another attempt the last error is raised.
    """
    deadline = None if total_timeout is None else clock() + total_timeout
    attempt = 0
    while True:
        remaining = None if deadline is None else deadline - clock()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(f"deadline of {total_timeout}s spent before the call was attempted")
        try:
            return await call(remaining)
        except grpc.RpcError as err:
            error = from_grpc_error(err)
            if error.grpc_code not in policy.retryable_codes:
                raise error from err
            pause = policy.backoff.delay(attempt)
            if error.retry_after is not None:
                pause = max(pause, error.retry_after)
            if deadline is not None and clock() + pause >= deadline:
                raise error from err
            attempt += 1
            await policy.sleep(pause)
