"""Token buckets per principal, and counts of open streams per principal.

Pure bookkeeping on the event loop's clock; nothing here blocks or knows about gRPC.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class TokenBucket:
    """`rate` tokens per second up to `burst`; one call takes one token."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until one will be there (nothing is taken)."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def reserve(self, now: float) -> float:
        """Takes a token even if it is not there yet; returns how long to wait before using it.
        For streams, which are paced rather than refused."""
        self._refill(now)
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0.0 else -self.tokens / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class RateLimiter:
    """One token bucket per key. A rate of 0 means unlimited.

    Buckets of idle keys are dropped once they would be full again (a new bucket starts full, so
    forgetting them changes nothing), which keeps memory bounded by the keys active recently."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(max(1, burst))
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._prune_at = 1024

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._prune_at:
                self._prune(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.burst, now)
        return bucket

    def take(self, key: str) -> float:
        """0.0 if `key` may make a call now, else the seconds to wait before retrying."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        return self._bucket(key, now).take(now)

    def reserve(self, key: str) -> float:
        """The seconds `key` should wait before its next message is handled (0.0: at once)."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        return self._bucket(key, now).reserve(now)

    def _prune(self, now: float) -> None:
        self._buckets = {key: bucket for key, bucket in self._buckets.items() if not bucket.full(now)}
        # Amortised: the next prune waits until the table has doubled again.
        self._prune_at = max(1024, 2 * len(self._buckets))


class StreamSlots:
    """Open streams per key, capped at `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        count = self._open.get(key, 0)
        if count >= self.limit:
            return False
        self._open[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def count(self, key: str) -> int:
        return self._open.get(key, 0)
