"""The former home of the SDK's backoff and retry policy, now `orchestrator_client.retry`.

Kept as an import path so code written against it (`from orchestrator_client.backoff import
Backoff, NO_RETRY`) keeps working.
"""

from orchestrator_client.retry import NO_RETRY, Backoff, RetryPolicy, Sleep

__all__ = ["NO_RETRY", "Backoff", "RetryPolicy", "Sleep"]
