"""Just enough PromQL reading to check expressions against a real /metrics scrape: the metric
names an expression uses and the label matchers of each selector. (promtool parses the full
language; this only has to find names in expressions promtool has accepted.)"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}
)
# Labels Prometheus attaches at scrape time, not the server.
TARGET_LABELS = frozenset({"job", "instance"})


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


def metric_names(expr: str) -> set[str]:
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    stripped = re.sub(r"\{[^}]*\}", " ", stripped)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", stripped)
    names = re.findall(rf"(?<![\w:.]){_NAME}\b(?!\s*\()", stripped)
    return {name for name in names if name.lower() not in _KEYWORDS}


def selectors(expr: str) -> Iterator[tuple[str, list[Matcher]]]:
    """(metric name, matchers) of every `name{...}` selector."""
    for name, body in re.findall(rf"({_NAME})\s*\{{([^}}]*)\}}", expr):
        matchers = [
            Matcher(label, op, value)
            for label, op, value in re.findall(rf'({_NAME})\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', body)
        ]
        yield name, matchers


def unknown_references(expr: str, exported: dict[str, dict[str, set[str]]]) -> list[str]:
    """What `expr` names that the scrape `exported` (sample name -> label -> values) lacks: metric
    names, label names, and label values matched by `=` or by `=~` alternatives of plain words."""
    problems = [
        f"metric {name}" for name in sorted(metric_names(expr)) if name != "up" and name not in exported
    ]
    for name, matchers in selectors(expr):
        if name == "up" or name not in exported:
            continue
        for matcher in matchers:
            if matcher.label in TARGET_LABELS:
                continue
            values = exported[name].get(matcher.label)
            if values is None:
                problems.append(f"label {name}{{{matcher.label}}}")
            elif matcher.op == "=" and matcher.value not in values:
                problems.append(f"value {name}{{{matcher.label}={matcher.value!r}}}")
            elif matcher.op == "=~" and re.fullmatch(r"\w+(\|\w+)*", matcher.value):
                problems += [
                    f"value {name}{{{matcher.label}={part!r}}}"
                    for part in matcher.value.split("|")
                    if part not in values
                ]
    return problems
