"""The SDK's one retry policy type, `Retry`, against a real scripted gRPC server.

Each test scripts the statuses CompleteTask answers with (real rich statuses over loopback) and runs
the call under a `Retry`; the pauses are recorded by the injectable sleep (really slept where the
deadline must see the time pass).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from conftest import FixedRandom, SleepRecorder
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from scripted_orchestrator import ScriptedOrchestrator, rich_status

from orchestrator_client import (
    NO_RETRY,
    TRANSIENT_CODES,
    Backoff,
    DeadlineExceeded,
    InvalidArgument,
    OrchestratorError,
    ResourceExhausted,
    Retry,
    RetryPolicy,
    Unavailable,
    v1,
)

UNAVAILABLE = rich_status(grpc.StatusCode.UNAVAILABLE, "restarting")
REQUEST = v1.CompleteTaskRequest(task_id="task-1", attempt_id="attempt-1")


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


class CompleteTask:
    """`call(remaining)` for `Retry.run`: CompleteTask with what is left of the deadline."""

    def __init__(self, stub: v1.TasksServiceAsyncStub) -> None:
        self.stub = stub
        self.deadlines: list[float | None] = []

    async def __call__(self, remaining: float | None) -> v1.CompleteTaskResponse:
        self.deadlines.append(remaining)
        return await self.stub.CompleteTask(REQUEST, timeout=remaining)


@pytest.fixture
async def complete(orchestrator: ScriptedOrchestrator) -> AsyncIterator[CompleteTask]:
    channel = grpc.aio.insecure_channel(orchestrator.target)
    stub: v1.TasksServiceAsyncStub = v1.TasksServiceStub(channel)
    yield CompleteTask(stub)
    await channel.close(None)


def fixed(seconds: float) -> Backoff:
    """A backoff whose every pause is exactly `seconds` (jitter pinned to the ceiling)."""
    return Backoff(initial=seconds, maximum=seconds, random=FixedRandom(1.0))


async def test_the_deadline_shrinks_across_attempts_and_stops_the_retries(
    orchestrator: ScriptedOrchestrator, complete: CompleteTask
) -> None:
    orchestrator.report_failures.extend([UNAVAILABLE] * 100)
    sleeps = SleepRecorder(real=True)
    retry = Retry(backoff=fixed(0.2), timeout=1.0, sleep=sleeps)
    started = time.monotonic()
    with pytest.raises(Unavailable) as raised:
        await retry.run(complete)
    elapsed = time.monotonic() - started
    deadlines = [deadline for deadline in complete.deadlines if deadline is not None]
    # Every attempt got what was left of the one deadline, less the pause before it.
    assert 0.9 < deadlines[0] <= 1.0
    for before, after in itertools.pairwise(deadlines):
        assert after <= before - 0.2
    # It stopped when the next pause would have ended past the deadline: with the last error, not
    # a DeadlineExceeded of its own, and without outliving the deadline.
    assert len(deadlines) == len(complete.deadlines) == len(sleeps.delays) + 1 >= 2
    assert len(orchestrator.report_metadata) == len(deadlines)
    assert isinstance(raised.value.__cause__, grpc.aio.AioRpcError)
    assert elapsed < 1.0 + 0.5  # the slack is only for a busy machine's scheduling


async def test_a_spent_deadline_raises_before_any_attempt(
    orchestrator: ScriptedOrchestrator, complete: CompleteTask
) -> None:
    with pytest.raises(DeadlineExceeded):
        await Retry(timeout=0.0).run(complete)
    assert orchestrator.report_metadata == []


async def test_the_servers_retry_info_sets_the_pause_when_it_is_longer(
    orchestrator: ScriptedOrchestrator, complete: CompleteTask
) -> None:
    orchestrator.report_failures.append(rich_status(grpc.StatusCode.UNAVAILABLE, "draining", retry_info(0.3)))
    orchestrator.report_failures.append(UNAVAILABLE)  # no hint: the backoff's own draw
    sleeps = SleepRecorder()
    await Retry(backoff=fixed(0.05), sleep=sleeps).run(complete)
    assert sleeps.delays == pytest.approx([0.3, 0.05])
    assert len(orchestrator.completed) == 1


async def test_a_retry_info_past_the_deadline_ends_the_retries_at_once(
    orchestrator: ScriptedOrchestrator, complete: CompleteTask
) -> None:
    orchestrator.report_failures.append(rich_status(grpc.StatusCode.UNAVAILABLE, "draining", retry_info(5.0)))
    sleeps = SleepRecorder()
    with pytest.raises(Unavailable) as raised:
        await Retry(backoff=fixed(0.01), timeout=2.0, sleep=sleeps).run(complete)
    assert raised.value.retry_after == 5.0
    assert sleeps.delays == [] and len(orchestrator.report_metadata) == 1


@pytest.mark.parametrize(
    "policy",
    [Retry(), Retry(retryable_codes=TRANSIENT_CODES), NO_RETRY],
    ids=["default", "transient", "no-retry"],
)
async def test_a_code_outside_the_predicate_raises_at_once(
    orchestrator: ScriptedOrchestrator, complete: CompleteTask, policy: Retry
) -> None:
    orchestrator.report_failures.append(rich_status(grpc.StatusCode.INVALID_ARGUMENT, "bad result"))
    sleeps = SleepRecorder()
    errors: list[OrchestratorError] = []
    with pytest.raises(InvalidArgument):
        await RetryPolicy(
            retryable_codes=policy.retryable_codes, on_error=errors.append, sleep=sleeps, timeout=30.0
        ).run(complete)
    assert len(orchestrator.report_metadata) == 1
    assert sleeps.delays == [] and errors == []


async def test_on_error_hears_every_retried_error_before_its_pause(
    orchestrator: ScriptedOrchestrator, complete: CompleteTask
) -> None:
    exhausted = rich_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", retry_info(0.02))
    orchestrator.report_failures.extend([UNAVAILABLE, exhausted])
    sleeps = SleepRecorder()
    heard: list[tuple[type[OrchestratorError], int]] = []

    def on_error(error: OrchestratorError) -> None:
        heard.append((type(error), len(sleeps.delays)))  # how many pauses had been taken by then

    retry = Retry(retryable_codes=TRANSIENT_CODES, backoff=fixed(0.01), on_error=on_error, sleep=sleeps)
    await retry.run(complete)
    assert heard == [(Unavailable, 0), (ResourceExhausted, 1)]
    assert sleeps.delays == pytest.approx([0.01, 0.02])
    assert len(orchestrator.completed) == 1


def test_delay_is_full_jitter_under_the_backoff_ceiling() -> None:
    retry = Retry(backoff=Backoff(initial=1.0, multiplier=2.0, maximum=4.0, random=FixedRandom(0.5)))
    assert [retry.delay(n) for n in range(4)] == [0.5, 1.0, 2.0, 2.0]
    assert retry.with_timeout(3.0).timeout == 3.0 and retry.with_timeout(None) is retry
