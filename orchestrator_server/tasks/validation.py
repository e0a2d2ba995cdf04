"""Checks of what callers send about tasks: a spec, a report, a result, an error, progress."""

from __future__ import annotations

from google.protobuf import struct_pb2

from orchestrator.v1 import task_pb2
from orchestrator_server.errors import InvalidArgument
from orchestrator_server.selectors import parse_selector
from orchestrator_server.tasks.model import MAX_ATTEMPT_ERROR, MAX_ATTEMPTS_LIMIT, MAX_PAYLOAD_BYTES
from orchestrator_server.validation import MAX_CAPABILITIES, Violations


def check_spec(spec: task_pb2.TaskSpec) -> None:
    violations = Violations()
    violations.name("spec.type", spec.type)
    if spec.payload.ByteSize() > MAX_PAYLOAD_BYTES:
        violations.add("spec.payload", f"larger than {MAX_PAYLOAD_BYTES} bytes")
    else:
        violations.value("spec.payload", spec.payload)
    violations.names("spec.required_capabilities", spec.required_capabilities, MAX_CAPABILITIES)
    try:
        parse_selector(spec.label_selector, "spec.label_selector")
    except InvalidArgument as error:
        violations.items.extend(error.violations)
    violations.name("spec.target_agent_id", spec.target_agent_id, required=False)
    if not -1000 <= spec.priority <= 1000:
        violations.add("spec.priority", "must be between -1000 and 1000")
    for name in ("queue_timeout", "run_timeout"):
        violations.duration(f"spec.{name}", spec.HasField(name), getattr(spec, name))
    if not 0 <= spec.max_attempts <= MAX_ATTEMPTS_LIMIT:
        violations.add("spec.max_attempts", f"must be between 0 and {MAX_ATTEMPTS_LIMIT}")
    violations.text("spec.idempotency_key", spec.idempotency_key, 256)
    violations.text("spec.routing_key", spec.routing_key, 256)
    violations.labels("spec.labels", spec.labels)
    violations.raise_if_any()


def report_violations(task_id: str, attempt_id: str) -> Violations:
    """The checks every report on an attempt starts with; the caller adds its own and raises."""
    violations = Violations()
    violations.identifier("task_id", task_id)
    violations.identifier("attempt_id", attempt_id)
    return violations


def check_completion(task_id: str, attempt_id: str, result: struct_pb2.Struct) -> None:
    violations = report_violations(task_id, attempt_id)
    if result.ByteSize() > MAX_PAYLOAD_BYTES:
        violations.add("result", f"larger than {MAX_PAYLOAD_BYTES} bytes")
    else:
        violations.value("result", result)
    violations.raise_if_any()


def check_failure(task_id: str, attempt_id: str, error: task_pb2.TaskError) -> None:
    violations = report_violations(task_id, attempt_id)
    violations.text("error.message", error.message, 4096)
    violations.text("error.reason", error.reason, 256)
    violations.raise_if_any()


def check_progress(task_id: str, attempt_id: str, progress: task_pb2.TaskProgress) -> None:
    violations = report_violations(task_id, attempt_id)
    if not 0.0 <= progress.fraction <= 1.0:
        violations.add("progress.fraction", "must be between 0.0 and 1.0")
    violations.text("progress.message", progress.message, MAX_ATTEMPT_ERROR)
    violations.raise_if_any()
