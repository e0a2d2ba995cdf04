"""Small statistics helpers: percentiles of latency samples."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0..100) of an already sorted, non-empty list."""
    if not sorted_values:
        raise ValueError("percentile of an empty sample")
    if len(sorted_values) == 1:
        return sorted_values[0]
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Distribution of one latency sample (milliseconds unless said otherwise)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def summarize(values: Iterable[float]) -> Summary | None:
    """Summary of a sample, or None when it is empty."""
    data = sorted(values)
    if not data:
        return None
    return Summary(
        count=len(data),
        p50=percentile(data, 50),
        p90=percentile(data, 90),
        p99=percentile(data, 99),
        max=data[-1],
        mean=sum(data) / len(data),
    )
