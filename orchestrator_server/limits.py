"""Token buckets per principal, counts of open streams per principal, log sampling, and the
process's file-descriptor limit.

Pure bookkeeping on the event loop's clock; nothing here blocks or knows about gRPC.
"""

from __future__ import annotations

import logging
import resource
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


class LogSampler:
    """Lets the first line of each key through per `interval` and counts the rest.

    `admit` answers None to suppress a line, else how many lines of that key were suppressed since
    the last one let through (to be said on it). The table is bounded: past `max_keys`, keys whose
    interval has ended are forgotten, and if none has, new keys are let through uncounted."""

    def __init__(
        self, interval: float = 10.0, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        # key -> [end of the current interval, lines suppressed in it]
        self._windows: dict[tuple[str, ...], list[float]] = {}

    def admit(self, key: tuple[str, ...]) -> int | None:
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now < window[0]:
            window[1] += 1
            return None
        suppressed = int(window[1]) if window is not None else 0
        if window is None and len(self._windows) >= self.max_keys:
            self._windows = {k: w for k, w in self._windows.items() if now < w[0]}
            if len(self._windows) >= self.max_keys:
                return 0
        self._windows[key] = [now + self.interval, 0]
        return suppressed


def raise_fd_limit(log: logging.Logger | None = None) -> int:
    """Raises this process's soft RLIMIT_NOFILE to its hard limit (often 1,024 soft against 500k+
    hard), so connections held open over HTTP cannot run the whole process out of descriptors and
    starve gRPC; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            if log is not None:
                log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, error)
    return soft
